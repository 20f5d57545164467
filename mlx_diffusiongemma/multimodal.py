"""Prompts with images and videos: token ids with each image's block where the chat template
puts it, and the soft-token features the encoder writes over the block's tokens.

Per image: `<|image>` + n × `<|image|>` + `<image|>` (n = its soft tokens). Per video frame,
as Gemma 4's processor: `mm:ss <|image>` + n × `<|video|>` + `<image|>`, frames joined by a space.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import mlx.core as mx

from .image_processor import ImageProcessor
from .video import VIDEO_SOFT_TOKENS, read_video, timestamp

IMAGE_MARKER, VIDEO_MARKER = "<|image|>", "<|video|>"


@dataclass
class VisionPrompt:
    ids: List[int]
    vision: Dict[int, mx.array] = field(default_factory=dict)  # token id -> (n, D) features


def _marker(tokenizer, token_id: int, default: str) -> str:
    """The template's spelling of an image / video placeholder: the token's own string."""
    try:
        text = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:  # a tokenizer without that id (tiny test vocabularies)
        text = None
    return text if isinstance(text, str) and text.startswith("<") else default


def _blocks(model, images, videos, max_soft_tokens=None, video_frames=None, features=True):
    """Token blocks per image and per video, and (with `features`) the tower's features."""
    args = model.args
    image_blocks, video_blocks, vision = [], [], {}
    if images:
        processed = ImageProcessor.for_model(model, max_soft_tokens)(list(images))
        if features:
            vision[args.image_token_id] = model.image_features(
                processed.pixel_values, processed.image_position_ids
            )
        image_blocks = [
            [args.boi_token_id] + [args.image_token_id] * n + [args.eoi_token_id]
            for n in processed.num_soft_tokens
        ]
    if videos:
        proc = ImageProcessor.for_model(model, VIDEO_SOFT_TOKENS)
        frames, feats = [], []
        for v in videos:
            clip = read_video(v, num_frames=video_frames)
            processed = proc(clip.frames)
            if features:
                feats.append(
                    model.image_features(processed.pixel_values, processed.image_position_ids)
                )
            frames.append(
                [(timestamp(t), n) for t, n in zip(clip.timestamps, processed.num_soft_tokens)]
            )
        if features:
            vision[args.video_token_id] = mx.concatenate(feats, axis=0)
        video_blocks = [
            [
                (f"{stamp} ", [args.boi_token_id] + [args.video_token_id] * n + [args.eoi_token_id])
                for stamp, n in clip_frames
            ]
            for clip_frames in frames
        ]
    return image_blocks, video_blocks, vision


