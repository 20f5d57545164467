"""Images in the prompt against the transformers reference: the image processor on real image
files, the vision tower, logits with images (the encoder's bidirectional image blocks) and
near-greedy generation; plus the interfaces and their errors."""

import base64
import inspect
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from make_checkpoints import TINY_TOKENS, TINY_VIDEO_TOKEN
from PIL import Image
from transformers.image_utils import load_image as hf_load_image
from transformers.models.diffusion_gemma import generation_diffusion_gemma as ref_gen
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaEncoderModel
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import mlx_diffusiongemma.generation as gen
import mlx_diffusiongemma.generator as generator
from mlx_diffusiongemma import batch_generate, load_model
from mlx_diffusiongemma.image_processor import ImageProcessor, load_image
from mlx_diffusiongemma.multimodal import vision_prompt
from mlx_diffusiongemma.text import generate

TOL = 1e-4
IMG, BOI, EOI = (TINY_TOKENS[k] for k in ("image_token_id", "boi_token_id", "eoi_token_id"))
NEAR_GREEDY = dict(t_min=1e-4, t_max=2e-4)


def random_image(rng, w, h, mode="RGB"):
    channels = 4 if mode == "RGBA" else 3
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a, "RGBA") if mode == "RGBA" else Image.fromarray(a).convert(mode)


IMAGE_FILES = [
    (512, 512, "png", "RGB"),
    (1024, 768, "jpeg", "RGB"),
    (100, 37, "png", "RGBA"),
    (3000, 200, "png", "L"),
    (37, 900, "jpeg", "RGB"),
    (48, 48, "png", "P"),
]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []
    for w, h, fmt, mode in IMAGE_FILES:
        f = d / f"{w}x{h}_{mode}.{fmt}"
        random_image(rng, w, h, mode).save(f)
        files.append(f)
    return files


@pytest.mark.parametrize("soft_tokens", [70, 280, 1120])
def test_processor_equals_gemma4_processor_on_files(image_files, soft_tokens):
    ours = ImageProcessor(max_soft_tokens=soft_tokens)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=soft_tokens)
    for f in image_files:
        want = ref([hf_load_image(str(f))])  # file → transformers' load_image → processor
        got = ours([f])
        assert np.array_equal(got.pixel_values, want["pixel_values"]), f.name
        assert np.array_equal(got.image_position_ids, want["image_position_ids"]), f.name
        assert got.num_soft_tokens == list(want["num_soft_tokens_per_image"]), f.name
        # a PIL image as given (transparency composited on white, as the processor does)
        pil = Image.open(f)
        assert np.array_equal(ours([pil]).pixel_values, ref([pil])["pixel_values"]), f.name


def test_processor_sizes_from_the_reference_notes():
    p = ImageProcessor()
    for (w, h), n in (((512, 512), 256), ((1024, 768), 266)):
        assert p([np.zeros((h, w, 3), np.uint8)]).num_soft_tokens == [n]


def test_load_image_sources_and_errors(image_files, tmp_path):
    f = image_files[0]
    data_url = "data:image/png;base64," + base64.b64encode(f.read_bytes()).decode()
    ref = np.array(load_image(f))
    assert np.array_equal(np.array(load_image(str(f))), ref)
    assert np.array_equal(np.array(load_image(data_url)), ref)
    assert np.array_equal(np.array(load_image(ref)), ref)  # an (H, W, 3) array
    assert np.array_equal(np.array(load_image(np.moveaxis(ref, -1, 0))), ref)  # (3, H, W)
    (tmp_path / "not.png").write_text("hello")
    bad = [
        (tmp_path / "missing.png", "does not exist"),
        (str(tmp_path / "not.png"), "not a readable image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:text/plain,hi", "data URL must look like"),
        (42, "must be a path"),
        (np.zeros((5, 5, 7)), "image array must be"),
        (np.full((4, 4, 3), 2.0), "values in [0, 1]"),
        ("http://127.0.0.1:9/x.png", "could not fetch image"),
    ]
    for source, msg in bad:
        with pytest.raises(ValueError) as e:
            load_image(source, timeout=2)
        assert msg in str(e.value) and "\n" not in str(e.value), (source, str(e.value))
    with pytest.raises(ValueError, match="larger than"):
        load_image(f, max_bytes=10)


