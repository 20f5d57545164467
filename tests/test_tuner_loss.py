"""The training objective against an independent torch implementation on the reference."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers.cache_utils import DynamicCache

from mlx_diffusiongemma import load_model
from mlx_diffusiongemma.tuner import diffusion_loss, losses

REL = 1e-4


def torch_example_loss(ref, prompt, response, ci, replace, rand, sc, fill, w, C):
    """One example, alone: the encoder over the whole sequence for the AR loss, and again over
    the scored canvas's context for the decoder's cache (causal, so the same K/V)."""
    n = -(-len(response) // C) * C
    seq = torch.tensor([list(prompt) + list(response) + [fill] * (n - len(response))])
    cap = ref.config.text_config.final_logit_softcapping
    enc = ref.model.encoder(
        input_ids=seq, past_key_values=DynamicCache(config=ref.config.get_text_config(decoder=True))
    )
    ar_logits = torch.tanh(ref.lm_head(enc.last_hidden_state).float() / cap) * cap
    ar = torch.nn.functional.cross_entropy(ar_logits[0, :-1], seq[0, 1:])
    ctx = len(prompt) + ci * C
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    ref.model.encoder(input_ids=seq[:, :ctx], past_key_values=cache)
    clean = seq[:, ctx : ctx + C]
    noised = torch.where(
        torch.tensor(replace)[None], torch.tensor(rand, dtype=torch.long)[None], clean
    )
    with torch.no_grad():
        first = ref(past_key_values=cache, decoder_input_ids=noised).logits
    logits = ref(
        past_key_values=cache,
        decoder_input_ids=noised,
        self_conditioning_logits=first,
        self_conditioning_mask=torch.tensor([bool(sc)]),
    ).logits
    diffusion = torch.nn.functional.cross_entropy(logits[0], clean[0])
    return diffusion + w * ar


def torch_grads(ref):
    grads = {}
    for name, p in list(ref.named_parameters(remove_duplicate=False)) + list(ref.named_buffers()):
        if "vision" in name or p.grad is None:
            continue
        name = (
            name.replace("model.encoder.language_model.layers", "model.decoder.layers")
            if not name.endswith("layer_scalar")
            else name
        )
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            name += ".weight"
        grads[name] = p.grad.numpy()
    return grads


def make_case(rng, V, C, prompt_lens, response_lens):
    prompts = [rng.integers(0, V, n).tolist() for n in prompt_lens]
    responses = [rng.integers(0, V, n).tolist() for n in response_lens]
    ci = np.array([rng.integers(0, -(-n // C)) for n in response_lens], dtype=np.int32)
    B = len(prompts)
    replace = rng.random((B, C)) < rng.uniform(0.1, 0.9, (B, 1))
    rand = rng.integers(0, V, (B, C)).astype(np.int32)
    sc = np.array([True, False] * B)[:B]
    return prompts, responses, ci, replace, rand, sc


@pytest.mark.parametrize("lens", [((7,), (16,)), ((5, 12, 9), (10, 40, 16))])
def test_loss_and_gradients_match_torch(tiny, lens):
    check_against_torch(tiny, lens)


@pytest.mark.parametrize("slice_", [3, 8])
def test_sliced_head_matches_torch(tiny, monkeypatch, slice_):
    """With the head frozen (LoRA), its cross-entropies run slice by slice with their gradients
    taken in the forward pass (losses.head_cross_entropy): still the reference's loss and
    gradients, ragged last slices included."""
    vocab = tiny[1].config.get_text_config().vocab_size
    monkeypatch.setattr(losses, "HEAD_SLICE_BYTES", 4 * vocab * slice_)  # slice_ rows a slice
    calls = []
    fused = losses.head_cross_entropy

    def spy(model, hidden, targets):
        calls.append(bool(model.model.decoder.embed_tokens.trainable_parameters()))
        return fused(model, hidden, targets)

    monkeypatch.setattr(losses, "head_cross_entropy", spy)
    sliced = []
    one = losses.slice_loss_and_grad
    monkeypatch.setattr(losses, "slice_loss_and_grad", lambda *a: sliced.append(1) or one(*a))
    check_against_torch(tiny, ((5, 12, 9), (10, 40, 16)), freeze_head=True)
    assert calls == [False, False]  # the AR and the diffusion cross-entropy, head frozen
    assert len(sliced) > 2  # ... and sliced


def check_against_torch(tiny, lens, freeze_head=False):
    path, ref = tiny
    model = load_model(path)
    if freeze_head:
        model.model.decoder.embed_tokens.freeze()
    V, C, fill, w = model.args.vocab_size, model.args.canvas_length, 1, 0.7
    rng = np.random.default_rng(len(lens[0]))
    prompts, responses, ci, replace, rand, sc = make_case(rng, V, C, *lens)

    def loss_fn(m):
        return diffusion_loss(
            m,
            prompts,
            responses,
            canvas_index=ci,
            replace=replace,
            random_tokens=rand,
            self_condition=sc,
            fill_token=fill,
            encoder_loss_weight=w,
        )

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    assert loss.dtype == mx.float32 and loss.shape == ()

    for b in ref.buffers():  # the layer scalars are buffers there; zero_grad leaves buffers be
        b.requires_grad_(b.dtype.is_floating_point)
        b.grad = None
    ref.zero_grad()
    want = sum(
        torch_example_loss(
            ref, prompts[b], responses[b], int(ci[b]), replace[b], rand[b], sc[b], fill, w, C
        )
        for b in range(len(prompts))
    ) / len(prompts)
    want.backward()
    assert abs(loss.item() - want.item()) <= REL * abs(want.item()), (loss.item(), want.item())

    expected = torch_grads(ref)
    got = dict(tree_flatten(grads))
    # the tower reads no image here: its gradients are zero (the reference has none to compare)
    for k in [k for k in got if "vision" in k]:
        assert float(mx.abs(got.pop(k)).max()) == 0.0, k
    assert set(got) <= set(expected) | {k for k in got if "layer_scalar" in k}
    # The last layer's scalars feed only the final RMS norm, which undoes any scale: their true
    # gradient is zero, and both sides hold rounding noise far below every other gradient.
    last = len(model.layers) - 1
    scale = max(np.abs(e).max() for e in expected.values())
    worst = 0.0
    for name, g in got.items():
        e = expected.get(name)
        if e is None:
            raise AssertionError(f"no reference gradient for {name}")
        g = np.array(g).reshape(e.shape)
        if name.endswith(f"layers.{last}.layer_scalar"):
            assert max(np.abs(g).max(), np.abs(e).max()) < 1e-5 * scale, name
            continue
        # A few gradients (encoder layer scalars) are sums over every position that nearly
        # cancel; their rounding is judged on the model's gradient scale (1e-2 of the largest).
        err = np.abs(g - e).max() / max(np.abs(e).max(), 1e-2 * scale)
        worst = max(worst, err)
        assert err <= REL, (name, err)
    assert worst > 0  # the comparison saw real numbers
    return worst


def test_padding_does_not_change_an_examples_loss(tiny):
    """A batch of unequal lengths: each example's loss equals its loss alone."""
    path, _ = tiny
    model = load_model(path)
    V, C = model.args.vocab_size, model.args.canvas_length
    rng = np.random.default_rng(3)
    prompts, responses, ci, replace, rand, sc = make_case(rng, V, C, (4, 20, 9), (40, 7, 25))
    kw = dict(fill_token=2, encoder_loss_weight=1.0)
    whole = diffusion_loss(
        model,
        prompts,
        responses,
        canvas_index=ci,
        replace=replace,
        random_tokens=rand,
        self_condition=sc,
        **kw,
    ).item()
    alone = [
        diffusion_loss(
            model,
            [prompts[b]],
            [responses[b]],
            canvas_index=ci[b : b + 1],
            replace=replace[b : b + 1],
            random_tokens=rand[b : b + 1],
            self_condition=sc[b : b + 1],
            **kw,
        ).item()
        for b in range(3)
    ]
    assert abs(whole - np.mean(alone)) < 1e-5 * abs(whole)


