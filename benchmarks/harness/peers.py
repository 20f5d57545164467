"""Section peers: at the mid shape, our generation vs the transformers reference (in a child
process: `_reference`), mlx-vlm's DiffusionGemma and the same network run autoregressively by
mlx-lm."""

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from mlx_diffusiongemma.bench.common import GB, ROOT, random_prompt, say
from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, MID_TEXT, NO_STOP, TARGETS

from . import ENTRY
from .common import ensure_mid_checkpoint, release, rss_bytes, timeit
from .step import decoder_cache, fixed_steps


# ---------------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------------
def run_ours(path, ids, max_tokens, steps, warm=True):
    """Our stream_generate at `steps` fixed denoising steps per canvas (early stop disabled, no
    EOS); the seconds between successive denoising steps come from draft_callback."""
    import mlx.core as mx

    from mlx_diffusiongemma.loader import load_model

    model = load_model(path)
    V = model.args.vocab_size
    if warm:  # compiles the sampler graph and warms the allocator
        fixed_steps(model, ids[:64], FULL_CANVAS, 2, seed=1)
    marks = []
    t = time.perf_counter()
    r = fixed_steps(
        model,
        ids,
        max_tokens,
        steps,
        seed=0,
        draft_callback=lambda d: marks.append((d.canvas, time.perf_counter())),
    )
    total = time.perf_counter() - t
    intervals = [b[1] - a[1] for a, b in zip(marks, marks[1:]) if a[0] == b[0]]
    # isolated decoder forward (logits evaluated), per-canvas buffers reused as in the loop
    cache = model.encode(mx.array([ids], dtype=mx.int32), model.make_cache())
    dcache = decoder_cache(cache, model.args.canvas_length)
    canvas = mx.random.randint(0, V, (1, model.args.canvas_length), dtype=mx.int32)
    t_dec = timeit(lambda: mx.eval(model.decode(canvas, dcache)), 3)
    out = dict(
        prompt_tps=r.prompt_tps,
        generation_tokens=r.generation_tokens,
        generation_tps=r.generation_tps,
        decoder_forwards=r.decoder_forwards,
        step_s=statistics.median(intervals),
        decode_forward_s=t_dec,
        peak_gb=r.peak_memory,
        total_s=total,
    )
    del model, cache, dcache
    release()
    return out


# ---------------------------------------------------------------------------------------------
# mlx-vlm
# ---------------------------------------------------------------------------------------------
def mlx_vlm_copy(path, steps):
    """A copy of the checkpoint folder for mlx-vlm: its config reader does not know
    `per_layer_config`, so the full-attention shapes go in as global_head_dim /
    num_global_key_value_heads; the weights are linked. Its generation_config holds the
    reference sampler's defaults with early stopping disabled."""
    dst = Path(str(path) + "-mlx-vlm")
    dst.mkdir(exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    tc = cfg["text_config"]
    plc = tc.pop("per_layer_config", None) or {}
    for key, over in plc.items():
        if "head_dim" in over:
            tc["global_head_dim"] = over["head_dim"]
        if "num_key_value_heads" in over:
            tc["num_global_key_value_heads"] = over["num_key_value_heads"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = dict(
        max_denoising_steps=steps,
        confidence_threshold=NO_STOP,
        stability_threshold=1,
        t_min=0.4,
        t_max=0.8,
        sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    )
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=1))
    for f in path.glob("*.safetensors*"):
        link = dst / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    return dst


class _Detokenizer:
    last_segment = ""

    def reset(self):
        pass

    def add_token(self, token, skip_special_token_ids=None):
        pass

    def finalize(self):
        pass


class _NoTokenizer:
    """What mlx-vlm's diffusion loop needs of a tokenizer when no text is produced: no EOS."""

    detokenizer = _Detokenizer()

    @staticmethod
    def stopping_criteria(token):
        return False