def test_load_image_over_http_with_size_limit(image_files):
    import http.server
    import threading

    body = image_files[0].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.png"
        assert np.array_equal(np.array(load_image(url)), np.array(load_image(image_files[0])))
        with pytest.raises(ValueError, match="larger than"):
            load_image(url, max_bytes=100)
    finally:
        server.shutdown()


def patches(rng, ph, pw, max_patches, patch=4):
    """A random image of ph × pw patches, padded to max_patches, as the processor lays it out."""
    n = ph * pw
    pv = np.zeros((max_patches, 3 * patch * patch), np.float32)
    pv[:n] = rng.random((n, 3 * patch * patch))
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    pos = -np.ones((max_patches, 2), np.int64)
    pos[:n] = np.stack([gx, gy], -1).reshape(n, 2)
    return pv, pos, n // 9


def reference_logits(ref, ids, canvas, pv, pos, sc):
    """The reference forward with the encoder's image mask built as its generate() builds it
    (its plain forward() drops that mask)."""
    with torch.no_grad():
        tids = torch.tensor(ids)
        emb = ref.model.encoder.get_input_embeddings()(tids)
        positions = torch.arange(ids.shape[1])[None]
        masks = DiffusionGemmaEncoderModel.create_masks_for_generate(
            ref.config, emb, None, None, positions, (tids == IMG).long()
        )
        return ref(
            input_ids=tids,
            attention_mask=masks,
            decoder_input_ids=torch.tensor(canvas),
            pixel_values=torch.tensor(pv),
            image_position_ids=torch.tensor(pos),
            self_conditioning_logits=None if sc is None else torch.tensor(sc),
        ).logits.numpy()


def image_prompt(rng, counts, texts=(5, 4, 3)):
    ids = [2] + rng.integers(3, 300, texts[0]).tolist()
    for i, n in enumerate(counts):
        ids += [BOI] + [IMG] * n + [EOI] + rng.integers(3, 300, texts[i + 1]).tolist()
    return ids


@pytest.mark.parametrize("variant", ["default", "clipped"])
def test_tower_features_equal_reference(checkpoint_factory, variant):
    vision = dict(use_clipped_linears=True) if variant == "clipped" else None
    path, ref = checkpoint_factory(variant, vision=vision) if vision else checkpoint_factory()
    model = load_model(path)
    rng = np.random.default_rng(1)
    (pv1, pos1, _), (pv2, pos2, _) = patches(rng, 9, 12, 630), patches(rng, 6, 3, 630)
    pv, pos = np.stack([pv1, pv2]), np.stack([pos1, pos2])
    with torch.no_grad():
        want = ref.model.encoder.get_image_features(torch.tensor(pv), torch.tensor(pos))
    got = model.image_features(mx.array(pv), pos)
    assert got.shape == (12 + 2, 64)
    assert np.abs(np.array(got) - want.pooler_output.numpy()).max() < 1e-5


