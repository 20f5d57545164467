"""Sections at the full model's width: build (the 30-layer model, mixed 4-bit, measured),
fullwidth (activation peak, step time and sampler share at reduced depth, extrapolated to 30
layers) and gpu-step (one full-shape denoising step on a GPU, in parts). The weights' analytic
bytes and whole generation on a GPU are the package's: `python -m mlx_diffusiongemma.benchmark
weights` / `gpu`."""

import statistics
import time

from mlx_diffusiongemma.bench.common import GB, GiB, random_prompt, say
from mlx_diffusiongemma.bench.models import (
    build_random_quantized,
    default_quant,
    gpu_section_args,
    make_args,
    param_bytes,
    recipe_bytes,
)
from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, FULL_TEXT, TARGETS, VLLM_H100

from .common import build_random_float, layer_counts, mem_available, rss_bytes, timeit
from .step import (
    by_kind,
    canvas_kv_layers,
    decoder_cache,
    kv_bytes,
    loop_decode,
    per_layer_times,
    sampler_inputs,
    sampler_step,
    time_lm_head,
    time_sampler,
)


# ---------------------------------------------------------------------------------------------
# section: build (full shape, mixed 4-bit, random weights)
# ---------------------------------------------------------------------------------------------
def section_build(opts, rep):
    import mlx.core as mx

    rep.header("build: full-shape model, random weights directly quantized (mixed 4-bit)")
    args = make_args(FULL_TEXT, layers=opts.layers)
    default = default_quant(4)
    expected, _ = recipe_bytes(args, "mixed", 4)
    avail = mem_available()
    if avail is not None and avail < expected + 2 * GiB and not opts.force:
        say(
            f"  skipped: needs ~{(expected + 2 * GiB) / GiB:.1f} GiB free, {avail / GiB:.1f} GiB available "
            "(--force to try anyway)"
        )
        return None
    mx.reset_peak_memory()
    rss0 = rss_bytes()
    t = time.perf_counter()
    model = build_random_quantized(args, default, "mixed")
    dt = time.perf_counter() - t
    nbytes = param_bytes(model)
    active, peak = mx.get_active_memory(), mx.get_peak_memory()
    rss, hwm = rss_bytes(), rss_bytes("VmHWM")
    say(f"  {args.num_hidden_layers} layers built in {dt:.0f} s")
    say(
        f"  parameter bytes {nbytes:,} ({nbytes / GB:.2f} GB, {nbytes / GiB:.2f} GiB); analytic {expected:,} "
        f"({'equal' if nbytes == expected else f'differs by {nbytes - expected:+,}'})"
    )
    say(
        f"  MLX active {active / GB:.2f} GB, MLX peak while building {peak / GB:.2f} GB, process RSS "
        f"{rss / GB:.2f} GB (high-water {hwm / GB:.2f} GB, {rss0 / GB:.2f} GB before)"
        if rss
        else ""
    )
    figures = dict(
        layers=args.num_hidden_layers,
        seconds=dt,
        param_bytes=nbytes,
        analytic_bytes=expected,
        mlx_active=active,
        mlx_peak=peak,
        rss=rss,
        rss_hwm=hwm,
    )
    rep.save("build", figures)
    return model


