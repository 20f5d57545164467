"""The sampler's pieces against the reference's own functions, on the same logits."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from mlx_diffusiongemma.backends import CPU, DEFAULT
from mlx_diffusiongemma.sampler import (
    SamplerSettings,
    denoise_sample,
    entropy_accept,
    stop_update,
    temperature,
    tempered_stats,
)


def test_temperature_schedule_matches_reference():
    s = SamplerSettings(max_denoising_steps=16, t_min=0.4, t_max=0.8)
    proc = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 16)
    scores = torch.ones(1, 1, 4)
    for step in range(16, 0, -1):
        want = 1.0 / proc(None, scores, cur_step=step)[0, 0, 0].item()
        assert abs(temperature(step, s) - want) < 1e-6


@pytest.mark.parametrize("backend", [DEFAULT, CPU], ids=["default", "cpu"])
@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_entropy_matches_reference(scale, backend):
    logits = np.random.default_rng(1).standard_normal((2, 12, 50)).astype(np.float32) * scale
    _, e, s, _, h = tempered_stats(mx.array(logits), 0.7, backend)
    want = torch.distributions.Categorical(logits=torch.tensor(logits) / 0.7).entropy().numpy()
    np.testing.assert_allclose(np.array(h), want, atol=2e-5)
    np.testing.assert_allclose(
        np.array(e / s), torch.softmax(torch.tensor(logits) / 0.7, -1).numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("bound", [1e-3, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_acceptance_and_renoise_match_reference(bound, scale):
    rng = np.random.default_rng(int(bound * 1000) + int(scale))
    logits = (rng.standard_normal((3, 20, 40)) * scale).astype(np.float32)
    ref = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 20, 40, 8)
    current = torch.tensor(rng.integers(0, 40, (3, 20)))
    denoised = torch.tensor(rng.integers(0, 40, (3, 20)))
    accepted = ref.accept_canvas(current, denoised, torch.tensor(logits), 1)
    want_mask = ref.accepted_token_mask.numpy()
    *_, h = tempered_stats(mx.array(logits), 1.0)
    mask = np.array(entropy_accept(h, bound))
    np.testing.assert_array_equal(mask, want_mask)
    assert mask.sum(axis=-1).min() >= 1  # the lowest-entropy token is always accepted
    # Re-noising keeps exactly the accepted tokens (the reference's renoise_canvas).
    renoised = ref.renoise_canvas(accepted, 1).numpy()
    np.testing.assert_array_equal(renoised[want_mask], denoised.numpy()[want_mask])
    # Ours: accepted positions carry the sample; the others fresh uniform noise.
    nxt, argmax, _, acc, probs = denoise_sample(
        mx.array(logits), mx.array(1.0), mx.array(bound), mx.random.key(0)
    )
    np.testing.assert_array_equal(np.array(acc), want_mask)
    np.testing.assert_array_equal(np.array(argmax), logits.argmax(-1))
    np.testing.assert_allclose(
        np.array(probs), torch.softmax(torch.tensor(logits), -1).numpy(), rtol=1e-5, atol=1e-7
    )


def test_samples_follow_the_tempered_distribution():
    logits = np.array([[[2.0, 1.0, 0.0, -1.0, 0.5]]], np.float32)
    big = mx.array(np.repeat(logits, 4000, axis=1))
    counts = np.zeros(5)
    for i in range(5):  # bound large: every position accepted, so the canvas is the sample
        nxt, *_ = denoise_sample(big, mx.array(0.8), mx.array(1e9), mx.random.key(i))
        counts += np.bincount(np.array(nxt).ravel(), minlength=5)
    freq = counts / counts.sum()
    want = torch.softmax(torch.tensor(logits[0, 0]) / 0.8, -1).numpy()
    np.testing.assert_allclose(freq, want, atol=0.01)


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_stop_rule_matches_reference(stability):
    rng = np.random.default_rng(stability)
    ref = StableAndConfidentStoppingCriteria(stability, 0.05)
    history = mx.full((stability, 2, 6), -1, dtype=mx.int32) if stability else None
    base = rng.integers(0, 9, (2, 6))
    for step in range(8):
        argmax = base.copy()
        if step < 3:
            argmax[step % 2, step] += 1  # unstable early on, row by row
        scale = 1.0 if step < 2 else 60.0  # then confident
        logits = (rng.standard_normal((2, 6, 9)) * scale).astype(np.float32)
        want = ref(torch.tensor(argmax), torch.tensor(logits)).numpy()
        *_, h = tempered_stats(mx.array(logits), 1.0)
        got, history = stop_update(history, mx.array(argmax, dtype=mx.int32), h, 0.05)
        np.testing.assert_array_equal(np.array(got), want)


def test_settings_from_generation_config():
    gen = {
        "max_new_tokens": 64,
        "max_denoising_steps": None,
        "sampler_config": {"entropy_bound": 0.3, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": None,
        "t_max": 0.9,
        "confidence_threshold": 0.01,
    }
    s = SamplerSettings.resolve(gen, t_min=0.2)
    assert (s.max_tokens, s.max_denoising_steps, s.entropy_bound, s.t_min, s.t_max) == (
        64,
        48,
        0.3,
        0.2,
        0.9,
    )
    assert (s.stability_threshold, s.confidence_threshold) == (1, 0.01)
    assert SamplerSettings.resolve(None) == SamplerSettings()


@pytest.mark.parametrize(
    "bad, msg",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_denoising_steps=-1), "max_denoising_steps"),
        (dict(t_min=0.5, t_max=0.5), "t_max must be greater"),
        (dict(entropy_bound=0.0), "entropy_bound"),
        (dict(stability_threshold=-1), "stability_threshold"),
        (dict(confidence_threshold=0), "confidence"),
    ],
)
def test_bad_settings(bad, msg):
    with pytest.raises(ValueError, match=msg):
        SamplerSettings.resolve(None, **bad)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "gen, over, msg",
    [
        ({}, dict(t_min=NAN), r"t_min must be a finite number >= 0 \(got nan\)"),
        ({}, dict(t_max=INF), r"t_max must be a finite number >= 0 \(got inf\)"),
        ({}, dict(entropy_bound=NAN), r"entropy_bound must be a finite number > 0"),
        ({}, dict(confidence_threshold=-INF), r"confidence_threshold must be a finite number > 0"),
        (
            {},
            dict(max_denoising_steps=4.0),
            r"max_denoising_steps must be an integer >= 1 \(got 4\.0\)",
        ),
        (
            {},
            dict(stability_threshold=True),
            r"stability_threshold must be an integer >= 0 \(got true\)",
        ),
        ({}, dict(max_tokens="64"), r"max_tokens must be an integer >= 1 \(got the string '64'\)"),
        ({"t_min": "0.4"}, {}, r"t_min must be a finite number >= 0 \(got the string '0\.4'\)"),
        ({"max_new_tokens": 0}, {}, r"max_new_tokens must be an integer >= 1"),
        ({"sampler_config": {"entropy_bound": NAN}}, {}, r"sampler_config\.entropy_bound must be"),
        ({"sampler_config": []}, {}, r"sampler_config must be a JSON object"),
    ],
)
def test_non_finite_and_mistyped_settings_are_refused(gen, over, msg):
    """NaN fails every comparison, so it needs its own test; strings and bools are not numbers."""
    with pytest.raises(ValueError, match=msg):
        SamplerSettings.resolve(gen, **over)


def test_seed_range():
    from mlx_diffusiongemma.sampler import random_key

    assert random_key(0).shape == random_key(2**64 - 1).shape
    for bad in (-1, 2**64, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            random_key(bad)


def test_chunked_position_pass_gives_the_same_step(monkeypatch):
    """Large vocabularies run the vocabulary-sized pass over slices of the canvas; the result
    is the same as one pass."""
    import mlx_diffusiongemma.sampler as sampler

    logits = mx.array(
        (np.random.default_rng(3).standard_normal((2, 10, 64)) * 3).astype(np.float32)
    )
    args = (logits, mx.array(0.7), mx.array(0.5), mx.random.key(4))
    whole = [np.array(a) for a in denoise_sample(*args)]
    monkeypatch.setattr(sampler, "CHUNK_ELEMENTS", 2 * 64 * 3)  # 3 positions per slice
    sliced = [np.array(a) for a in denoise_sample(*args)]
    for a, b in zip(whole, sliced):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", [DEFAULT, CPU], ids=["default", "cpu"])
@pytest.mark.parametrize("V", [50, 64, 4096, 3 * 256])
def test_inverse_cdf_sample_is_exact(V, backend):
    """The two-level draw picks the first token whose running probability reaches u, as a
    float64 inverse CDF does (positions where u falls within rounding of a boundary skipped)."""
    from mlx_diffusiongemma.sampler import _position_pass

    rng = np.random.default_rng(V)
    logits = (rng.standard_normal((2, 40, V)) * 4).astype(np.float32)
    logits[0, 0] = -30.0  # a flat row
    logits[1, 0, V - 1] = 40.0  # all mass on the last token
    u = rng.uniform(size=(2, 40, 1)).astype(np.float32)
    _, sample, argmax, _ = _position_pass(
        mx.array(logits), mx.array(0.7), mx.array(u), None, mx.float32, backend
    )
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64) / 0.7, -1).numpy()
    cdf = np.cumsum(p, -1)
    want = np.minimum((cdf < u).sum(-1), V - 1)
    near = np.abs(np.take_along_axis(cdf, want[..., None], -1)[..., 0] - u[..., 0]) < 1e-5
    got = np.array(sample)
    assert (got[~near] == want[~near]).all() and near.mean() < 0.1
    assert got[1, 0] == V - 1 and (np.array(argmax) == logits.argmax(-1)).all()


@pytest.mark.parametrize("probs_dtype", [mx.float32, mx.bfloat16])
def test_softcap_inside_the_pass_equals_softcapped_logits(probs_dtype):
    """The loop hands the sampler raw LM-head logits and the cap; the step equals the one on
    the model's softcapped logits: the same tokens, and entropies and probabilities within the
    CPU tanh's rounding (backends/cpu_math.tanh: 2.5e-7 absolute, i.e. 7.5e-6 on the capped logits)."""
    from mlx_diffusiongemma.backends import final_softcap

    raw = mx.array((np.random.default_rng(7).standard_normal((2, 24, 96)) * 40).astype(np.float32))
    args = (mx.array(0.6), mx.array(0.3), mx.random.key(2), None, None, probs_dtype)
    as_np = lambda outs: [
        np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a) for a in outs
    ]
    capped = as_np(denoise_sample(final_softcap(raw, 30.0), *args))
    fused = as_np(denoise_sample(raw, *args, softcap=30.0))
    for i in (0, 1, 3):  # next canvas, argmax, acceptance
        np.testing.assert_array_equal(capped[i], fused[i])
    np.testing.assert_allclose(fused[2], capped[2], atol=1e-4)  # entropy
    np.testing.assert_allclose(
        fused[4], capped[4], atol=1e-5 if probs_dtype == mx.float32 else 8e-3
    )


@pytest.mark.parametrize("backend", [DEFAULT, CPU], ids=["default", "cpu"])
def test_bf16_self_conditioning_probs_round_as_the_reference(backend):
    """A bf16 checkpoint's self-conditioning input: the reference casts the tempered logits to
    bf16, softmaxes in float32 and casts to bf16. Ours gives the same bf16 values, but for
    float32 rounding differences near bf16 rounding boundaries (one bf16 ulp at most)."""
    from mlx_diffusiongemma.sampler import self_conditioning_probs

    logits = (np.random.default_rng(9).standard_normal((2, 16, 3000)) * 8).astype(np.float32)
    t = torch.tensor(logits) / 0.55
    want = torch.softmax(t.to(torch.bfloat16).float(), -1).to(torch.bfloat16).float().numpy()
    am = mx.argmax(mx.array(logits), axis=-1)
    got = self_conditioning_probs(mx.array(logits), mx.array(0.55), mx.bfloat16, backend, am)
    got = np.array(got.astype(mx.float32))
    assert (got == want).mean() > 0.99  # MLX's own softmax, like ours: 99.4% here
    normal = want > 1e-30  # below, float32 exp underflows differently
    np.testing.assert_allclose(got[normal], want[normal], rtol=2**-7, atol=0)
