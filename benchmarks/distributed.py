"""Several processes as one model, measured (benchmarks/RESULTS.md, "Several Macs").

Mid shape on this CPU, float32, MLX's ring backend over loopback: one process (both cores)
against two ranks tensor parallel and two ranks pipelined (one core each), run in turn
(`--rounds` times), each a fresh start of the same random checkpoint: the denoising step time
(one canvas, every step run), the bytes the collectives move per step (counted:
`mx.distributed`'s functions wrapped while the steps' graphs are built; each built step is
evaluated), and the peak memory of every rank. Then the full shape on paper: the weights a
rank keeps at 4 bits for 2 and 4 ranks (the real `Model.shard` / `Model.pipeline` applied to a
lazy full-shape model: nothing is materialised), its prompt cache, the communication per step
from the formula the mid-shape count confirms, and the step time expected on two M-series Macs
(an estimate from the FLOPs and an assumed share of the GPU's peak).

    python benchmarks/distributed.py [--steps 8] [--rounds 2] [--out benchmarks/logs/distributed]
    python benchmarks/distributed.py --plot benchmarks/logs/distributed/results.json

The plot needs matplotlib, which the package does not.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("one", "tensor", "pipeline")
# Diagnostics: one process on one core (what each rank has), and the tensor-parallel ranks with
# their collectives skipped (wrong numbers, same work: their compute alone).
DIAGNOSTICS = ("one-core", "tensor-compute")
RANKS = {"one": 1, "one-core": 1, "tensor": 2, "tensor-compute": 2, "pipeline": 2}
PROMPT = 512
GB = 1e9
# Links, in bytes per second at line rate.
LINKS = {"Thunderbolt 5 (80 Gb/s)": 80e9 / 8, "10 GbE": 10e9 / 8}
# GPU peak FP16/FP32 TFLOPS (Apple publishes none: GPU cores x 128 ALUs x 2 x clock, as third
# parties derive them), and the share of it the step's matmuls are assumed to reach.
MACS = {"M4 Pro (20-core GPU)": 8.1, "M4 Max (40-core GPU)": 16.2}
EFFICIENCY = 0.5


# ---- one run (a process, or one rank of a launch) -----------------------------------------------
class Counter:
    """Wraps mx.distributed's collectives: the payload each call moves and what this rank sends
    (a ring all_sum sends 2(N-1)/N of its payload, an all_gather N-1 times its input)."""

    def __init__(self, skip_sums: bool = False):
        import mlx.core as mx

        self.payload = self.sent = self.calls = 0
        d = mx.distributed

        def size(group):
            return (group or d.init()).size()

        def all_sum(x, *a, group=None, **k):
            n = size(group)
            self.add(x.nbytes, x.nbytes * 2 * (n - 1) / n)
            return x if skip_sums else orig["all_sum"](x, *a, group=group, **k)

        def all_gather(x, *a, group=None, **k):
            self.add(x.nbytes * size(group), x.nbytes * (size(group) - 1))
            return orig["all_gather"](x, *a, group=group, **k)

        def send(x, *a, **k):
            self.add(x.nbytes, x.nbytes)
            return orig["send"](x, *a, **k)

        orig = {f: getattr(d, f) for f in ("all_sum", "all_gather", "send")}
        d.all_sum, d.all_gather, d.send = all_sum, all_gather, send

    def add(self, payload, sent):
        self.payload += payload
        self.sent += sent
        self.calls += 1

    def reset(self):
        self.payload = self.sent = self.calls = 0


def run(mode: str, path: str, out: str, steps: int):
    """Loads `path` (split as `mode` says), encodes a prompt, times one canvas's denoising steps
    after a warm-up one, and writes its figures to OUT.<rank>.json."""
    import mlx.core as mx

    from mlx_diffusiongemma.bench.shapes import NO_STOP
    from mlx_diffusiongemma.denoise import denoise_canvas
    from mlx_diffusiongemma.distributed import init_group
    from mlx_diffusiongemma.generator import init_canvas
    from mlx_diffusiongemma.loader import load_model
    from mlx_diffusiongemma.sampler import SamplerSettings

    if mode != "one" and hasattr(os, "sched_setaffinity"):  # one core each, before any thread
        cores = sorted(os.sched_getaffinity(0))  # starts (the ring's spin while they wait)
        os.sched_setaffinity(0, {cores[int(os.environ.get("MLX_RANK", 0)) % len(cores)]})
    group = init_group() if RANKS[mode] > 1 else None
    kw = {"tensor": {"tensor_group": group}, "pipeline": {"pipeline_group": group}}
    tic = time.perf_counter()
    model = load_model(path, **kw.get(mode.split("-")[0], {}))
    load_s = time.perf_counter() - tic
    load_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    args = model.args
    C, V = args.canvas_length, args.vocab_size
    key = mx.random.key(0)
    ids = mx.random.randint(3, V, (1, PROMPT), key=key)
    cache = model.encode(ids, model.make_cache())
    settings = SamplerSettings.resolve(
        {}, max_tokens=C, max_denoising_steps=steps, confidence_threshold=NO_STOP
    )
    warm = SamplerSettings.resolve({}, max_tokens=C, max_denoising_steps=1)
    canvas = init_canvas(key, 1, C, V)
    denoise_canvas(model, cache, canvas, warm, key)
    tic = time.perf_counter()
    counter = Counter(skip_sums=mode == "tensor-compute")  # after the load's barrier
    ends = [tic]
    _, n = denoise_canvas(
        model, cache, canvas, settings, key, lambda *a: ends.append(time.perf_counter())
    )
    step_s = (time.perf_counter() - tic) / n
    each = sorted(b - a for a, b in zip(ends, ends[1:]))
    rank = 0 if group is None else group.rank()
    figures = dict(
        mode=mode,
        round=int(Path(out).name.rsplit("-", 1)[1]),
        rank=rank,
        ranks=1 if group is None else group.size(),
        steps=n,
        step_ms=1000 * step_s,
        step_min_ms=1000 * each[0],
        step_median_ms=1000 * each[len(each) // 2],
        load_s=load_s,
        payload_per_step=counter.payload / n,
        sent_per_step=counter.sent / n,
        collectives_per_step=counter.calls / n,
        weights_bytes=sum(v.nbytes for _, v in _flat(model)),
        cache_bytes=cache.nbytes,
        peak_load_bytes=load_peak,
        peak_step_bytes=mx.get_peak_memory(),
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    Path(f"{out}.{rank}.json").write_text(json.dumps(figures))


def _flat(model):
    from mlx.utils import tree_flatten

    return {id(v): (k, v) for k, v in tree_flatten(model.parameters())}.values()


# ---- the mid shape, measured ---------------------------------------------------------------------
def write_mid_checkpoint(folder: Path):
    """The mid shape with random float32 weights, as a checkpoint folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_diffusiongemma.bench.models import make_args, text_config
    from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, MID_TEXT
    from mlx_diffusiongemma.model import Model

    model = Model(make_args(MID_TEXT))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = text_config(MID_TEXT, FULL_CANVAS)
    config["text_config"]["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config))


def measure(path: Path, out: Path, steps: int, rounds: int):
    """Every mode `rounds` times, in turn; the figures of every run and rank."""
    from mlx_diffusiongemma.bench.common import OPENBLAS_CANDIDATES

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    openblas = next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
    if openblas:  # the MLX wheel's own BLAS runs float32 matmuls ~30x slower here
        env["LD_PRELOAD"] = openblas
    runs = []
    for r in range(rounds):
        for mode in MODES + (DIAGNOSTICS if r == 0 else ()):
            prefix = out / f"{mode}-{r}"
            cmd = [sys.executable, __file__, "--run", mode, str(path), str(prefix), str(steps)]
            threads = {}
            if mode != "one":  # one core each (run pins it): the ranks share the two cores
                threads = {"OPENBLAS_NUM_THREADS": "1"}
            err = start_ranks(cmd, RANKS[mode], {**env, **threads})
            ranks = sorted(out.glob(f"{mode}-{r}.*.json"))
            if len(ranks) != RANKS[mode]:
                raise SystemExit(f"{mode} run {r} failed:\n{err[-3000:]}")
            figures = [json.loads(f.read_text()) for f in ranks]
            runs.append(figures)
            print(f"round {r} {mode:14s} " + " | ".join(_line(f) for f in figures), flush=True)
    return runs


def start_ranks(cmd, n: int, env) -> str:
    """Runs `cmd` as n ranks of a ring over loopback, started as mlx.launch starts them (a
    hostfile and MLX_RANK), and waits for them; their stderr. Not through mlx.launch itself: its
    I/O loop spins (0.32.4: ~1.5 cores while its ranks run), which on this 2-core machine halved
    the ranks' speed."""
    if n == 1:
        return subprocess.run(cmd, env=env, capture_output=True, text=True).stderr
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in ports], f)
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "MLX_HOSTFILE": f.name, "MLX_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    err = "".join(p.communicate()[1] for p in procs)
    os.unlink(f.name)
    return err


