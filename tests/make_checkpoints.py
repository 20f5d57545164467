"""Writes tiny random DiffusionGemma checkpoints with the transformers reference.

Used by the tests (and runnable by hand: `python tests/make_checkpoints.py OUT_DIR`). Norm
weights, router scales and layer scalars are randomised so that none of them is a silent 1.0;
so are the vision tower's norms, position table and standardize bias and scale.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModel, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

TINY_TEXT = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=8,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    max_position_embeddings=4096,
    attention_k_eq_v=True,
    use_bidirectional_attention="vision",
    final_logit_softcapping=30.0,
)
# The tower the text weights were first drawn beside: building it first keeps their random
# stream (and so every text test's weights) as it was; TINY_VISION then replaces it.
FIRST_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    position_embedding_size=64,
)
# 4-pixel patches keep images small (70 soft tokens: 630 patches of 4 px, ~100 x 100 px).
TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    position_embedding_size=128,
    patch_size=4,
    standardize=True,
)
# Image tokens inside the tiny vocabulary.
TINY_TOKENS = dict(boi_token_id=380, image_token_id=381, eoi_token_id=382)
TINY_VIDEO_TOKEN = 383


def build_reference(seed=0, canvas_length=16, sharpen=1.0, vision=None, **text_overrides):
    text = dict(TINY_TEXT, **text_overrides)
    cfg = DiffusionGemmaConfig(
        text_config=text, vision_config=FIRST_VISION, canvas_length=canvas_length, **TINY_TOKENS
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    vision_cfg = Gemma4VisionConfig(**dict(TINY_VISION, **(vision or {})))
    torch.manual_seed(seed + 3)
    model.model.encoder.vision_tower = AutoModel.from_config(vision_cfg).eval()
    model.config.vision_config = vision_cfg
    g = torch.Generator().manual_seed(seed + 1)
    gv = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gv))
                elif name.endswith("position_embedding_table"):  # initialised to ones
                    p.copy_(torch.randn(p.shape, generator=gv))
                continue
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.7 + 0.6 * torch.rand(b.shape, generator=g))
            elif name.endswith("std_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gv))
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gv))
            elif name.endswith(("input_max", "output_max")):  # clipped linears: real bounds
                b.fill_(2.0 if "input" in name else 3.0)
            elif name.endswith(("input_min", "output_min")):
                b.fill_(-2.0 if "input" in name else -3.0)
        if sharpen != 1.0:  # larger embeddings give peaked logits (near-greedy generation tests)
            model.model.decoder.embed_tokens.weight.mul_(sharpen)
    return model


def write_checkpoint(
    out_dir, seed=0, canvas_length=16, sharpen=1.0, generation=None, vision=None, **text_overrides
):
    model = build_reference(seed, canvas_length, sharpen, vision, **text_overrides)
    out = Path(out_dir)
    model.save_pretrained(out)
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    # Gemma 4's <|video|>: DiffusionGemma's config has no such key
    cfg["video_token_id"] = TINY_VIDEO_TOKEN
    cfg_file.write_text(json.dumps(cfg, indent=2))
    if generation is not None:
        gen_file = out / "generation_config.json"
        cfg = json.loads(gen_file.read_text())
        cfg.update(generation)
        gen_file.write_text(json.dumps(cfg, indent=2))
    return model


if __name__ == "__main__":
    write_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "tiny-diffusiongemma")