# ---------------------------------------------------------------------------------------------
# section: fullwidth (activation peak, step time, sampler share; reduced depth, extrapolated)
# ---------------------------------------------------------------------------------------------
def section_fullwidth(opts, rep):
    import mlx.core as mx

    rep.header(
        f"fullwidth: full width, {opts.layers} layers, {opts.prompt}-token prompt, one decoder step "
        f"on a {FULL_CANVAS}-token canvas"
    )
    args = make_args(FULL_TEXT, layers=opts.layers)
    full = make_args(FULL_TEXT)
    dtype = mx.float32 if opts.dtype == "float32" else mx.bfloat16
    Ls, Lf = layer_counts(args)
    S30, F30 = layer_counts(full)
    mx.random.seed(0)
    t = time.perf_counter()
    model = build_random_float(args, dtype)
    W = param_bytes(model)
    say(
        f"  weights: {W / GB:.2f} GB ({opts.dtype}), {Ls} sliding + {Lf} full layers, built in "
        f"{time.perf_counter() - t:.0f} s"
    )
    mx.clear_cache()
    ids = mx.array([random_prompt(opts.prompt, args.vocab_size)], dtype=mx.int32)
    canvas = mx.random.randint(0, args.vocab_size, (1, FULL_CANVAS), dtype=mx.int32)
    mx.eval(ids, canvas)

    # 1. encode (prefill) the prompt in chunks
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = model.make_cache()
    t = time.perf_counter()
    model.encode(ids, cache, step=opts.chunk)
    t_enc = time.perf_counter() - t
    peak_enc = mx.get_peak_memory()
    kv_layers = [kv_bytes(*cache.fetch(i)) for i in range(args.num_hidden_layers)]
    KV = sum(kv_layers)
    kv_s, kv_f = by_kind(kv_layers, args)
    # What the cache really holds can exceed its arrays' sizes: an array sliced out of a larger
    # one (the sliding layers' trim) keeps the larger buffer alive.
    KV_held = mx.get_active_memory() - base
    pinned = max(KV_held - KV, 0)
    say(
        f"  encode: {opts.prompt} tokens in chunks of {opts.chunk}: {t_enc:.1f} s ({opts.prompt / t_enc:.0f} tok/s); "
        f"prompt K/V {KV / GB:.3f} GB (sliding layer {max(kv_s, default=0) / 1e6:.1f} MB, full layer "
        f"{max(kv_f, default=0) / 1e6:.1f} MB); memory held after encoding {KV_held / GB:.3f} GB "
        f"({pinned / GB:.3f} GB more than the K/V arrays: buffers kept alive by trimmed views)"
    )

    # 2. one decoder step, as the denoising loop runs it (per-canvas K/V buffers, then decode)
    mx.reset_peak_memory()
    a0 = mx.get_active_memory()
    dcache = decoder_cache(cache, FULL_CANVAS)
    copy = mx.get_active_memory() - a0
    t = time.perf_counter()
    logits = loop_decode(model, canvas, dcache)
    mx.eval(logits)
    t_first = time.perf_counter() - t
    peak_dec = mx.get_peak_memory()
    # 3. sampler and self-conditioning of that step, logits and buffers still held
    mx.reset_peak_memory()
    temp, bound, key = sampler_inputs()
    new_canvas, soft = sampler_step(model, logits, temp, bound, key)
    mx.eval(new_canvas, soft)
    peak_samp = mx.get_peak_memory()
    # 4. a second step with self-conditioning (the steady state)
    mx.reset_peak_memory()
    logits2 = loop_decode(model, new_canvas, dcache, soft)
    mx.eval(logits2)
    peak_dec2 = mx.get_peak_memory()
    del logits2
    tr_enc = peak_enc - base - KV_held
    tr_dec = max(peak_dec, peak_dec2) - a0 - copy
    tr_samp = peak_samp - a0 - copy
    say(
        f"  peak over weights+prompt cache: encode {tr_enc / GB:.3f} GB, decoder step {tr_dec / GB:.3f} GB "
        f"(+ per-canvas K/V buffers {copy / GB:.3f} GB), sampler+self-conditioning {tr_samp / GB:.3f} GB"
    )

    # timings
    n = opts.repeat
    t_dec = timeit(lambda: mx.eval(loop_decode(model, new_canvas, dcache, soft)), n)
    lt, t_scmlp = per_layer_times(model, new_canvas, dcache, soft)
    lt_s, lt_f = by_kind(lt, args)
    t_s = statistics.mean(lt_s) if Ls else 0.0
    t_f = statistics.mean(lt_f)
    t_head = time_lm_head(model, new_canvas, dcache, soft, n)
    # The layers' share of the forward (time outside the LM head and the self-conditioning MLP)
    # is split between sliding and full layers in the proportion of their own timings.
    t_layers = max(t_dec - t_head - t_scmlp, 0.0)
    scale = t_layers / sum(lt) if sum(lt) else 1.0
    t_s, t_f = t_s * scale, t_f * scale
    step30 = t_head + t_scmlp + S30 * t_s + F30 * t_f
    samp = time_sampler(model, logits, n)
    say(
        f"  decoder step ({opts.layers} layers): {t_dec * 1e3:.0f} ms = final norm + LM head {t_head * 1e3:.0f} "
        f"+ self-conditioning MLP {t_scmlp * 1e3:.0f} + layers {t_layers * 1e3:.0f} (sliding {t_s * 1e3:.0f} ms, "
        f"full {t_f * 1e3:.0f} ms)"
    )
    say(
        f"  decoder step scaled to {S30}+{F30} layers: {step30 * 1e3:.0f} ms "
        f"(= {t_head * 1e3:.0f} + {t_scmlp * 1e3:.0f} + {S30} x {t_s * 1e3:.0f} + {F30} x {t_f * 1e3:.0f})"
    )
    say(
        f"  sampler at vocab {args.vocab_size}, canvas {FULL_CANVAS}: {samp['total'] * 1e3:.0f} ms in all = "
        f"denoise_sample (softcap, self-conditioning probabilities) {samp['denoise_sample'] * 1e3:.0f} ms "
        f"+ probs @ embedding {samp['sc_matmul'] * 1e3:.0f} ms (parts timed apart)"
    )
    if "denoise_sample_bf16_probs" in samp:
        b = samp["denoise_sample_bf16_probs"]
        say(
            f"  with bf16 self-conditioning probabilities (a bf16 or quantized checkpoint): denoise_sample "
            f"{b * 1e3:.0f} ms; share of a 30-layer step {(b + samp['sc_total']) / (step30 + b + samp['sc_total']):.1%}"
        )
    share = samp["total"] / (step30 + samp["total"])
    share_ns = samp["denoise_sample"] / (step30 + samp["total"])
    share_cap = samp["total"] / (t_dec + samp["total"])
    tgt = TARGETS["sampler_share"]
    say(
        f"  sampler share of a 30-layer step (decoder + sampler + self-conditioning): {share:.1%} "
        f"(denoise_sample alone {share_ns:.1%}; at {opts.layers} layers {share_cap:.1%}); "
        f"target <= {tgt:.0%}: {'met' if share <= tgt else 'missed'} by {abs(share - tgt) * 100:.1f} points"
    )

    # memory extrapolation to 30 layers, bf16 activations and K/V, mixed 4-bit weights
    W30 = recipe_bytes(full, "mixed", 4)[0]
    f_kv = 2 / dtype.size  # K/V in bf16 on the real model
    kv30 = (
        f_kv * (S30 * statistics.mean(kv_s) + F30 * statistics.mean(kv_f))
        if kv_s
        else f_kv * 30 * statistics.mean(kv_f)
    )
    pinned30 = (
        f_kv * pinned * S30 / Ls if Ls else 0.0
    )  # the extra is the sliding layers' (full layers are not trimmed)
    cs, cf = by_kind(canvas_kv_layers(dcache), args)
    copy30 = f_kv * (S30 * (statistics.mean(cs) if cs else 0) + F30 * statistics.mean(cf))
    tr = max(tr_enc, tr_dec, tr_samp)
    peak30 = W30 + kv30 + pinned30 + copy30 + tr
    peak30_enc = W30 + kv30 + pinned30 + tr_enc
    peak30_dec = W30 + kv30 + pinned30 + copy30 + max(tr_dec, tr_samp)
    tgt = TARGETS["peak_4096_gb"]
    say(
        f"  extrapolated peak, 30 layers, mixed 4-bit weights {W30 / GB:.2f} GB + prompt K/V {kv30 / GB:.3f} GB (bf16) "
        f"+ pinned by trimmed views {pinned30 / GB:.3f} GB + per-canvas K/V buffers {copy30 / GB:.3f} GB + largest transient {tr / GB:.3f} GB "
        f"(measured, {opts.dtype}) = {peak30 / GB:.2f} GB ({peak30 / GiB:.2f} GiB); prefill alone "
        f"{peak30_enc / GB:.2f} GB, denoising {peak30_dec / GB:.2f} GB"
    )
    say(
        f"  target <= {tgt:.0f} GB peak with a {opts.prompt}-token prompt: {'met' if peak30 / GB <= tgt else 'missed'} "
        f"by {abs(tgt - peak30 / GB):.2f} GB"
    )
    figures = dict(
        layers=opts.layers,
        prompt=opts.prompt,
        chunk=opts.chunk,
        dtype=opts.dtype,
        weights=W,
        encode_s=t_enc,
        prompt_kv=KV,
        prompt_cache_held=KV_held,
        pinned=pinned,
        kv_layers=kv_layers,
        canvas_kv=copy,
        peak_encode=peak_enc,
        peak_decode=peak_dec,
        peak_decode_sc=peak_dec2,
        peak_sampler=peak_samp,
        transient_encode=tr_enc,
        transient_decode=tr_dec,
        transient_sampler=tr_samp,
        decode_s=t_dec,
        first_decode_s=t_first,
        layer_s=lt,
        sliding_layer_s=t_s,
        full_layer_s=t_f,
        lm_head_s=t_head,
        sc_mlp_s=t_scmlp,
        step30_s=step30,
        sampler=samp,
        sampler_share=share,
        weights30_mixed4=W30,
        kv30=kv30,
        pinned30=pinned30,
        canvas_kv30=copy30,
        peak30=peak30,
    )
    rep.save("fullwidth", figures)
    return figures