def _line(f):
    return (
        f"rank {f['rank']}: step {f['step_min_ms']:.0f} ms best, {f['step_median_ms']:.0f} "
        f"median, {f['sent_per_step'] / 1e6:.2f} MB sent "
        f"({f['collectives_per_step']:.0f} collectives) per step, weights "
        f"{f['weights_bytes'] / GB:.3f} GB, peak {f['peak_step_bytes'] / GB:.3f} GB (MLX), "
        f"RSS {f['max_rss_bytes'] / GB:.3f} GB"
    )


# ---- the full shape, on paper ------------------------------------------------------------------
class FakeGroup:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def full_shape_rank(ranks: int, rank: int, mode: str):
    """Bytes of weights and of a 4096-token prompt cache (bf16) that `rank` of `ranks` keeps at
    the full shape, mixed 4-bit recipe: the real split applied to a lazy model."""
    import mlx.core as mx

    from mlx_diffusiongemma import distributed
    from mlx_diffusiongemma.bench.models import default_quant, make_args, quantize_structure
    from mlx_diffusiongemma.bench.shapes import FULL_TEXT
    from mlx_diffusiongemma.model import Model

    args = make_args(FULL_TEXT)
    model = Model(args)
    quantize_structure(model, default_quant())
    if ranks > 1:
        getattr(model, "shard" if mode == "tensor" else "pipeline")(FakeGroup(ranks, rank))
        distributed._spanning = None
    weights = 0
    for _, v in _flat(model):
        floating = mx.issubdtype(v.dtype, mx.floating)
        weights += v.size * 2 if floating else v.nbytes  # float tensors (scales, norms) in bf16
    cache = 0
    for _, layer in model.model.decoder.local_layers():
        attn = layer.self_attn
        kept = args.sliding_window - 1 if attn.is_sliding else 4096
        cache += 2 * attn.n_kv_heads * min(kept, 4096) * attn.head_dim * 2
    return weights, cache, args