def run_mlx_vlm(path, ids, max_tokens, steps, warm=True):
    """mlx-vlm 0.7.10's DiffusionGemma: its entropy-bound sampler at temperature 1 (a categorical
    draw per position, as ours and the reference do), `steps` denoising steps per canvas, its
    stable-and-confident stop made unreachable (confidence threshold 1e-30)."""
    import mlx.core as mx

    try:
        from mlx_vlm.generate.diffusion import stream_diffusion_generate
        from mlx_vlm.utils import load_model as vlm_load_model
    except ImportError as e:
        return {
            "error": f"mlx-vlm not importable ({e}); pip install mlx-vlm==0.7.10 --no-deps, requests, Pillow"
        }
    import mlx_vlm

    vpath = mlx_vlm_copy(path, steps)
    model = vlm_load_model(vpath)
    tok = _NoTokenizer()
    marks = []
    orig = model.diffusion_decoder_logits

    def decoder_logits(*a, **k):
        marks.append(time.perf_counter())
        return orig(*a, **k)

    model.diffusion_decoder_logits = decoder_logits

    def gen(prompt, n_tokens, n_steps):
        last = None
        for last in stream_diffusion_generate(
            model,
            tok,
            tok,
            mx.array([prompt]),
            None,
            None,
            max_tokens=n_tokens,
            skip_special_token_ids=[],
            temperature=1.0,
            max_denoising_steps=n_steps,
            diffusion_sampler="entropy-bound",
        ):
            pass
        return last

    if warm:
        gen(ids[:64], FULL_CANVAS, 2)
    marks.clear()
    mx.reset_peak_memory()
    t = time.perf_counter()
    r = gen(ids, max_tokens, steps)
    total = time.perf_counter() - t
    # decoder calls are timestamped when their graphs are built; mlx-vlm evaluates a step at its
    # stop test, so the spacing of calls within a canvas is its per-step time (its first two steps
    # of a canvas are evaluated together, so those are left out)
    per_canvas = [marks[i : i + steps] for i in range(0, len(marks), steps)]
    intervals = [b - a for c in per_canvas for a, b in list(zip(c, c[1:]))[1:]]
    out = dict(
        version=getattr(mlx_vlm, "__version__", "?"),
        prompt_tps=r.prompt_tps,
        generation_tokens=r.generation_tokens,
        generation_tps=r.generation_tps,
        decoder_forwards=int(r.diffusion_denoising_steps),
        step_s=statistics.median(intervals),
        peak_gb=r.peak_memory,
        total_s=total,
    )
    # isolated decoder forward
    cache = model.diffusion_prefill_cache(mx.array([ids]))
    mx.eval([c.state for c in cache])
    canvas = mx.random.randint(0, model.config.text_config.vocab_size, (1, FULL_CANVAS)).astype(
        mx.int32
    )
    masks = model.diffusion_decoder_masks(canvas, cache, None)
    out["decode_forward_s"] = timeit(
        lambda: mx.eval(
            orig(canvas, cache=cache, self_conditioning=None, decoder_attention_mask=masks)
        ),
        3,
    )
    del model, cache
    release()
    return out


# ---------------------------------------------------------------------------------------------
# mlx-lm, autoregressive
# ---------------------------------------------------------------------------------------------
def mlx_lm_autoregressive(path):
    """mlx-lm's gemma4_text built from the checkpoint's config (MoE block on, no per-layer inputs,
    no shared K/V) with the decoder's weights: the same network run autoregressively."""
    import mlx.core as mx
    from mlx_lm.models import gemma4_text

    from mlx_diffusiongemma.config import ModelArgs
    from mlx_diffusiongemma.loader import load_weights_lazily

    cfg = json.loads((path / "config.json").read_text())
    a = ModelArgs.from_config(cfg)
    full = [i for i in range(a.num_hidden_layers) if not a.is_sliding(i)]
    lm_args = gemma4_text.ModelArgs(
        model_type="gemma4_text",
        hidden_size=a.hidden_size,
        num_hidden_layers=a.num_hidden_layers,
        intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_attention_heads,
        head_dim=a.head_dim,
        global_head_dim=a.layer_head_dims[full[0]],
        rms_norm_eps=a.rms_norm_eps,
        vocab_size=a.vocab_size,
        vocab_size_per_layer_input=a.vocab_size,
        num_key_value_heads=a.num_key_value_heads,
        num_global_key_value_heads=a.layer_kv_heads[full[0]],
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        sliding_window=a.sliding_window,
        layer_types=list(a.layer_types),
        attention_k_eq_v=True,
        final_logit_softcapping=a.final_logit_softcapping,
        use_double_wide_mlp=False,
        enable_moe_block=True,
        num_experts=a.num_experts,
        top_k_experts=a.top_k_experts,
        moe_intermediate_size=a.moe_intermediate_size,
        rope_parameters=dict(a.rope_parameters),
        max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=True,
    )
    lm = gemma4_text.Model(lm_args)
    weights = {}
    for k, v in load_weights_lazily(path).items():
        if k.startswith("model.decoder.") and not k.startswith("model.decoder.self_conditioning."):
            weights["model." + k[len("model.decoder.") :]] = v
    lm.load_weights(list(lm.sanitize(weights).items()), strict=True)
    mx.eval(lm.parameters())
    lm.eval()
    return lm