@pytest.mark.parametrize("with_sc", [False, True])
@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_with_images_equal_reference(tiny, n_images, with_sc):
    path, ref = tiny
    model = load_model(path)
    rng = np.random.default_rng(10 * n_images + with_sc)
    # different sizes and aspect ratios; padding patches in both (630 = 70 soft tokens)
    shapes = [(9, 12), (6, 6)][:n_images]
    imgs = [patches(rng, h, w, 630) for h, w in shapes]
    pv, pos = np.stack([i[0] for i in imgs]), np.stack([i[1] for i in imgs])
    ids = np.array([image_prompt(rng, [i[2] for i in imgs])])
    C, V = model.args.canvas_length, model.args.vocab_size
    canvas = rng.integers(0, V, (1, C))
    sc = (rng.standard_normal((1, C, V)) * 3).astype(np.float32) if with_sc else None
    want = reference_logits(ref, ids, canvas, pv, pos, sc)
    got = model(
        mx.array(ids),
        mx.array(canvas),
        None if sc is None else mx.array(sc),
        pixel_values=mx.array(pv),
        image_position_ids=mx.array(pos),
    )
    assert np.abs(np.array(got) - want).max() < TOL
    # chunks of 7 tokens (window 8, runs of 12 and 4 image tokens): never split a run
    cache = model.make_cache()
    feats = model.image_features(mx.array(pv), pos)
    model.encode(mx.array(ids), cache, step=7, vision={IMG: feats})
    got = model.decode(mx.array(canvas), cache, None if sc is None else mx.array(sc))
    assert np.abs(np.array(got) - want).max() < TOL


def test_image_block_is_bidirectional_beyond_the_window(tiny):
    """A run of 12 image tokens with window 8: its first token sees the last on every layer,
    so changing the last soft token changes the first position's keys."""
    path, _ = tiny
    model = load_model(path)
    rng = np.random.default_rng(4)
    pv, pos, n = patches(rng, 9, 12, 630)
    ids = mx.array([image_prompt(rng, [n])])
    feats = model.image_features(mx.array(pv[None]), pos[None])
    other = mx.concatenate([feats[:-1], feats[-1:] * 2])
    caches = [model.encode(ids, model.make_cache(), vision={IMG: f}) for f in (feats, other)]
    first = 1 + 5 + 1  # BOS, 5 text tokens, <|image>
    full = len(model.layers) - 1
    k0, k1 = (np.array(c.keys[full][:, :, first]) for c in caches)
    assert np.abs(k0 - k1).max() > 1e-4


def test_feature_count_mismatch_is_an_error(tiny):
    path, _ = tiny
    model = load_model(path)
    feats = mx.zeros((3, model.args.hidden_size))
    with pytest.raises(ValueError, match="2 tokens of id"):
        model.encode(mx.array([[2, BOI, IMG, IMG, EOI]]), model.make_cache(), vision={IMG: feats})


@pytest.fixture
def same_canvases(monkeypatch):
    init = ref_gen.EntropyBoundSampler.initialize_canvas

    def install(canvases):
        ref_iter, our_iter = iter(canvases), iter(canvases)

        def ref_init(self, batch_size, device):
            if inspect.stack()[1].function == "renoise_canvas":
                return init(self, batch_size, device)
            return torch.tensor(next(ref_iter))

        monkeypatch.setattr(ref_gen.EntropyBoundSampler, "initialize_canvas", ref_init)
        monkeypatch.setattr(
            generator, "init_canvas", lambda key, b, length, v: mx.array(next(our_iter))
        )

    return install


def test_near_greedy_generation_with_image_equals_reference(checkpoint_factory, same_canvases):
    path, ref = checkpoint_factory("sharp0", seed=0, sharpen=20.0)
    model = load_model(path)
    rng = np.random.default_rng(0)
    image = random_image(rng, 70, 50)
    C, V = model.args.canvas_length, model.args.vocab_size
    canvases = [rng.integers(0, V, (1, C)) for _ in range(3)]
    prompt = rng.integers(3, 300, 8).tolist()
    kw = dict(NEAR_GREEDY, max_denoising_steps=8)
    same_canvases(canvases)
    got = list(
        gen.stream_generate(
            model, None, prompt, max_tokens=3 * C, eos_token_ids=[1], seed=0, images=[image], **kw
        )
    )
    got = sum((r.tokens for r in got), [])
    ids = vision_prompt(model, None, prompt, images=[image]).ids
    p = ImageProcessor.for_model(model)([image])
    n = p.num_soft_tokens[0]
    assert n == 266  # 50 x 70 px scaled up, 4-px patches, 280 soft tokens at most
    assert ids == [BOI] + [IMG] * n + [EOI] + prompt  # no tokenizer, no BOS: blocks lead
    same_canvases(canvases)
    with torch.no_grad():
        tids = torch.tensor([ids])
        out = ref.generate(
            tids,
            max_new_tokens=3 * C,
            eos_token_id=[1],
            pixel_values=torch.tensor(p.pixel_values),
            image_position_ids=torch.tensor(p.image_position_ids),
            mm_token_type_ids=(tids == IMG).long(),
            **kw,
        )
    seq = out.sequences[0, len(ids) :].tolist()
    want = seq[: next((i for i, t in enumerate(seq) if t == 1), len(seq))]
    assert got == want and len(want) > C
    same_canvases(canvases)
    text_only = list(
        gen.stream_generate(model, None, prompt, max_tokens=3 * C, eos_token_ids=[1], seed=0, **kw)
    )
    assert sum((r.tokens for r in text_only), []) != got  # the image is read