def paper(mid_runs):
    """The full shape's per-rank memory and per-step communication."""
    from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, FULL_TEXT, MID_TEXT

    out = {"memory": {}, "communication": {}}
    for ranks in (1, 2, 4):
        for mode in ("tensor", "pipeline") if ranks > 1 else ("one",):
            w, c, _ = full_shape_rank(ranks, 0, mode)  # rank 0 keeps the most (extra groups)
            out["memory"][f"{mode} {ranks}"] = dict(weights=w, cache=c)
            print(
                f"full shape, {mode} over {ranks}: rank 0 keeps {w / GB:.2f} GB of weights, "
                f"{c / GB:.2f} GB of 4096-token cache",
                flush=True,
            )

    # Per step: tensor parallel sums (B, C, D) after attention and (B, C, 2D) after the MLPs in
    # every layer; a pipeline sends (B, C, D) at each stage boundary and gathers the output.
    def tensor_payload(text, canvas, itemsize):
        return text["num_hidden_layers"] * canvas * 3 * text["hidden_size"] * itemsize

    def pipeline_payload(text, canvas, itemsize, ranks):
        h = canvas * text["hidden_size"] * itemsize
        return (ranks - 1) * h + ranks * h  # sends, then the all_gather's output

    mid = {m: [f for run in mid_runs for f in run if f["mode"] == m] for m in MODES}
    check = {
        "tensor": tensor_payload(MID_TEXT, FULL_CANVAS, 4),
        "pipeline": pipeline_payload(MID_TEXT, FULL_CANVAS, 4, 2),
    }
    for mode, want in check.items():
        counted = max(f["payload_per_step"] for f in mid[mode])  # the stage that sends and gathers
        print(
            f"mid shape {mode}: counted {counted / 1e6:.3f} MB payload per step, formula "
            f"{want / 1e6:.3f} MB",
            flush=True,
        )
        out["communication"][f"mid {mode} counted"] = counted
        out["communication"][f"mid {mode} formula"] = want
    for ranks in (2, 4):
        for mode in ("tensor", "pipeline"):
            if mode == "tensor":
                payload = tensor_payload(FULL_TEXT, FULL_CANVAS, 2)
                sent = payload * 2 * (ranks - 1) / ranks
                calls = 2 * FULL_TEXT["num_hidden_layers"]
            else:
                payload = pipeline_payload(FULL_TEXT, FULL_CANVAS, 2, ranks)
                h = FULL_CANVAS * FULL_TEXT["hidden_size"] * 2
                sent = h + (ranks - 1) * h  # one send at most, and the gather
                calls = 2
            times = {link: sent / bw for link, bw in LINKS.items()}
            out["communication"][f"full {mode} {ranks}"] = dict(
                payload=payload, sent=sent, collectives=calls, seconds=times
            )
            print(
                f"full shape {mode} over {ranks}: {payload / 1e6:.1f} MB payload, "
                f"{sent / 1e6:.1f} MB sent per rank, {calls} collectives per step; "
                + ", ".join(f"{t * 1e3:.1f} ms over {k}" for k, t in times.items()),
                flush=True,
            )
    out["estimate"] = estimate(out["communication"])
    return out


