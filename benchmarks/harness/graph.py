"""Section `graph`: how long Python takes to build one denoising step's graph at full shape.

On Metal and CUDA a step is a few milliseconds of device time, so the host's graph building
(30 layers of MLX calls) is of the same order; the loop builds step t+1 while the device runs
step t (generation.denoise_canvas). This measures the building alone: the full 30-layer model in
the mixed 4-bit recipe, its weights never evaluated (nothing is computed, so it runs anywhere in a
second), traced through the Metal/CUDA code path (the default backend, backends/)."""

import time

from mlx_diffusiongemma.bench.common import say
from mlx_diffusiongemma.bench.models import default_quant, make_args, quantize_structure
from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, FULL_TEXT


def section_graph(opts, rep):
    import mlx.core as mx

    from mlx_diffusiongemma.backends import DEFAULT, using
    from mlx_diffusiongemma.cache import CanvasKV
    from mlx_diffusiongemma.model import Model
    from mlx_diffusiongemma.sampler import denoise_sample, stop_update

    rep.header(
        "graph: Python time to build one denoising step's graph, full shape, Metal/CUDA path"
    )
    args = make_args(FULL_TEXT)
    model = Model(args)  # float weights stay lazy: never evaluated
    quantize_structure(model, default_quant(), "mixed")
    cache = model.make_cache()
    for i, layer in enumerate(
        model.layers
    ):  # a 4096-token prompt's K/V (zeros: values do not matter)
        a = layer.self_attn
        n = args.sliding_window - 1 if args.is_sliding(i) else opts.prompt
        cache.keys[i] = cache.values[i] = mx.zeros(
            (1, a.n_kv_heads, n, a.head_dim), dtype=mx.bfloat16
        )
    cache.offset = opts.prompt
    times = []
    with using(DEFAULT):
        kv = CanvasKV(cache, FULL_CANVAS)
        canvas = mx.zeros((1, FULL_CANVAS), dtype=mx.int32)
        soft = mx.zeros((1, FULL_CANVAS, args.hidden_size), dtype=mx.bfloat16)
        history = mx.full((1, 1, FULL_CANVAS), -1, dtype=mx.int32)
        temp, bound = mx.array(0.6), mx.array(0.1)
        for i in range(opts.repeat + 1):
            t = time.perf_counter()
            logits = model.decode(canvas, kv, soft_embeds=soft, softcap=False)
            _, argmax, entropy, _, probs = denoise_sample(
                logits,
                temp,
                bound,
                mx.random.key(i),
                None,
                None,
                mx.bfloat16,
                softcap=args.final_logit_softcapping,
            )
            stop_update(history, argmax, entropy, 0.005)
            model.soft_embeddings_from_probs(probs)
            times.append(time.perf_counter() - t)
    times = sorted(times[1:])  # the first call also traces the compiled sampler
    med = times[len(times) // 2]
    say(
        f"  one step's graph ({args.num_hidden_layers} layers, mixed 4-bit, decoder forward + sampler + "
        f"stop test + self-conditioning): built in {med * 1e3:.1f} ms (median of {len(times)}; "
        f"{med * 1e3 / args.num_hidden_layers:.2f} ms per layer); vLLM's H100 step for scale: 9.1 ms"
    )
    rep.save("graph", {"build_s": med, "layers": args.num_hidden_layers, "times_s": times})