def _render(tokenizer, prompt, n_images, n_videos, system_prompt, enable_thinking, markers):
    """The chat template with image / video content parts (where it places them); if the
    template does not render such parts, with the placeholders leading the user's text."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    parts = (
        [{"type": "image"}] * n_images
        + [{"type": "video"}] * n_videos
        + [{"type": "text", "text": prompt}]
    )
    kw = dict(tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking)
    try:
        text = tokenizer.apply_chat_template(head + [{"role": "user", "content": parts}], **kw)
        if (
            text.count(markers[0]) == n_images
            and text.count(markers[1]) == n_videos
            and prompt.strip() in text
        ):
            return text
    except Exception:  # templates that take string content only
        pass
    content = markers[0] * n_images + markers[1] * n_videos + prompt
    return tokenizer.apply_chat_template(head + [{"role": "user", "content": content}], **kw)


def _expand(tokenizer, text: str, markers, image_blocks, video_blocks, bos=()) -> List[int]:
    """Token ids of `text` after `bos`, each placeholder replaced by its block, in order."""
    ids: List[int] = list(bos)
    pending_images, pending_videos = list(image_blocks), list(video_blocks)
    rest = text
    while True:
        hits = [(rest.find(m), m) for m in markers if m and rest.find(m) >= 0]
        if not hits:
            break
        pos, m = min(hits)
        ids += _encode(tokenizer, rest[:pos])
        if m == markers[0]:
            ids += pending_images.pop(0)
        else:
            for n, (stamp, block) in enumerate(pending_videos.pop(0)):
                ids += _encode(tokenizer, (" " if n else "") + stamp) + block
        rest = rest[pos + len(m) :]
    return ids + _encode(tokenizer, rest)


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def placeholders(model, tokenizer, n_images: int, n_videos: int = 0) -> str:
    """The text that marks where `n_images` images and `n_videos` videos go in a prompt."""
    return (
        _marker(tokenizer, model.args.image_token_id, IMAGE_MARKER) * n_images
        + _marker(tokenizer, model.args.video_token_id, VIDEO_MARKER) * n_videos
    )


def expand_text(
    model, tokenizer, text: str, images=None, videos=None, max_soft_tokens: Optional[int] = None
) -> List[int]:
    """Token ids of already templated `text` (no BOS added) whose placeholders, one per image
    and video in order, become their blocks (the tower is not run: pass the same images with
    these ids to `stream_generate`)."""
    images, videos = list(images or []), list(videos or [])
    markers = (
        _marker(tokenizer, model.args.image_token_id, IMAGE_MARKER),
        _marker(tokenizer, model.args.video_token_id, VIDEO_MARKER),
    )
    if text.count(markers[0]) != len(images) or text.count(markers[1]) != len(videos):
        raise ValueError(
            f"the text has {text.count(markers[0])} image placeholders for {len(images)} images"
        )
    image_blocks, video_blocks, _ = _blocks(model, images, videos, max_soft_tokens, features=False)
    return _expand(tokenizer, text, markers, image_blocks, video_blocks)


def vision_prompt(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    images=None,
    videos=None,
    system_prompt=None,
    enable_thinking=False,
    apply_chat_template=True,
    max_soft_tokens: Optional[int] = None,
    video_frames: Optional[int] = None,
    bos_token_id: Optional[int] = None,
) -> VisionPrompt:
    """Token ids and features for a prompt with `images` (paths, URLs, data URLs, PIL images or
    arrays) and `videos` (paths). Text goes through the chat template where the tokenizer has
    one; ids are taken as given when they already hold the blocks, or get them after the BOS."""
    images, videos = list(images or []), list(videos or [])
    if not model.has_vision:
        raise ValueError(
            "this checkpoint has no vision tower (a text-only conversion): it cannot read images"
        )
    args = model.args
    used = [args.boi_token_id, args.eoi_token_id] + [args.image_token_id] * bool(images)
    if any(t >= args.vocab_size for t in used + [args.video_token_id] * bool(videos)):
        raise ValueError(
            f"this checkpoint's image token ids lie outside its vocabulary "
            f"({args.vocab_size} tokens): it cannot read images"
        )
    image_blocks, video_blocks, vision = _blocks(
        model, images, videos, max_soft_tokens, video_frames
    )
    if isinstance(prompt, str):
        if not prompt.strip() and not (images or videos):
            raise ValueError("the prompt is empty")
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (pass token ids with tokenizer=None)")
        markers = (
            _marker(tokenizer, model.args.image_token_id, IMAGE_MARKER),
            _marker(tokenizer, model.args.video_token_id, VIDEO_MARKER),
        )
        if apply_chat_template and getattr(tokenizer, "chat_template", None):
            text = _render(
                tokenizer, prompt, len(images), len(videos), system_prompt, enable_thinking, markers
            )
            ids = _expand(tokenizer, text, markers, image_blocks, video_blocks)
        else:
            if prompt.count(markers[0]) != len(images) or prompt.count(markers[1]) != len(videos):
                prompt = markers[0] * len(images) + markers[1] * len(videos) + prompt
            bos = list(tokenizer.encode("", add_special_tokens=True))  # what encode() leads with
            ids = _expand(tokenizer, prompt, markers, image_blocks, video_blocks, bos)
        return VisionPrompt(ids, vision)
    ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
    wanted = {t: int(f.shape[0]) for t, f in vision.items()}
    if all(sum(1 for t in ids if t == tok) == n for tok, n in wanted.items()):
        return VisionPrompt(ids, vision)
    if any(t in wanted for t in ids):
        raise ValueError("the prompt's image tokens do not match the images given")
    blocks = [t for b in image_blocks for t in b]
    for clip in video_blocks:
        for n, (stamp, block) in enumerate(clip):
            blocks += _encode(tokenizer, (" " if n else "") + stamp) if tokenizer else []
            blocks += block
    if bos_token_id is None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
    at = 1 if ids and bos_token_id is not None and ids[0] == bos_token_id else 0
    return VisionPrompt(ids[:at] + blocks + ids[at:], vision)