def test_batch_rows_with_images_equal_single_runs(checkpoint_factory):
    path, _ = checkpoint_factory("sharp0", seed=0, sharpen=20.0)
    model = load_model(path)
    rng = np.random.default_rng(5)
    imgs = [random_image(rng, 40, 40), random_image(rng, 30, 60)]
    prompts = [rng.integers(3, 300, 6).tolist(), rng.integers(3, 300, 11).tolist()]
    canvases = [[rng.integers(0, 384, 16).tolist()] for _ in prompts]
    kw = dict(max_tokens=16, max_denoising_steps=4, seed=0, eos_token_ids=[], **NEAR_GREEDY)
    res = batch_generate(
        model,
        None,
        prompts,
        images=[[imgs[0]], [imgs[1]]],
        initial_canvases=[c[0] for c in canvases],
        **kw,
    )
    for i, p in enumerate(prompts):
        one = list(
            gen.stream_generate(
                model, None, p, images=[imgs[i]], initial_canvas=canvases[i][0], **kw
            )
        )
        assert res.tokens[i] == one[0].tokens


def test_text_only_checkpoint_refuses_images(tiny, tmp_path):
    from mlx_diffusiongemma.convert import convert

    path, _ = tiny
    out = convert(path, tmp_path / "text", text_only=True, log=lambda *a: None)
    model = load_model(out)
    assert not model.has_vision
    text = list(
        gen.stream_generate(
            model, None, [2, 5, 6], max_tokens=16, max_denoising_steps=2, seed=0, eos_token_ids=[]
        )
    )
    assert len(text[0].tokens) == 16  # a text-only conversion still generates
    with pytest.raises(ValueError, match="no vision tower"):
        generate(model, None, [2, 5, 6], images=[np.zeros((8, 8, 3), np.uint8)])
    # a conversion keeps the tower, unquantized, and it loads
    q = load_model(
        convert(path, tmp_path / "q", quantize=True, q_group_size=32, log=lambda *a: None)
    )
    up = q.model.encoder.vision_tower.encoder.layers[0].mlp.up_proj.linear
    assert q.has_vision and "scales" not in up


