"""Section profile: where one decoder step goes at the mid shape (module by module, LM head,
softcap, sampler), plus MoE-block strategies and single vocabulary-sized passes timed apart."""

import statistics
import time

from mlx_diffusiongemma.bench.common import GiB, random_prompt, say
from mlx_diffusiongemma.bench.shapes import FULL_TEXT

from .common import ensure_mid_checkpoint, timeit
from .step import (
    decoder_cache,
    loop_decode,
    per_layer_times,
    sampler_inputs,
    sampler_step,
    time_lm_head,
    time_sampler,
    timed_calls,
)


def expert_strategies(E, D, I, N, K, n=3):
    """Seconds of one MoE block (gate|up, GeGLU, down, weighted sum) for N tokens, top-K of E
    experts, float32: gathered matmuls over expert-pure tiles of rows (what the CPU runs,
    expert_tiles.py), gathered matmuls on rows sorted by expert (mlx-lm's SwitchLinear path, what
    Metal and CUDA run), unsorted gathered matmuls, dense all-expert matmuls (unchosen experts
    weighted 0) and a host loop of one GEMM per expert."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

    w1 = mx.random.normal((E, 2 * I, D)) * 0.02
    w2 = mx.random.normal((E, D, I)) * 0.02
    x = mx.random.normal((N, D))
    idx = mx.argsort(mx.random.uniform(shape=(N, E)), axis=-1)[:, :K].astype(mx.uint32)
    wts = mx.softmax(mx.random.normal((N, K)), axis=-1)
    mx.eval(w1, w2, x, idx, wts)

    def gathered(sort):
        xs = mx.expand_dims(x, (-2, -3))
        ii, inv = idx, None
        if sort:
            xs, ii, inv = _gather_sort(xs, idx)
        h = mx.gather_mm(xs, w1.swapaxes(-1, -2), rhs_indices=ii, sorted_indices=sort)
        h = nn.gelu_approx(h[..., :I]) * h[..., I:]
        y = mx.gather_mm(h, w2.swapaxes(-1, -2), rhs_indices=ii, sorted_indices=sort)
        if sort:
            y = _scatter_unsort(y, inv, idx.shape)
        return (y.squeeze(-2) * wts[..., None]).sum(-2)

    def tiled():
        from mlx_diffusiongemma.backends.expert_tiles import tile_rows, tiled_experts

        gm = lambda w: (
            lambda h, e: mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=e, sorted_indices=True)
        )
        act = lambda h: nn.gelu_approx(h[..., :I]) * h[..., I:]
        y = tiled_experts(x, idx, gm(w1), gm(w2), act, E, tile_rows(idx.size, E))
        return (y * wts[..., None]).sum(-2)

    def dense():
        h = (x @ w1.reshape(-1, D).T).reshape(N, E, 2 * I)
        h = nn.gelu_approx(h[..., :I]) * h[..., I:]
        y = h.transpose(1, 0, 2) @ w2.swapaxes(-1, -2)
        dw = mx.put_along_axis(mx.zeros((N, E)), idx.astype(mx.int32), wts, axis=-1)
        return (dw.T[:, :, None] * y).sum(0)

    def grouped():
        # rows sorted by expert, then one dense GEMM per expert over its contiguous rows; the
        # per-expert row counts come to the host (one sync per MoE block)
        order = mx.argsort(idx.flatten())
        sidx = idx.flatten()[order]
        counts = mx.zeros((E,), dtype=mx.int32).at[sidx].add(1)
        xs = x[order // K]
        mx.eval(xs, counts)
        ys, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                h = xs[start : start + c] @ w1[e].T
                h = nn.gelu_approx(h[:, :I]) * h[:, I:]
                ys.append(h @ w2[e].T)
                start += c
        y = mx.concatenate(ys)[mx.argsort(order)].reshape(N, K, D)
        return (y * wts[..., None]).sum(-2)

    flop = 2 * N * K * 3 * D * I
    out = {}
    for name, fn in (
        ("gathered, expert tiles", tiled),
        ("gathered, sorted", lambda: gathered(True)),
        ("gathered, unsorted", lambda: gathered(False)),
        ("dense, all experts", dense),
        ("grouped GEMM per expert (host loop)", grouped),
    ):
        if name.startswith("dense") and N * E * 2 * I * 4 > 2 * GiB:
            continue
        s = timeit(lambda: mx.eval(fn()), n)
        out[name] = dict(s=s, gflops=flop / s / 1e9)
    dense_flop = (
        2 * N * D * 2 * I
    )  # one expert-sized dense matmul of all N tokens, for the BLAS rate
    s = timeit(lambda: mx.eval(x @ w1[0].T), n)
    out["BLAS rate (dense N x D x 2I)"] = dict(s=s, gflops=dense_flop / s / 1e9)
    return out


def sampler_ops(V, C=256, n=3):
    """Seconds of single vocabulary-sized passes on (1, C, V) float32 logits."""
    import mlx.core as mx

    x = mx.random.normal((1, C, V)) * 4
    mx.eval(x)
    lse = mx.logsumexp(x, axis=-1, keepdims=True)
    mx.eval(lse)
    ops = {
        "divide by temperature": lambda: x / 0.6,
        "logsumexp": lambda: mx.logsumexp(x, axis=-1, keepdims=True),
        "exp(x - lse)": lambda: mx.exp(x - lse),
        "argmax": lambda: mx.argmax(x, axis=-1),
        "gumbel noise": lambda: mx.random.gumbel(x.shape, key=mx.random.key(1)),
        "uniform noise": lambda: mx.random.uniform(shape=x.shape, key=mx.random.key(1)),
        "softmax": lambda: mx.softmax(x, axis=-1),
        "cumsum (inverse-CDF sampling)": lambda: mx.cumsum(x, axis=-1),
        "tanh (softcap)": lambda: mx.tanh(x / 30.0) * 30.0,
    }
    return {k: timeit(lambda f=f: mx.eval(f()), n) for k, f in ops.items()}


def section_profile(opts, rep):
    import mlx.core as mx

    from mlx_diffusiongemma.loader import load_model

    rep.header(
        f"profile: where one decoder step goes, mid shape, float32, {opts.prompt}-token context"
    )
    path = ensure_mid_checkpoint(opts.workdir)
    model = load_model(path)
    args = model.args
    ids = mx.array([random_prompt(opts.prompt, args.vocab_size, opts.seed)], dtype=mx.int32)
    C = args.canvas_length
    canvas = mx.random.randint(0, args.vocab_size, (1, C), dtype=mx.int32)
    t_enc = timeit(lambda: model.encode(ids, model.make_cache()), 2)
    cache = model.encode(ids, model.make_cache())
    committed = mx.random.randint(0, args.vocab_size, (1, C), dtype=mx.int32)

    def commit():
        c = model.make_cache()
        model.encode(ids, c)
        t = time.perf_counter()
        model.encode(committed, c)
        return time.perf_counter() - t

    t_commit = statistics.median([commit() for _ in range(3)])
    t_canvas_kv = timeit(lambda: decoder_cache(cache, C), 3)
    dcache = decoder_cache(cache, C)
    logits = loop_decode(model, canvas, dcache)
    mx.eval(logits)
    temp, bound, key = sampler_inputs()
    _, soft = sampler_step(model, logits, temp, bound, key)
    mx.eval(soft)
    t_dec = timeit(lambda: mx.eval(loop_decode(model, canvas, dcache, soft)), opts.repeat)
    layer = model.layers[0]
    classes = {
        "attention (projections, norms, RoPE, SDPA)": type(layer.self_attn),
        "dense MLP": type(layer.mlp),
        "router": type(layer.router),
        "experts (MoE)": type(layer.experts),
        "self-conditioning MLP + post-norm": type(model.model.decoder.self_conditioning),
    }
    names = {v: k for k, v in classes.items()}

    def module_times():
        acc = {}
        with timed_calls(list(classes.values()), acc, key=lambda m: names[type(m)]):
            mx.eval(loop_decode(model, canvas, dcache, soft))
        return acc

    acc, acc2 = module_times(), module_times()
    acc = {k: min(acc[k], acc2.get(k, acc[k])) for k in acc}
    # the attention's four projections on their own (Linear calls inside attention modules)
    proj_ids = {
        id(getattr(l.self_attn, n))
        for l in model.layers
        for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        if n in l.self_attn
    }
    acc3 = {}
    lin = {type(getattr(layer.self_attn, "q_proj"))}
    with timed_calls(list(lin), acc3, key=lambda m: "proj" if id(m) in proj_ids else "other"):
        mx.eval(loop_decode(model, canvas, dcache, soft))
    att = "attention (projections, norms, RoPE, SDPA)"
    if att in acc and "proj" in acc3:
        acc["attention: q/k/v/o projections"] = acc3["proj"]
        acc["attention: norms, RoPE, K/V write, SDPA"] = max(acc.pop(att) - acc3["proj"], 0.0)
    lt, _ = per_layer_times(model, canvas, dcache, soft)
    t_head = time_lm_head(model, canvas, dcache, soft, opts.repeat)
    samp = time_sampler(model, logits, opts.repeat)
    parts = dict(acc)
    parts["layers: norms, residuals, other"] = max(
        sum(lt) - sum(v for k, v in acc.items() if not k.startswith("self-conditioning")), 0
    )
    parts["final norm + LM head matmul"] = t_head
    parts["sampler (softcap + denoise_sample)"] = samp["denoise_sample"]
    parts["self-conditioning probs @ embedding"] = samp["sc_matmul"]
    step = t_dec + samp["denoise_sample"] + samp["sc_total"]
    say(
        f"  decoder forward {t_dec * 1e3:.0f} ms (layers {sum(lt) * 1e3:.0f} ms: "
        + ", ".join(f"{x * 1e3:.0f}" for x in lt)
        + f"); + sampler and self-conditioning = {step * 1e3:.0f} ms per step"
    )
    say(f"  {'part':<46} {'ms/step':>8} {'share':>7}")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        say(f"  {k:<46} {v * 1e3:>8.1f} {v / step:>7.1%}")
    say(
        f"  per canvas: prefix K/V buffers {t_canvas_kv * 1e3:.1f} ms, committing the canvas to the prompt "
        f"cache {t_commit * 1e3:.0f} ms; prompt encode {opts.prompt} tokens {t_enc * 1e3:.0f} ms "
        f"({opts.prompt / t_enc:.0f} tok/s)"
    )
    say(
        "  (module times are measured with each module's output evaluated on its own, which removes "
        "some overlap; their sum is within a few % of the forward)"
    )
    experts_mid = expert_strategies(
        args.num_experts, args.hidden_size, args.moe_intermediate_size, C, args.top_k_experts
    )
    experts_full = expert_strategies(
        FULL_TEXT["num_experts"],
        FULL_TEXT["hidden_size"],
        FULL_TEXT["moe_intermediate_size"],
        C,
        FULL_TEXT["top_k_experts"],
        n=2,
    )
    for label, ex in (
        (
            "mid (E=%d, D=%d, I=%d)"
            % (args.num_experts, args.hidden_size, args.moe_intermediate_size),
            experts_mid,
        ),
        ("full (E=128, D=2816, I=704)", experts_full),
    ):
        say(
            f"  MoE block, {C} tokens top-8, {label}: "
            + "; ".join(
                f"{k} {v['s'] * 1e3:.0f} ms ({v['gflops']:.0f} GFLOP/s)" for k, v in ex.items()
            )
        )
    ops_mid = sampler_ops(args.vocab_size)
    say(
        f"  one pass over (1, {C}, {args.vocab_size}) float32: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in ops_mid.items())
    )
    rep.save(
        "profile",
        dict(
            decode_s=t_dec,
            step_s=step,
            parts=parts,
            layer_s=lt,
            encode_s=t_enc,
            commit_s=t_commit,
            canvas_kv_s=t_canvas_kv,
            experts_mid=experts_mid,
            experts_full=experts_full,
            sampler_ops=ops_mid,
            prompt=opts.prompt,
        ),
    )


# ---------------------------------------------------------------------------------------------