def run_autoregressive(path, ids, n_tokens):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    lm = mlx_lm_autoregressive(path)
    for _ in zip(range(8), generate_step(mx.array(ids[:64]), lm, max_tokens=8)):
        pass
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for n, _ in enumerate(generate_step(mx.array(ids), lm, max_tokens=n_tokens), start=1):
        if first is None:
            first = time.perf_counter()
        last = time.perf_counter()
    out = dict(
        prompt_tps=len(ids) / (first - t0),
        tokens=n,
        decode_tps=(n - 1) / (last - first),
        peak_gb=mx.get_peak_memory() / GB,
    )
    del lm
    release()
    return out


# ---------------------------------------------------------------------------------------------
# the transformers reference (child process)
# ---------------------------------------------------------------------------------------------
def run_reference_child(path, prompt_len, max_tokens, steps, seed, vocab, malloc=False):
    """The transformers reference, in a child process without LD_PRELOAD (see the package doc);
    `malloc`: with the malloc thresholds our load_model sets (cpu_memory.py)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["DG_BENCH_REEXEC"] = "1"
    cmd = [
        *ENTRY,
        "_reference",
        "--path",
        str(path),
        "--prompt",
        str(prompt_len),
        "--max-tokens",
        str(max_tokens),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--vocab",
        str(vocab),
    ] + (["--reference-malloc"] if malloc else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("JSON "):
            return json.loads(line[5:])
    return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}


def reference_main(opts):
    """Child: DiffusionGemmaForBlockDiffusion.generate at `steps` denoising steps, early stop off."""
    if opts.reference_malloc:
        from mlx_diffusiongemma.backends.cpu_memory import set_malloc_thresholds

        set_malloc_thresholds()
    import torch
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(opts.path, dtype=torch.float32).eval()
    ids = random_prompt(opts.prompt, opts.vocab, opts.seed)
    enc_times = []

    def pre(mod, args, kwargs):
        enc_times.append([time.perf_counter(), None])

    def post(mod, args, kwargs, out):
        enc_times[-1][1] = time.perf_counter()

    model.model.encoder.register_forward_pre_hook(pre, with_kwargs=True)
    model.model.encoder.register_forward_hook(post, with_kwargs=True)
    fwd_times = []
    forward = model.forward  # generate() calls self.forward for every decoder step

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        fwd_times.append(time.perf_counter() - t)
        return out

    model.forward = timed_forward

    class Marks:
        def __init__(self):
            self.drafts = []

        def put(self, value):
            self.drafts.append(None)  # canvas boundary

        def put_draft(self, value=None, logits=None):
            self.drafts.append(time.perf_counter())

        def end(self):
            pass

    def gen(prompt, n_tokens, n_steps, streamer=None):
        with torch.no_grad():
            return model.generate(
                torch.tensor([prompt]),
                max_new_tokens=n_tokens,
                max_denoising_steps=n_steps,
                confidence_threshold=NO_STOP,
                stability_threshold=1,
                eos_token_id=[-1],
                streamer=streamer,
            )

    gen(ids[:64], FULL_CANVAS, 2)  # warm-up
    enc_times.clear()
    fwd_times.clear()
    marks = Marks()
    t = time.perf_counter()
    out = gen(ids, opts.max_tokens, opts.steps, marks)
    total = time.perf_counter() - t
    prefill = enc_times[0][1] - enc_times[0][0]
    n_new = out.sequences.shape[1] - len(ids)
    intervals = [
        b - a for a, b in zip(marks.drafts, marks.drafts[1:]) if a is not None and b is not None
    ]
    res = dict(
        version=transformers.__version__,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        prompt_tps=len(ids) / prefill,
        generation_tokens=int(n_new),
        generation_tps=n_new / (total - prefill),
        step_s=statistics.median(intervals),
        decoder_forwards=len([d for d in marks.drafts if d is not None]),
        total_s=total,
        decode_forward_s=statistics.median(fwd_times) if fwd_times else None,
        peak_gb=(rss_bytes("VmHWM") or 0) / GB,
        peak_is_rss=True,
    )
    print("JSON " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# section: peers
# ---------------------------------------------------------------------------------------------
def section_peers(opts, rep):
    rep.header(
        f"peers: mid-size random checkpoint, {opts.prompt}-token prompt, {opts.max_tokens} new tokens, "
        f"{opts.steps} fixed denoising steps per canvas, float32"
    )
    path = ensure_mid_checkpoint(opts.workdir)
    say(f"  checkpoint {path}: " + ", ".join(f"{k}={v}" for k, v in MID_TEXT.items()))
    cfg = json.loads((path / "config.json").read_text())
    vocab = cfg["text_config"]["vocab_size"]
    ids = random_prompt(opts.prompt, vocab, opts.seed)
    res = {}
    skip = set(opts.skip or [])
    # each implementation's model is released before the next one runs: it must not count in its peak
    if "ours" not in skip:
        say("  running ours (stream_generate) ...")
        res["ours"] = run_ours(path, ids, opts.max_tokens, opts.steps)
        release()
    if "mlx-vlm" not in skip:
        say("  running mlx-vlm ...")
        res["mlx-vlm"] = run_mlx_vlm(path, ids, opts.max_tokens, opts.steps)
        release()
    if "ar" not in skip:
        say("  running mlx-lm gemma4_text autoregressive ...")
        res["mlx-lm AR"] = run_autoregressive(path, ids, opts.ar_tokens)
        release()
    if "reference" not in skip:
        say("  running the transformers reference (child process, no LD_PRELOAD) ...")
        res["reference"] = run_reference_child(
            path, opts.prompt, opts.max_tokens, opts.steps, opts.seed, vocab
        )
        if opts.reference_malloc:
            say("  running the reference again with our malloc thresholds (cpu_memory.py) ...")
            res["reference, our malloc"] = run_reference_child(
                path, opts.prompt, opts.max_tokens, opts.steps, opts.seed, vocab, malloc=True
            )

    say(
        f"  {'implementation':<22} {'step ms':>8} {'fwd ms':>8} {'gen tok/s':>10} {'prefill tok/s':>14} "
        f"{'steps':>6} {'peak GB':>8}"
    )
    for name in ("ours", "reference", "reference, our malloc", "mlx-vlm"):
        r = res.get(name)
        if not r:
            continue
        if "error" in r:
            say(f"  {name:<22} error: {r['error']}")
            continue
        fwd = r.get("decode_forward_s")
        say(
            f"  {name:<22} {r['step_s'] * 1e3:>8.0f} {fwd * 1e3 if fwd else float('nan'):>8.0f} "
            f"{r['generation_tps']:>10.2f} {r['prompt_tps']:>14.0f} {r['decoder_forwards']:>6} "
            f"{r.get('peak_gb', float('nan')):>8.2f}"
        )
    ar = res.get("mlx-lm AR")
    if ar and "error" not in ar:
        say(
            f"  {'mlx-lm AR (gemma4)':<22} {1e3 / ar['decode_tps']:>8.1f} {'':>8} {ar['decode_tps']:>10.2f} "
            f"{ar['prompt_tps']:>14.0f} {ar['tokens']:>6} {ar['peak_gb']:>8.2f}"
        )
    say(
        "  (step ms: time per denoising step inside whole generation, sampler included; fwd ms: one "
        "decoder forward with its logits; gen tok/s: new tokens / generation time after prefill; peak: "
        "MLX peak memory of the measured generation, for the reference the child process's peak RSS)"
    )
    ours = res.get("ours")
    ratios = {}
    if ours:
        for name, key, tgt in (
            ("mlx-vlm", "vs_mlx_vlm", TARGETS["vs_mlx_vlm"]),
            ("reference", "vs_reference", TARGETS["vs_reference"]),
            ("reference, our malloc", "vs_reference_our_malloc", TARGETS["vs_reference"]),
        ):
            r = res.get(name)
            if r and "error" not in r:
                g = ours["generation_tps"] / r["generation_tps"]
                s = r["step_s"] / ours["step_s"]
                ratios[key] = g
                verdict = "met" if (g >= tgt if tgt > 1 else g > tgt) else "missed"
                say(
                    f"  ours / {name}: whole-generation tok/s x{g:.2f}, step time x{s:.2f} faster; "
                    f"target {'>= %.0fx' % tgt if tgt > 1 else 'faster'}: {verdict}"
                )
        if ar and "error" not in ar:
            g = ours["generation_tps"] / ar["decode_tps"]
            ratios["vs_autoregressive"] = g
            tgt = TARGETS["vs_autoregressive"]
            say(
                f"  ours diffusion ({opts.steps} steps) / mlx-lm AR decode tok/s: x{g:.2f}; target >= {tgt:.0f}x: "
                f"{'met' if g >= tgt else 'missed'}"
            )
    rep.save(
        "peers",
        {
            "results": res,
            "ratios": ratios,
            "prompt": opts.prompt,
            "max_tokens": opts.max_tokens,
            "steps": opts.steps,
            "shape": MID_TEXT,
        },
    )
    return res