def test_tower_loads_from_a_layout_without_the_linear_infix(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = tiny
    dst = tmp_path / "flat"
    shutil.copytree(path, dst)
    w = load_file(dst / "model.safetensors")
    w = {k.replace(".linear.weight", ".weight"): v for k, v in w.items()}
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    a, b = load_model(path), load_model(dst)
    pv = mx.array(np.random.default_rng(0).random((1, 630, 48)).astype(np.float32))
    pos = patches(np.random.default_rng(0), 3, 3, 630)[1][None]
    assert np.array_equal(np.array(a.image_features(pv, pos)), np.array(b.image_features(pv, pos)))


class TemplateTokenizer:
    """A stand-in tokenizer: one token per character (ids 3..), placeholders as single ids, and
    a chat template that puts image parts where they are in the content list."""

    bos_token_id, chat_template = 2, "yes"
    specials = {"<|image|>": IMG, "<|video|>": TINY_VIDEO_TOKEN}

    def convert_ids_to_tokens(self, i):
        return {v: k for k, v in self.specials.items()}.get(i, "x")

    def encode(self, text, add_special_tokens=True):
        assert not any(s in text for s in self.specials)  # placeholders never reach encode
        return ([2] if add_special_tokens else []) + [3 + ord(c) % 200 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, **kw):
        out = ""
        for m in messages:
            c = m["content"]
            if not isinstance(c, str):
                c = "".join("<|image|>" if p["type"] == "image" else p.get("text", "") for p in c)
            out += f"[{m['role']}]{c}"
        return out + "[model]"


def test_prompt_layout_follows_the_chat_template(tiny):
    path, _ = tiny
    model = load_model(path)
    tok = TemplateTokenizer()
    img = np.zeros((40, 40, 3), np.uint8)
    n = ImageProcessor.for_model(model)([img]).num_soft_tokens[0]
    vp = vision_prompt(model, tok, "hi", images=[img])
    block = [BOI] + [IMG] * n + [EOI]
    assert vp.ids == tok.encode("[user]", False) + block + tok.encode("hi[model]", False)
    assert vp.vision[IMG].shape == (n, model.args.hidden_size)
    raw = vision_prompt(model, tok, "hi", images=[img], apply_chat_template=False)
    assert raw.ids == [2] + block + tok.encode("hi", False)


def test_video_frames_are_laid_out_as_gemma4(tiny, tmp_path):
    av = pytest.importorskip("av")
    from mlx_diffusiongemma.video import read_video

    path, _ = tiny
    model = load_model(path)
    f = tmp_path / "clip.mp4"
    with av.open(str(f), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(12):  # 3 seconds
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    clip = read_video(f, num_frames=4)
    assert clip.timestamps == [0.0, 0.75, 1.5, 2.25] and clip.frames[0].shape == (32, 48, 3)
    tok = TemplateTokenizer()
    vp = vision_prompt(model, tok, [2, 7, 8], videos=[f], video_frames=4)
    ids = np.array(vp.ids)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, ids == TINY_VIDEO_TOKEN, 0])))[::2]
    n = ImageProcessor(4, 3, 70)([clip.frames[0]]).num_soft_tokens[0]
    assert list(runs) == [n] * 4  # each frame its own run
    assert vp.vision[TINY_VIDEO_TOKEN].shape[0] == 4 * n
    assert vp.ids[-2:] == [7, 8] and vp.ids[1 : 1 + 6] == tok.encode("00:00 ", False)
    got = generate(model, tok, [2, 7, 8], videos=[f], max_tokens=16, max_denoising_steps=2, seed=0)
    assert isinstance(got, str)


def test_cli_image_errors_are_one_line(tiny, tmp_path, capsys):
    import shutil

    from mlx_diffusiongemma.examples.sudoku import write_tokenizer
    from mlx_diffusiongemma.generate import main

    path = tmp_path / "with_tokenizer"
    shutil.copytree(tiny[0], path)
    write_tokenizer(path, 9)  # a small tokenizer that fits the tiny vocabulary
    for flag, value, msg in (
        ("--image", str(tmp_path / "nope.png"), "does not exist"),
        ("--image-soft-tokens", "71", "invalid choice"),
    ):
        try:
            code = main(["--model", str(path), "--prompt", "hi", flag, value])
        except SystemExit as e:
            code = e.code
        assert code not in (0, None)
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1] and "Traceback" not in "\n".join(err)


