"""Section `graph`: the host's cost of issuing one denoising step at full shape, compiled (a
traced graph replayed, step.py) and not (built op by op), in the same run.

On Metal and CUDA a step is a few milliseconds of device time, so the host's cost of issuing it
is of the same order; the loop issues step t+1 while the device runs step t
(denoise.denoise_canvas). This times the calls that loop makes per step (`CanvasSteps`, what
`denoise_canvas` builds its steps with) on the full 30-layer model in the mixed 4-bit recipe of a
bfloat16 checkpoint, its weights zeros held as broadcast views (nothing at full shape is computed
or stored, so it runs anywhere), through the Metal/CUDA code
path (the default backend, backends/). Then: the traces and the first (tracing) step of a
generation of 8 canvases, the host cost of the encoder's passes (the commit of a canvas, the
prompt), and the bundled demo solved through the Python API on this machine, compiled or not."""

import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import fields, replace

from mlx_diffusiongemma.bench.common import say
from mlx_diffusiongemma.bench.models import default_quant, make_args, quantize_structure
from mlx_diffusiongemma.bench.shapes import FULL_TEXT

CANVASES = 8  # a generation of this many canvases is traced through
BLOCKS = 5  # blocks of steps timed per path, alternated


def full_model(prompt: int, layers=None):
    """The full-shape model in the mixed 4-bit recipe of a bfloat16 checkpoint and a prompt
    cache holding `prompt` positions of K/V. Values do not matter: every weight is zeros,
    evaluated as a broadcast view (no memory), as a loaded checkpoint's weights are evaluated
    arrays; the K/V are zeros."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_diffusiongemma.model import Model

    args = make_args(FULL_TEXT, layers=layers)
    model = Model(args)
    quantize_structure(model, default_quant(), "mixed")

    def zeros(w):
        dtype = mx.bfloat16 if mx.issubdtype(w.dtype, mx.floating) else w.dtype
        return mx.broadcast_to(mx.zeros((), dtype=dtype), w.shape)

    model.update(tree_map(zeros, model.parameters()))
    mx.eval(model.parameters())
    cache = model.make_cache()
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        n = min(prompt, args.sliding_window - 1) if args.is_sliding(i) else prompt
        cache.keys[i] = cache.values[i] = mx.zeros(
            (1, a.n_kv_heads, n, a.head_dim), dtype=mx.bfloat16
        )
    cache.offset = prompt
    return model, cache


def commit_zeros(model, cache, n: int):
    """`cache` as if a canvas of `n` tokens had been committed (its K/V zeros, sliding layers
    trimmed as PromptCache.store trims them), without computing anything."""
    import mlx.core as mx

    for i in range(len(cache.keys)):
        k = cache.keys[i]
        more = mx.zeros((*k.shape[:2], n, k.shape[3]), dtype=k.dtype)
        cache.store(i, mx.concatenate([k, more], axis=2), mx.concatenate([k, more], axis=2))
    cache.offset += n


@contextmanager
def no_eval():
    """mx.eval does nothing (the encoder evaluates each chunk it writes): graphs are built only."""
    import mlx.core as mx

    real = mx.eval
    mx.eval = lambda *a, **k: None
    try:
        yield
    finally:
        mx.eval = real


def settled(step):
    """`step` as the loop holds it once the device has run it: the same arrays, evaluated
    (zeros: values do not matter; nothing at full shape is computed)."""
    import mlx.core as mx

    def ready(a):
        if a is None:
            return None
        if isinstance(a, list):
            return [ready(x) for x in a]
        z = mx.zeros(a.shape, dtype=a.dtype)
        mx.eval(z)
        return z

    return replace(step, **{f.name: ready(getattr(step, f.name)) for f in fields(step)})


class CanvasRun:
    """One canvas's steps as denoise_canvas builds them (`CanvasSteps`), compiled or not: its
    setup and first step timed, then any number of later steps, each built from the evaluated
    previous step (the K/V buffers as they were before it)."""

    def __init__(self, model, cache, settings, compiled: bool):
        import mlx.core as mx

        from mlx_diffusiongemma.denoise import CanvasSteps
        from mlx_diffusiongemma.step import compile_steps

        C, self.N = model.args.canvas_length, settings.max_denoising_steps
        with compile_steps(compiled):
            t = time.perf_counter()
            self.steps = CanvasSteps(model, cache, C, settings)
            self.setup_s = time.perf_counter() - t
        self.clean = self.steps.kv.snapshot()  # evaluated buffers
        canvas = mx.zeros((1, C), dtype=mx.int32)
        history = mx.full((settings.stability_threshold, 1, C), -1, dtype=mx.int32)
        t = time.perf_counter()
        step = self.steps.build_step(canvas, None, history, mx.random.key(0), self.N)
        self.first_s = time.perf_counter() - t
        self.step = settled(step)
        self.count = 0

    def next_step_s(self) -> float:
        """Host seconds of one more step as the loop issues it on Metal and CUDA: the K/V
        buffers' snapshot, then the next step's graph (the device runs this one meanwhile)."""
        self.steps.kv.restore(self.clean)
        self.count += 1
        remaining = self.N - 1 - self.count % (self.N - 1)
        t = time.perf_counter()
        self.steps.kv.snapshot()
        nxt = self.steps.build_next_step(self.step, remaining)
        dt = time.perf_counter() - t
        del nxt  # outside the timing: the loop frees evaluated graphs
        return dt

    def nodes(self) -> int:
        """Operations in one step's graph (what the host creates per step)."""
        self.steps.kv.restore(self.clean)
        nxt = self.steps.build_next_step(self.step, self.N - 1)
        outs = [nxt.canvas, nxt.argmax, nxt.finished]
        outs += [nxt.soft if nxt.soft is not None else nxt.probs]
        outs += [a for a in self.steps.kv.keys + self.steps.kv.values if a is not None]
        return len(graph_nodes(outs))  # (the weights are evaluated: leaves, not operations)


