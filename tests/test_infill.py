"""Infilling: pinned text never changes, gap lengths are honoured, several gaps per canvas."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import generate, load, load_model
from mlx_diffusiongemma.generation import Pins, stream_generate
from mlx_diffusiongemma.infilling import Gap, infill, parse_gaps


def test_pinned_tokens_never_change_during_denoising(tiny, monkeypatch):
    import mlx_diffusiongemma.denoise as gen

    model = load_model(tiny[0])
    mask = np.zeros(16, bool)
    mask[[2, 3, 9, 15]] = True
    tokens = np.zeros(16, np.int64)
    tokens[mask] = [11, 12, 13, 14]
    seen = []
    orig = gen.denoise_sample

    def spy(
        logits,
        temp,
        bound,
        key,
        pin_mask=None,
        pin_tokens=None,
        probs_dtype=mx.float32,
        softcap=None,
    ):
        out = orig(logits, temp, bound, key, pin_mask, pin_tokens, probs_dtype, softcap)
        seen.append((np.array(out[0]), np.array(out[1]), np.array(out[3])))
        return out

    monkeypatch.setattr(gen, "denoise_sample", spy)
    pins = Pins(mx.array(mask[None]), mx.array(tokens[None]))
    rs = list(
        stream_generate(
            model,
            None,
            [4, 5, 6],
            max_tokens=16,
            seed=0,
            pins=pins,
            eos_token_ids=[],
            max_denoising_steps=7,
            stability_threshold=100,
        )
    )
    assert len(seen) == 7
    for canvas, argmax, accepted in seen:  # after every step: next canvas, draft and acceptance
        assert (canvas[0, mask] == tokens[mask]).all() and (argmax[0, mask] == tokens[mask]).all()
        assert accepted[0, mask].all()
    assert [rs[0].tokens[i] for i in np.flatnonzero(mask)] == [11, 12, 13, 14]


def test_parse_gap_markers():
    assert parse_gaps("a <|gap|> b <|gap:12|>c") == ["a ", Gap(None), " b ", Gap(12), "c"]
    with pytest.raises(ValueError, match="no gap marker"):
        parse_gaps("nothing here")


def test_several_gaps_with_lengths(tiny):
    model = load_model(tiny[0])
    segs = [[7, 8, 9], Gap(3), [20, 21], Gap(), [30], Gap(2)]
    res = infill(model, None, segs, seed=1, max_denoising_steps=4, eos_token_ids=[])
    # 16 positions: 3 + 2 + free + 1 + 2 -> the open gap gets 8
    assert [len(f) for f in res.fill_tokens] == [3, 8, 2]


def test_gap_too_long_for_canvas(tiny):
    model = load_model(tiny[0])
    with pytest.raises(ValueError, match="a canvas holds 16"):
        infill(model, None, [[1, 2], Gap(10), [3] * 7], seed=0)


def test_suffix_through_generate(text_demo):
    model, tok = load(text_demo)
    fill = generate(
        model,
        tok,
        "def add(a, b):\n    return",
        suffix="\n\nprint(add(1, 2))\n",
        gap_length=6,
        seed=0,
        max_denoising_steps=4,
    )
    assert isinstance(fill, str)
    res = infill(
        model,
        tok,
        "The quick <|gap:5|> fox jumps over the <|gap:3|> dog.",
        seed=0,
        max_denoising_steps=4,
    )
    assert (
        res.text.startswith("The quick ")
        and " fox jumps over the " in res.text
        and res.text.endswith(" dog.")
    )
    assert len(res.fills) == 2 and all(len(t) <= n for t, n in zip(res.fill_tokens, (5, 3)))


def test_public_names_stay_functions_when_their_modules_are_loaded(tiny):
    """A submodule of the same name as a public function (the `generate` command, the
    infilling module) must not turn the package's name into a module that cannot be called."""
    import importlib
    import pkgutil

    import mlx_diffusiongemma as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "demo":
            importlib.import_module(f"mlx_diffusiongemma.{m.name}")
    for name in pkg.__all__:
        assert callable(getattr(pkg, name)), name
    from mlx_diffusiongemma import generate, infill

    assert infill.__module__ == "mlx_diffusiongemma.infilling"
    model = load_model(tiny[0])
    assert isinstance(generate(model, None, [4, 5], max_tokens=4, seed=0), str)