def test_full_tower_size_matches_the_release():
    """Tower + embed_vision ≈ 573M parameters, 1.07 GiB in bf16 (facts of the released model),
    from the module tree itself."""
    from mlx.utils import tree_flatten

    from benchmarks.harness.vision import FULL_VISION, tower_bytes
    from mlx_diffusiongemma.config import VisionArgs
    from mlx_diffusiongemma.vision import VisionEmbedder, VisionTower

    args = VisionArgs(**FULL_VISION)
    n, bf16 = tower_bytes(args)
    lazy = [VisionTower(args), VisionEmbedder(args, 2816)]  # never evaluated
    assert n == sum(v.size for m in lazy for _, v in tree_flatten(m.parameters()))
    assert 572e6 < n < 574e6 and abs(bf16 / 2**30 - 1.07) < 0.005


def test_padded_head_dim_attention_equals_unpadded(monkeypatch):
    """Metal / CUDA: head_dim 72 runs the fused kernel zero-padded to 80; same result."""
    from mlx_diffusiongemma import vision
    from mlx_diffusiongemma.backends import CPU, DEFAULT, using
    from mlx_diffusiongemma.backends.cpu import attention_cpu

    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((2, 4, 30, 72)).astype(np.float32)) for _ in range(3))
    mask = mx.array(rng.random((2, 1, 1, 30)) > 0.2)
    want = attention_cpu(q, k, v, mask)
    padded = []
    real_pad = mx.pad
    monkeypatch.setattr(vision.mx, "pad", lambda a, w: padded.append(w) or real_pad(a, w))
    with using(CPU):  # the CPU's attention takes head dim 72 as it is
        assert (
            np.abs(np.array(vision.vision_attention(q, k, v, mask)) - np.array(want)).max() < 1e-5
        )
    assert not padded
    with using(DEFAULT):
        got = vision.vision_attention(q, k, v, mask)
    monkeypatch.undo()
    assert padded and padded[0][-1] == (0, 8)
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-5


def test_chat_turn_with_an_image_extends_the_cache_exactly(tiny):
    """A second turn with an image is encoded after the cached first turn (its block starts
    past the cache's offset); the cache equals one pass over the whole conversation."""
    from mlx_diffusiongemma.chat import ChatSession

    path, _ = tiny
    model = load_model(path)
    img = random_image(np.random.default_rng(3), 40, 30)
    s = ChatSession(model, TemplateTokenizer())
    kw = dict(max_tokens=16, max_denoising_steps=2, seed=0, eos_token_ids=[])
    list(s.send("hi", **kw))
    list(s.send("look", images=[img], **kw))
    p = ImageProcessor.for_model(model)([img])
    assert s.history.count(IMG) == p.num_soft_tokens[0]
    feats = model.image_features(p.pixel_values, p.image_position_ids)
    fresh = model.encode(mx.array([s.history]), model.make_cache(), vision={IMG: feats})
    assert fresh.offset == s.cache.offset
    for a, b in zip(fresh.keys, s.cache.keys):
        assert np.abs(np.array(a) - np.array(b)).max() < 1e-4


def test_server_reads_image_url_parts(tiny):
    """An OpenAI image_url part (a data URL) becomes the image's block in the prompt, as
    `vision_prompt` lays it out, and its features are what the scheduler encodes with."""
    import base64
    import io
    import types

    from PIL import Image

    from mlx_diffusiongemma.serving.prompts import chat_prompt
    from mlx_diffusiongemma.serving.requests import RequestError

    path, _ = tiny
    model = load_model(path)
    tok = TemplateTokenizer()
    img = random_image(np.random.default_rng(5), 40, 30)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "look"},
                ],
            }
        ]
    }
    p = types.SimpleNamespace(images=[])
    chat_prompt(body, p, model, tok)
    want = vision_prompt(model, tok, "look", images=[np.asarray(img)])
    assert p.prompt == want.ids and len(p.images) == 1
    got = vision_prompt(model, None, p.prompt, p.images).vision
    assert np.abs(np.array(got[IMG]) - np.array(want.vision[IMG])).max() < 1e-5
    bad = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                ],
            }
        ]
    }
    with pytest.raises(RequestError):
        chat_prompt(bad, types.SimpleNamespace(images=[]), model, tok)
