"""Whole generations against `DiffusionGemmaForBlockDiffusion.generate`, and the Python API."""

import inspect

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma import generation_diffusion_gemma as ref_gen

import mlx_diffusiongemma.generator as gen
from mlx_diffusiongemma import load_model
from mlx_diffusiongemma.generation import stream_generate
from mlx_diffusiongemma.text import generate

NEAR_GREEDY = dict(t_min=1e-4, t_max=2e-4)
REF_INIT = ref_gen.EntropyBoundSampler.initialize_canvas


@pytest.fixture
def same_canvases(monkeypatch):
    """Both implementations start every canvas from the same given tokens (the reference's
    re-noising still draws its own randomness; near-greedy runs accept every token)."""

    def install(canvases):
        ref_iter, our_iter = iter(canvases), iter(canvases)

        def ref_init(self, batch_size, device):
            if inspect.stack()[1].function == "renoise_canvas":
                return REF_INIT(self, batch_size, device)
            return torch.tensor(next(ref_iter))

        monkeypatch.setattr(ref_gen.EntropyBoundSampler, "initialize_canvas", ref_init)
        monkeypatch.setattr(gen, "init_canvas", lambda key, b, length, v: mx.array(next(our_iter)))

    return install


def reference_tokens(ref, prompt, max_tokens, eos, **kw):
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, eos_token_id=eos, **kw
        )
    seq = out.sequences[0, len(prompt) :].tolist()
    hit = next((i for i, t in enumerate(seq) if t in eos), None)
    return seq if hit is None else seq[:hit]


@pytest.mark.parametrize("seed, prompt_len, steps", [(0, 10, 12), (3, 21, 6)])
def test_near_greedy_generation_equals_reference(
    checkpoint_factory, same_canvases, seed, prompt_len, steps
):
    path, ref = checkpoint_factory(f"sharp{seed}", seed=seed, sharpen=20.0)
    model = load_model(path)
    rng = np.random.default_rng(seed)
    V, C = model.args.vocab_size, model.args.canvas_length
    prompt = rng.integers(3, V, prompt_len).tolist()
    canvases = [rng.integers(0, V, (1, C)) for _ in range(3)]
    kw = dict(NEAR_GREEDY, max_denoising_steps=steps)
    same_canvases(canvases)
    want = reference_tokens(ref, prompt, 3 * C, [1], **kw)
    same_canvases(canvases)
    got = list(
        stream_generate(model, None, prompt, max_tokens=3 * C, eos_token_ids=[1], seed=0, **kw)
    )
    assert sum((r.tokens for r in got), []) == want
    assert len(want) > C  # the comparison spans more than one canvas


def test_eos_cuts_output_like_reference(checkpoint_factory, same_canvases):
    path, ref = checkpoint_factory("sharp0", seed=0, sharpen=20.0)
    model = load_model(path)
    rng = np.random.default_rng(0)
    V, C = model.args.vocab_size, model.args.canvas_length
    prompt = rng.integers(3, V, 10).tolist()
    canvases = [rng.integers(0, V, (1, C)) for _ in range(3)]
    same_canvases(canvases)
    full = reference_tokens(ref, prompt, 3 * C, [1], max_denoising_steps=12, **NEAR_GREEDY)
    eos = full[C + 3]  # a token of the second canvas becomes an EOS id
    same_canvases(canvases)
    want = reference_tokens(ref, prompt, 3 * C, [1, eos], max_denoising_steps=12, **NEAR_GREEDY)
    same_canvases(canvases)
    got = list(
        stream_generate(
            model,
            None,
            prompt,
            max_tokens=3 * C,
            eos_token_ids=[1, eos],
            seed=0,
            max_denoising_steps=12,
            **NEAR_GREEDY,
        )
    )
    assert sum((r.tokens for r in got), []) == want
    assert len(got) == 2 and got[-1].finish_reason == "stop" and eos not in got[-1].tokens


def test_initial_canvas_and_seed_make_runs_repeatable(tiny):
    model = load_model(tiny[0])
    canvas = list(range(16))
    run = lambda seed: [
        r.tokens
        for r in stream_generate(
            model,
            None,
            [5, 6, 7],
            max_tokens=32,
            seed=seed,
            initial_canvas=canvas,
            max_denoising_steps=4,
        )
    ]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_response_fields_and_drafts(tiny):
    model = load_model(tiny[0])
    drafts = []
    rs = list(
        stream_generate(
            model,
            None,
            [4, 5, 6, 7],
            max_tokens=20,
            seed=0,
            max_denoising_steps=5,
            eos_token_ids=[],
            draft_callback=drafts.append,
        )
    )
    assert len(rs) == 2  # 20 tokens -> two 16-token canvases, the second cut to 4
    r = rs[-1]
    assert [len(x.tokens) for x in rs] == [16, 4] and r.generation_tokens == 20
    assert r.prompt_tokens == 4 and r.prompt_tps > 0 and r.generation_tps > 0
    assert r.peak_memory > 0 and r.finish_reason == "length" and rs[0].finish_reason is None
    assert sum(x.steps for x in rs) == r.decoder_forwards == len(drafts)
    assert all(len(d.tokens) == 16 and len(d.accepted) == 16 and any(d.accepted) for d in drafts)
    assert [d.step for d in drafts if d.canvas == 0] == list(range(1, rs[0].steps + 1))