# ---------------------------------------------------------------------------------------------
# section: gpu-step (full shape, one denoising step in parts)
# ---------------------------------------------------------------------------------------------
def section_gpu_step(opts, rep):
    import mlx.core as mx

    title = "gpu-step: one full-shape denoising step on a GPU, in parts"
    args = gpu_section_args(rep, title, opts.shape, opts.layers, opts.vocab, opts.allow_cpu)
    if args is None:
        return None
    rep.header(
        f"gpu-step: {opts.shape} shape, {args.num_hidden_layers} layers, vocab {args.vocab_size}, "
        f"mixed 4-bit, {opts.prompt}-token prompt"
    )
    t = time.perf_counter()
    model = build_random_quantized(args, default_quant(4), "mixed", verbose=False)
    W = param_bytes(model)
    say(f"  weights {W / GB:.3f} GB, built in {time.perf_counter() - t:.0f} s")
    V, C = args.vocab_size, args.canvas_length
    prompt = mx.array([random_prompt(opts.prompt, V, opts.seed)], dtype=mx.int32)
    # warm-up: kernels for the prefill chunk shapes
    model.encode(prompt[:, : min(opts.chunk, opts.prompt)], model.make_cache(), step=opts.chunk)
    cache = model.make_cache()
    t = time.perf_counter()
    model.encode(prompt, cache, step=opts.chunk)
    t_prefill = time.perf_counter() - t
    dcache = decoder_cache(cache, C)
    canvas = mx.random.randint(0, V, (1, C), dtype=mx.int32)
    t_dec = timeit(lambda: mx.eval(loop_decode(model, canvas, dcache)), opts.repeat, warmup=2)
    logits = loop_decode(model, canvas, dcache)
    temp, bound, key = sampler_inputs()
    _, soft = sampler_step(model, logits, temp, bound, key)
    mx.eval(logits, soft)

    def full_step():
        lg = loop_decode(model, canvas, dcache, soft)
        mx.eval(sampler_step(model, lg, temp, bound, key))

    t_step = timeit(full_step, opts.repeat, warmup=2)
    samp = time_sampler(model, logits, opts.repeat)
    say(
        f"  prefill: {opts.prompt} tokens in {t_prefill * 1e3:.0f} ms = {opts.prompt / t_prefill:.0f} tok/s"
    )
    say(
        f"  decoder step latency (forward, logits) {t_dec * 1e3:.1f} ms; full step with sampler and "
        f"self-conditioning {t_step * 1e3:.1f} ms (sampler {samp['denoise_sample'] * 1e3:.1f} ms, "
        f"self-conditioning {samp['sc_total'] * 1e3:.1f} ms: {samp['total'] / t_step:.1%} of the step)"
    )
    say(f"  vLLM H100 FP8 (bs 1, 16 steps, 4096 in): {VLLM_H100['step_ms']} ms/step")
    rep.save(
        "gpu-step",
        dict(
            layers=args.num_hidden_layers,
            vocab=V,
            weights=W,
            prefill_s=t_prefill,
            prefill_tps=opts.prompt / t_prefill,
            decode_step_s=t_dec,
            full_step_s=t_step,
            sampler=samp,
        ),
    )