def graph_nodes(arrays) -> set:
    """The ids of the operations `arrays` depend on (evaluated arrays are leaves)."""
    import re
    import tempfile

    import mlx.core as mx

    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *arrays)
        return set(re.findall(r"\{ (\d+) \[label =", f.read()))


def generation_traces(model, cache, settings, prompt: int):
    """A generation of CANVASES canvases, compiled: per canvas the traces made and the host time
    of its first step (which traces, when one is made) and of two more; the cache grows by a
    canvas each time."""
    from mlx_diffusiongemma.step import traces

    cache = cache.copy()
    out = []
    for c in range(CANVASES):
        before = traces()
        run = CanvasRun(model, cache, settings, True)
        out.append(
            dict(
                prefix=cache.offset,
                traces=traces() - before,
                first_step_s=run.first_s,
                next_steps_s=[run.next_step_s() for _ in range(2)],
                canvas_setup_s=run.setup_s,
            )
        )
        del run
        commit_zeros(model, cache, model.args.canvas_length)
    return out


def encoder_passes(model, cache, prompt: int, repeat: int):
    """Host seconds to build the encoder's commit of one canvas after the prompt, and the
    prompt pass itself (2048-token chunks), uncompiled."""
    import mlx.core as mx

    C = model.args.canvas_length
    commit, whole = [], []
    with no_eval():
        for _ in range(repeat):
            t = time.perf_counter()
            model.encode(mx.zeros((1, C), dtype=mx.int32), cache.copy())
            commit.append(time.perf_counter() - t)
        for _ in range(max(repeat // 2, 1)):
            t = time.perf_counter()
            model.encode(mx.zeros((1, prompt), dtype=mx.int32), model.make_cache(), step=2048)
            whole.append(time.perf_counter() - t)
    return statistics.median(commit), statistics.median(whole)


def demo_speed(puzzles: int, rounds: int):
    """The bundled demo solving `puzzles` generated Sudokus through stream_generate, in turn on
    the CPU backend (what a CPU runs by default), the default backend uncompiled and compiled:
    tokens per second of each, best of `rounds` rounds, and whether the outputs agree."""
    import mlx.core as mx

    from mlx_diffusiongemma import backends
    from mlx_diffusiongemma.cli import DEMO_MODEL
    from mlx_diffusiongemma.examples.sudoku_puzzles import make_puzzle, to_text
    from mlx_diffusiongemma.generation import stream_generate
    from mlx_diffusiongemma.loader import load
    from mlx_diffusiongemma.step import compile_steps

    model, tokenizer = load(DEMO_MODEL, dtype=mx.float32)
    n = 6
    rng = random.Random("graph-demo")
    grids = []
    while len(grids) < puzzles:
        made = make_puzzle(n, n * n // 2, rng)
        if made:
            grids.append(made[0])
    modes = {
        "cpu": (backends.CPU, False),
        "default uncompiled": (backends.DEFAULT, False),
        "default compiled": (backends.DEFAULT, True),
    }
    best, texts = {}, {}
    for r in range(rounds + 1):  # round 0 warms up (traces, kernels)
        for name, (backend, compiled) in modes.items():
            with backends.using(backend), compile_steps(compiled):
                out, tokens, steps = [], 0, 0
                t = time.perf_counter()
                for i, g in enumerate(grids):
                    text = ""
                    for resp in stream_generate(model, tokenizer, to_text(g), seed=i):
                        text += resp.text
                        steps += resp.steps
                    tokens += resp.generation_tokens
                    out.append(text)
                dt = time.perf_counter() - t
            if r:
                tps = tokens / dt
                if tps > best.get(name, (0,))[0]:
                    best[name] = (tps, dt / steps)
            texts[name] = out
    same = texts["default uncompiled"] == texts["default compiled"]
    return best, same, texts["cpu"] == texts["default compiled"]


def paths_timed(model, cache, settings, blocks: int, per_block: int):
    """Host seconds per step of the compiled and the uncompiled path ({True: [...], False:
    [...]}, each sorted) and the operations each creates per step. In alternating blocks, so
    that a busy machine weighs on both alike; not step by step: one path's garbage (freed
    nodes, malloc's state) slows the other's next step, which a generation, running one of
    them, never sees."""
    runs = {True: CanvasRun(model, cache, settings, True)}
    runs[False] = CanvasRun(model, cache, settings, False)
    times = {True: [], False: []}
    for _ in range(blocks):
        for compiled, run in runs.items():
            times[compiled] += [run.next_step_s() for _ in range(per_block)]
    nodes = {k: run.nodes() for k, run in runs.items()}
    return {k: sorted(v) for k, v in times.items()}, nodes


@contextmanager
def fast_ops_as_one():
    """mx.fast's rms_norm, rope and attention as one operation each, as Metal and CUDA build
    them (a softmax of the same shape stands in). On a CPU each is its fallback's several
    operations, made when the graph is built: ~1,800 of a full step's. Within this block the
    graphs are shaped as a GPU host's (nothing is computed, so the stand-in's values do not
    matter); mx.dequantize (the embedding's ~20) stays decomposed."""
    import mlx.core as mx

    fast = mx.fast
    saved = fast.rms_norm, fast.rope, fast.scaled_dot_product_attention
    fast.rms_norm = lambda x, weight, eps: mx.softmax(x, axis=-1)
    fast.rope = lambda x, dims, **kw: mx.softmax(x, axis=-1)
    fast.scaled_dot_product_attention = lambda q, k, v, **kw: mx.softmax(q, axis=-1)
    try:
        yield
    finally:
        fast.rms_norm, fast.rope, fast.scaled_dot_product_attention = saved


def section_graph(opts, rep):
    from mlx_diffusiongemma.backends import DEFAULT, using
    from mlx_diffusiongemma.sampler import SamplerSettings
    from mlx_diffusiongemma.step import traces

    rep.header(
        "graph: host time to issue one denoising step at full shape, compiled and not, "
        "Metal/CUDA path"
    )
    model, cache = full_model(opts.prompt)
    layers = model.args.num_hidden_layers
    settings = SamplerSettings(max_denoising_steps=opts.steps)
    with using(DEFAULT):
        gen = generation_traces(model, cache, settings, opts.prompt)
        say(
            f"  a generation of {CANVASES} canvases from a {opts.prompt}-token prompt, compiled: "
            f"{sum(g['traces'] for g in gen)} traces (per canvas "
            f"{[g['traces'] for g in gen]}, prefixes {gen[0]['prefix']}..{gen[-1]['prefix']}); "
            f"first step of canvas 0 (tracing) {gen[0]['first_step_s'] * 1e3:.0f} ms; "
            f"a canvas's setup (padded K/V copied, weights listed) "
            f"{statistics.median(g['canvas_setup_s'] for g in gen) * 1e3:.1f} ms"
        )
        times, nodes = paths_timed(model, cache, settings, BLOCKS, opts.repeat * 2)
        commit_s, prompt_s = encoder_passes(model, cache, opts.prompt, opts.repeat)
        with fast_ops_as_one():  # a fresh model: its step is traced with the stand-ins
            one, one_cache = full_model(opts.prompt)
            one_times, one_nodes = paths_timed(one, one_cache, settings, BLOCKS, opts.repeat * 2)
            del one, one_cache
    compiled, uncompiled = times[True], times[False]
    # The fastest of many (timeit's convention): the others were slowed by other processes.
    build_s, build_un = compiled[0], uncompiled[0]
    med, med_un = statistics.median(compiled), statistics.median(uncompiled)
    say(
        f"  one step ({layers} layers, mixed 4-bit, decoder forward + sampler + stop test + "
        f"self-conditioning), host time per step, fastest of {len(compiled)}: compiled "
        f"{build_s * 1e3:.2f} ms, uncompiled {build_un * 1e3:.2f} ms ({build_s / build_un:.2f}x); "
        f"medians {med * 1e3:.2f} / {med_un * 1e3:.2f} ms ({med / med_un:.2f}x); "
        f"vLLM's H100 step for scale: 9.1 ms"
    )
    say(
        f"  operations the host creates per step: compiled {nodes[True]} (replayed), uncompiled "
        f"{nodes[False]} (built op by op); on this CPU mx.fast's rms_norm, rope and attention "
        f"are several operations each, on Metal and CUDA one"
    )
    one_c, one_u = one_times[True][0], one_times[False][0]
    say(
        f"  per operation: replayed {build_s / nodes[True] * 1e6:.2f} us, built from Python "
        f"{build_un / nodes[False] * 1e6:.2f} us. Shaped as a GPU host builds it (mx.fast's ops "
        f"one operation each): compiled {one_c * 1e3:.2f} ms ({one_nodes[True]} operations), "
        f"uncompiled {one_u * 1e3:.2f} ms ({one_nodes[False]}): {one_c / one_u:.2f}x"
    )
    say(
        f"  encoder, uncompiled: commit of a canvas built in {commit_s * 1e3:.1f} ms (once per "
        f"canvas); the {opts.prompt}-token prompt pass in {prompt_s * 1e3:.1f} ms (once)"
    )
    puzzles = 4 * opts.repeat
    demo, same, same_cpu = demo_speed(puzzles, 2)
    say(
        f"  the bundled demo, {puzzles} Sudokus through stream_generate on this machine (tok/s, "
        "ms per step): "
        + "; ".join(f"{k} {v[0]:.0f} tok/s ({v[1] * 1e3:.1f} ms)" for k, v in demo.items())
        + f"; compiled output equal to uncompiled: {same}, to the CPU backend's: {same_cpu}"
    )
    rep.save(
        "graph",
        {
            "build_s": build_s,
            "build_uncompiled_s": build_un,
            "ratio": build_s / build_un,
            "layers": layers,
            "prompt": opts.prompt,
            "build_median_s": med,
            "nodes_per_step": nodes[True],
            "nodes_per_step_uncompiled": nodes[False],
            "build_uncompiled_median_s": med_un,
            "times_s": compiled,
            "uncompiled_times_s": uncompiled,
            "first_step_s": gen[0]["first_step_s"],
            "traces_per_generation": sum(g["traces"] for g in gen),
            "canvases": CANVASES,
            "generation": gen,
            "traces_total": traces(),
            "commit_build_s": commit_s,
            "prompt_build_s": prompt_s,
            "demo_tok_s": {k: v[0] for k, v in demo.items()},
            "demo_step_s": {k: v[1] for k, v in demo.items()},
            "demo_same_tokens": same,
            "replay_s_per_op": build_s / nodes[True],
            "python_build_s_per_op": build_un / nodes[False],
            # mx.fast's ops as one operation each (fast_ops_as_one): a Metal/CUDA host's graph
            "fast_ops_as_one": {
                "build_s": one_c,
                "build_uncompiled_s": one_u,
                "ratio": one_c / one_u,
                "build_median_s": statistics.median(one_times[True]),
                "build_uncompiled_median_s": statistics.median(one_times[False]),
                "nodes_per_step": one_nodes[True],
                "nodes_per_step_uncompiled": one_nodes[False],
            },
        },
    )