@pytest.mark.parametrize("max_tokens", [1, 5, 16, 17])
def test_max_tokens_is_exact(tiny, max_tokens):
    """The last canvas is denoised whole, but no more tokens than asked come back, from
    stream_generate, generate and batch_generate alike."""
    from mlx_diffusiongemma.batch import batch_generate

    model = load_model(tiny[0])
    kw = dict(max_tokens=max_tokens, seed=0, max_denoising_steps=3, eos_token_ids=[])
    rs = list(stream_generate(model, None, [4, 5, 6], **kw))
    assert sum(len(r.tokens) for r in rs) == rs[-1].generation_tokens == max_tokens
    assert rs[-1].finish_reason == "length"
    res = batch_generate(model, None, [[4, 5, 6], [7, 8]], **kw)
    assert [len(t) for t in res.tokens] == [
        max_tokens
    ] * 2 and res.generation_tokens == 2 * max_tokens


def test_stops_early_when_stable_and_confident(checkpoint_factory):
    path, _ = checkpoint_factory("sharp0", seed=0, sharpen=20.0)
    model = load_model(path)
    rs = list(
        stream_generate(
            model,
            None,
            [9, 8, 7],
            max_tokens=16,
            seed=0,
            stability_threshold=0,
            confidence_threshold=0.5,
            max_denoising_steps=30,
            **NEAR_GREEDY,
        )
    )
    assert rs[0].steps == 1  # stability 0: the first confident step stops


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(prompt=[]), "prompt is empty"),
        (dict(prompt="  "), "prompt is empty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_denoising_steps=0), "max_denoising_steps"),
        (dict(t_min=0.9, t_max=0.8), "t_max must be greater"),
        (dict(max_tokens=10_000), "exceeds the model's context"),
        (dict(prompt="hi"), "needs a tokenizer"),
        (dict(initial_canvas=[1, 2]), "initial_canvas must have 16"),
        (dict(prompt=[1, 99999]), "token ids must lie"),
    ],
)
def test_bad_arguments(tiny, kwargs, msg):
    model = load_model(tiny[0])
    kwargs = {"prompt": [1, 2, 3], **kwargs}
    with pytest.raises(ValueError, match=msg):
        generate(model, None, **kwargs)


def test_batch_rows_equal_single_runs(checkpoint_factory, same_canvases):
    """Prompts of different lengths (one longer than the window) together, near-greedy, over
    two canvases: each row's tokens equal a single run of that prompt."""
    from mlx_diffusiongemma.batch import batch_generate

    path, _ = checkpoint_factory("sharp0", seed=0, sharpen=20.0)
    model = load_model(path)
    rng = np.random.default_rng(4)
    V, C = model.args.vocab_size, model.args.canvas_length
    prompts = [rng.integers(3, V, n).tolist() for n in (4, 19, 11)]
    canvases = rng.integers(0, V, (2, 3, C))
    kw = dict(NEAR_GREEDY, max_denoising_steps=8, max_tokens=2 * C, eos_token_ids=[], seed=0)
    same_canvases([canvases[1]])  # the second canvas of every row; the first is given
    batch = batch_generate(model, None, prompts, initial_canvases=canvases[0], **kw)
    for i, p in enumerate(prompts):
        same_canvases([canvases[1][i : i + 1]])
        single = sum(
            (
                r.tokens
                for r in stream_generate(model, None, p, initial_canvas=canvases[0][i], **kw)
            ),
            [],
        )
        assert batch.tokens[i] == single, i
        assert len(single) == 2 * C


def test_batch_row_leaves_at_eos(checkpoint_factory, monkeypatch):
    from mlx_diffusiongemma.batch import batch_generate
    from mlx_diffusiongemma.cache import PromptCache

    path, _ = checkpoint_factory("sharp0", seed=0, sharpen=20.0)
    model = load_model(path)
    rng = np.random.default_rng(9)
    first = rng.integers(0, 384, (2, 16))
    kw = dict(NEAR_GREEDY, max_denoising_steps=6, max_tokens=32, seed=2, initial_canvases=first)
    free = batch_generate(model, None, [[5, 6], [9, 10, 11]], eos_token_ids=[], **kw)
    eos = next(t for t in free.tokens[0][:16] if t not in free.tokens[1])
    kept = []
    orig = PromptCache.filter
    monkeypatch.setattr(
        PromptCache, "filter", lambda self, rows: (kept.append(list(rows)), orig(self, rows))
    )
    res = batch_generate(model, None, [[5, 6], [9, 10, 11]], eos_token_ids=[eos], **kw)
    assert res.finish_reasons == ["stop", "length"] and kept == [[1]]
    assert res.tokens[0] == free.tokens[0][: free.tokens[0].index(eos)]
    # the remaining row goes on (its second canvas starts from other noise, so only the first
    # is compared)
    assert res.tokens[1][:16] == free.tokens[1][:16] and len(res.tokens[1]) == 32


def test_one_settings_object_stands_for_the_sampler_keywords(tiny):
    """A SamplerSettings passed down gives what its keywords give; a keyword given as well
    overrides that one field; a batch takes it too."""
    from mlx_diffusiongemma.batch import batch_generate
    from mlx_diffusiongemma.sampler import SamplerSettings

    model = load_model(tiny[0], dtype=mx.float32)
    kw = dict(
        max_tokens=40,
        max_denoising_steps=5,
        entropy_bound=0.3,
        t_min=0.2,
        t_max=0.5,
        stability_threshold=2,
        confidence_threshold=0.01,
    )
    settings = SamplerSettings(**kw)

    def tokens(**k):
        return [
            r.tokens
            for r in stream_generate(model, None, list(range(3, 20)), seed=7, eos_token_ids=[], **k)
        ]

    assert tokens(settings=settings) == tokens(**kw)
    assert tokens(settings=settings, max_denoising_steps=2) == tokens(
        **dict(kw, max_denoising_steps=2)
    )
    assert tokens(settings=settings, max_denoising_steps=2) != tokens(settings=settings)
    b = batch_generate(
        model, None, [list(range(3, 20))], seed=7, eos_token_ids=[], settings=settings
    )
    assert b.tokens[0] == sum(tokens(**kw), [])