def step_flops(text, canvas: int, prompt: int):
    """FLOPs of one full-shape denoising step (2 per multiply-add) with `prompt` positions
    cached: (the layers' share, which tensor parallelism splits; the rest, which every rank
    runs: routers, LM head, self-conditioning MLP)."""
    D, I, L = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    H, E = text["num_attention_heads"], text["num_experts"]
    split = rest = 0
    for layer in range(L):
        full = (layer + 1) % 6 == 0  # Gemma 4's pattern: five sliding layers, then a full one
        hd = text["global_head_dim"] if full else text["head_dim"]
        kv = text["num_global_key_value_heads"] if full else text["num_key_value_heads"]
        keys = prompt + canvas if full else min(text["sliding_window"] - 1, prompt) + canvas
        proj = D * H * hd * 2 + D * kv * hd * (1 if full else 2)  # q, o; k (and v)
        scores = 2 * H * hd * keys  # q.k and p.v
        mlp = 3 * D * I + text["top_k_experts"] * 3 * D * text["moe_intermediate_size"]
        split += 2 * canvas * (proj + scores + mlp)
        rest += 2 * canvas * D * E
    rest += 2 * canvas * (D * text["vocab_size"] + 3 * D * I)
    return split, rest


def estimate(communication):
    """Expected full-shape step time on M-series Macs: compute at EFFICIENCY of the GPU's peak,
    plus the counted bytes at the link's line rate (an estimate; nothing here ran on a Mac)."""
    from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, FULL_TEXT

    split, rest = step_flops(FULL_TEXT, FULL_CANVAS, PROMPT)
    print(
        f"full shape step, {PROMPT}-token prompt: {(split + rest) / 1e12:.2f} TFLOP "
        f"({split / 1e12:.2f} in the layers, {rest / 1e12:.2f} replicated)",
        flush=True,
    )
    out = {"flops": dict(layers=split, replicated=rest)}
    for mac, tflops in MACS.items():
        rate = tflops * 1e12 * EFFICIENCY
        one = (split + rest) / rate
        out[f"{mac} one"] = one
        print(f"  {mac}, one Mac: {one * 1e3:.0f} ms", flush=True)
        for link in LINKS:
            tp = (split / 2 + rest) / rate + communication["full tensor 2"]["seconds"][link]
            pp = one + communication["full pipeline 2"]["seconds"][link]
            out[f"{mac} tensor 2 {link}"], out[f"{mac} pipeline 2 {link}"] = tp, pp
            print(
                f"  {mac}, two over {link}: tensor parallel {tp * 1e3:.0f} ms, "
                f"pipeline {pp * 1e3:.0f} ms",
                flush=True,
            )
    return out