def test_bad_canvas_index_is_refused(tiny):
    path, _ = tiny
    model = load_model(path)
    C = model.args.canvas_length
    with pytest.raises(ValueError, match="canvas_index"):
        diffusion_loss(
            model,
            [[1, 2]],
            [[3] * C],
            canvas_index=np.array([1]),
            replace=np.zeros((1, C), bool),
            random_tokens=np.zeros((1, C), np.int32),
            self_condition=np.array([True]),
            fill_token=1,
        )


def test_sliced_head_on_a_quantized_base_equals_the_whole_logits(tiny, monkeypatch):
    """QLoRA: the sliced head's loss and LoRA gradients through a 4-bit tied embedding equal the
    whole-logits cross-entropy's."""
    from mlx_diffusiongemma.tuner.adapters import prepare

    path, _ = tiny
    model = load_model(path)
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and "vision" not in p,
    )
    assert hasattr(model.model.decoder.embed_tokens, "scales")
    prepare(model, "lora", -1, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    rng = np.random.default_rng(11)
    prompts, responses, ci, replace, rand, sc = make_case(
        rng, model.args.vocab_size, model.args.canvas_length, (6, 13), (30, 9)
    )

    def loss_fn(m):
        return diffusion_loss(
            m,
            prompts,
            responses,
            canvas_index=ci,
            replace=replace,
            random_tokens=rand,
            self_condition=sc,
            fill_token=1,
            encoder_loss_weight=0.5,
        )

    results = []
    for slice_ in (5, 10**9):
        monkeypatch.setattr(losses, "HEAD_SLICE_BYTES", 4 * model.args.vocab_size * slice_)
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        results.append((loss.item(), dict(tree_flatten(grads))))
    (sliced, gs), (whole, gw) = results
    assert abs(sliced - whole) <= 1e-5 * abs(whole)
    assert set(gs) == set(gw) and len(gs) > 10
    for k in gw:
        scale = float(mx.abs(gw[k]).max())
        assert float(mx.abs(gs[k] - gw[k]).max()) <= 1e-4 * max(scale, 1e-6), k


@pytest.mark.parametrize(
    "kind, num_layers, ordered",
    [("lora", -1, True), ("full", -1, True), ("lora", 2, True), ("lora", -1, False)],
)
def test_grad_checkpoint_changes_no_gradient(tiny, kind, num_layers, ordered):
    """--grad-checkpoint (tuner.checkpoint's, and mlx-lm's that it orders) recomputes each
    layer in the backward pass: the encoder's K/V, which the decoder's layers read, still carry
    their gradient through the recomputed layers, so loss and gradients are those without it."""
    import mlx_lm.tuner.trainer

    from benchmarks.harness.lora import example_batch
    from mlx_diffusiongemma.tuner.adapters import prepare
    from mlx_diffusiongemma.tuner.checkpoint import grad_checkpoint as ours
    from mlx_diffusiongemma.tuner.trainer import make_loss

    def step(checkpointed):
        model = load_model(tiny[0])
        mx.random.seed(3)
        prepare(model, kind, num_layers, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        for _, m in model.named_modules():  # nonzero B: every LoRA gradient is nonzero
            if hasattr(m, "lora_b"):
                m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
        model.train()
        diff, batch = example_batch(20, model.args.canvas_length, model.args.vocab_size, batch=2)
        layer_class = type(model.layers[0])
        original = layer_class.__call__
        if checkpointed:
            (ours if ordered else mlx_lm.tuner.trainer.grad_checkpoint)(model.layers[0])
        try:
            value_and_grad = nn.value_and_grad(model, make_loss(diff))
            (loss, _), grads = mx.compile(lambda *b: value_and_grad(model, *b))(*batch)
            mx.eval(loss, grads)
        finally:
            layer_class.__call__ = original
        return loss.item(), dict(tree_flatten(grads))

    (plain, want), (ckpt, got) = step(False), step(True)
    assert plain == pytest.approx(ckpt, rel=1e-6)
    assert set(got) == set(want)
    for name, g in want.items():
        scale = float(mx.abs(g).max())
        assert scale > 0, name
        assert float(mx.abs(got[name] - g).max()) <= 1e-4 * scale, name