# ---- the plot ------------------------------------------------------------------------------------
def plot(results: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    runs = data["mid"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    labels = {
        "one": "one\nprocess",
        "one-core": "one process\non one core",
        "tensor": "2 ranks\ntensor parallel",
        "pipeline": "2 ranks\npipeline",
    }
    ax = axes[0]
    ax.bar([labels[m] for m in MODES], [min(step_times(runs, m)) for m in MODES], color="C0")
    for i, m in enumerate(MODES):
        medians = step_times(runs, m, "step_median_ms")
        ax.plot([i] * len(medians), medians, "k.", label="median of a run" if i == 0 else None)
    if step_times(runs, "one-core"):
        ax.axhline(min(step_times(runs, "one-core")), color="gray", ls="--", lw=1)
        ax.text(
            -0.4,
            min(step_times(runs, "one-core")),
            "one process on one core",
            fontsize=8,
            va="bottom",
        )
    ax.set_ylabel("ms per denoising step, best of its runs")
    ax.set_title("step time (mid shape, this 2-core CPU)")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    first = {m: next(run for run in runs if run[0]["mode"] == m) for m in MODES}
    sent = [max(f["sent_per_step"] for f in first[m]) / 1e6 for m in MODES]
    ax.bar([labels[m] for m in MODES], sent, color="C1")
    for i, v in enumerate(sent):
        ax.text(i, v, f"{v:.2f} MB", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MB a rank sends per step (counted)")
    ax.set_title("communication (mid shape, float32)")
    ax = axes[2]
    shown = [m for m in ("one", "one-core", "tensor", "pipeline") if step_times(runs, m)]
    runs_of = {m: next(run for run in runs if run[0]["mode"] == m) for m in shown}
    weights = [max(f["weights_bytes"] for f in runs_of[m]) / GB for m in shown]
    peaks = [max(f["peak_step_bytes"] for f in runs_of[m]) / GB for m in shown]
    names = [labels[m] for m in shown]
    ax.bar(names, weights, color="C2", label="weights")
    ax.bar(
        names,
        [p - w for p, w in zip(peaks, weights)],
        bottom=weights,
        color="C4",
        label="step's peak above them",
    )
    ax.set_ylabel("GB per rank (MLX peak, measured)")
    ax.set_title("memory per rank (mid shape, float32)")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[3]
    mem = data["paper"]["memory"]
    names = ["one 1", "tensor 2", "pipeline 2", "tensor 4", "pipeline 4"]
    ticks = [n.replace(" ", "\n") for n in names]
    ax.bar(
        ticks, [mem[n]["weights"] / GB for n in names], color="C2", label="weights (4-bit mixed)"
    )
    ax.bar(
        ticks,
        [mem[n]["cache"] / GB for n in names],
        bottom=[mem[n]["weights"] / GB for n in names],
        color="C3",
        label="4096-token prompt cache",
    )
    ax.axhline(16, color="k", ls="--", lw=1)
    ax.text(4.4, 16.2, "16 GB Mac", ha="right", fontsize=8)
    ax.set_ylim(0, 18.5)
    ax.set_ylabel("GB on rank 0 (full shape, on paper)")
    ax.set_title("memory per rank (full shape)")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    out = results.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/logs/distributed")
    p.add_argument("--checkpoint", type=Path, default=None, help="reuse this mid checkpoint")
    p.add_argument("--run", nargs=4, metavar=("MODE", "PATH", "OUT", "STEPS"))
    p.add_argument("--plot", type=Path)
    a = p.parse_args()
    if a.run:
        mode, path, out, steps = a.run
        return run(mode, path, out, int(steps))
    if a.plot:
        return plot(a.plot)
    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.out.glob("*-*.json"):
        f.unlink()
    work = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    try:
        ckpt = a.checkpoint or work / "mid"
        if a.checkpoint is None:
            write_mid_checkpoint(ckpt)
        runs = measure(ckpt, a.out, a.steps, a.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"mid": runs, "paper": paper(runs)}
    (a.out / "results.json").write_text(json.dumps(result, indent=1))
    print(summary(runs))


def step_times(runs, mode, which="step_min_ms"):
    """Per run of `mode`, its slowest rank's best (or median) step."""
    return [max(f[which] for f in run) for run in runs if run[0]["mode"] == mode]


def summary(runs) -> str:
    """Best and median step per mode over all its runs, and each against one process's."""
    lines = []
    best = {m: min(step_times(runs, m)) for m in MODES + DIAGNOSTICS if step_times(runs, m)}
    med = {m: sorted(step_times(runs, m, "step_median_ms"))[0] for m in best}
    for m in best:
        lines.append(
            f"{m:14s} best step {best[m]:6.0f} ms ({best[m] / best['one']:.2f}x one process), "
            f"median {med[m]:6.0f} ms ({med[m] / med['one']:.2f}x)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
