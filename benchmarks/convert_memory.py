"""Peak memory of `mlx_diffusiongemma.convert` on a multi-GB checkpoint (not a unit test).

Writes a synthetic bf16 checkpoint in the real key layout and full-size tensors of
google/diffusiongemma-26B-A4B-it (hidden 2816, vocab 262144, 128 experts) with fewer layers,
shard by shard straight from numpy (a few MB of RAM), converts it to 4-bit (the default mixed
recipe) in a child process and reports the child's peak RSS against the checkpoint size.

    python benchmarks/convert_memory.py [--layers 2] [--workdir /tmp/dg-convert-bench] [--keep]
"""

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
D, V, E, I_MOE, I_DENSE = 2816, 262144, 128, 704, 2112
HEADS, KV, HEAD, GHEAD, GKV = 16, 8, 256, 512, 2


def layout(layers: int):
    """(name, shape) of every tensor, in the checkpoint's key names."""
    t = [("model.decoder.embed_tokens.weight", (V, D)), ("model.decoder.norm.weight", (D,))]
    for n in ("gate_proj", "up_proj"):
        t.append((f"model.decoder.self_conditioning.{n}.weight", (I_DENSE, D)))
    t += [
        ("model.decoder.self_conditioning.down_proj.weight", (D, I_DENSE)),
        ("model.decoder.self_conditioning.pre_norm.weight", (D,)),
    ]
    for i in range(layers):
        full = i == layers - 1 or (i + 1) % 6 == 0
        hd, kv = (GHEAD, GKV) if full else (HEAD, KV)
        p = f"model.decoder.layers.{i}."
        t += [
            (p + "self_attn.q_proj.weight", (HEADS * hd, D)),
            (p + "self_attn.k_proj.weight", (kv * hd, D)),
        ]
        if not full:
            t.append((p + "self_attn.v_proj.weight", (kv * hd, D)))
        t += [
            (p + "self_attn.o_proj.weight", (D, HEADS * hd)),
            (p + "self_attn.q_norm.weight", (hd,)),
            (p + "self_attn.k_norm.weight", (hd,)),
            (p + "mlp.gate_proj.weight", (I_DENSE, D)),
            (p + "mlp.up_proj.weight", (I_DENSE, D)),
            (p + "mlp.down_proj.weight", (D, I_DENSE)),
            (p + "router.proj.weight", (E, D)),
            (p + "router.scale", (D,)),
            (p + "router.per_expert_scale", (E,)),
            (p + "experts.gate_up_proj", (E, 2 * I_MOE, D)),
            (p + "experts.down_proj", (E, D, I_MOE)),
            (p + "layer_scalar", (1,)),
            (f"model.encoder.language_model.layers.{i}.layer_scalar", (1,)),
        ]
        t += [
            (p + n + ".weight", (D,))
            for n in (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
                "post_feedforward_layernorm_1",
                "post_feedforward_layernorm_2",
                "pre_feedforward_layernorm_2",
            )
        ]
    # A token of the vision tower, copied through unquantized.
    t += [
        ("model.encoder.embed_vision.embedding_projection.weight", (D, 1152)),
        ("model.encoder.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight", (4304, 1152)),
    ]
    return t


def config(layers: int) -> dict:
    types = [
        "full_attention" if (i == layers - 1 or (i + 1) % 6 == 0) else "sliding_attention"
        for i in range(layers)
    ]
    text = dict(
        model_type="diffusion_gemma_text",
        vocab_size=V,
        hidden_size=D,
        intermediate_size=I_DENSE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HEAD,
        global_head_dim=GHEAD,
        num_global_key_value_heads=GKV,
        attention_k_eq_v=True,
        num_experts=E,
        top_k_experts=8,
        moe_intermediate_size=I_MOE,
        layer_types=types,
        sliding_window=1024,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        use_bidirectional_attention="vision",
        tie_word_embeddings=True,
    )
    return dict(
        architectures=["DiffusionGemmaForBlockDiffusion"],
        model_type="diffusion_gemma",
        canvas_length=256,
        dtype="bfloat16",
        text_config=text,
        vision_config={"model_type": "gemma4_vision"},
        tie_word_embeddings=True,
    )


def write_bf16_shard(path: Path, tensors, rng, chunk=1 << 24):
    """Random bf16 (normal * 0.02, norms near 1) written in chunks of `chunk` elements."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape in tensors:
            left = int(np.prod(shape))
            one = len(shape) == 1
            while left:
                k = min(left, chunk)
                x = rng.standard_normal(k, dtype=np.float32) * (0.1 if one else 0.02) + (
                    1.0 if one else 0.0
                )
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
                left -= k


def write_checkpoint(out: Path, layers: int, shard_bytes=2 * GiB):
    out.mkdir(parents=True)
    shards, size = [[]], 0
    for name, shape in layout(layers):
        n = int(np.prod(shape)) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_bf16_shard(out / name, tensors, rng)
        weight_map.update({t: name for t, _ in tensors})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(json.dumps(config(layers), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [1, 106, 50], "pad_token_id": 0})
    )


CHILD = """
import json, resource, sys, time
t = time.time()
from mlx_diffusiongemma.convert import main
rc = main(sys.argv[1:])
r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rc": rc, "maxrss_bytes": r if sys.platform == "darwin" else r * 1024, "seconds": time.time() - t}))
"""


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/dg-convert-bench")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--convert-args", default="-q", help="flags for the converter (default: -q)")
    a = ap.parse_args()
    work = Path(a.workdir)
    src, out = work / f"hf-{a.layers}L", work / f"mlx-{a.layers}L"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    write_checkpoint(src, a.layers)
    ckpt = folder_bytes(src)
    largest = max(int(np.prod(s)) * 2 for _, s in layout(a.layers))
    print(
        f"synthetic checkpoint: {ckpt / GiB:.2f} GiB in {time.time() - t:.0f} s "
        f"(writer peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB), "
        f"largest tensor {largest / GiB:.2f} GiB",
        flush=True,
    )
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        "--hf-path",
        str(src),
        "--mlx-path",
        str(out),
        *a.convert_args.split(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"conversion failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    peak = res["maxrss_bytes"]
    # The output loads (lazily: the names, shapes and quantization all check out).
    from mlx_diffusiongemma.loader import load_model

    load_model(out, lazy=True)
    import mlx.core as mx

    print(
        json.dumps(
            {
                "layers": a.layers,
                "checkpoint_gib": round(ckpt / GiB, 2),
                "output_gib": round(folder_bytes(out) / GiB, 2),
                "largest_tensor_gib": round(largest / GiB, 2),
                "peak_rss_gib": round(peak / GiB, 2),
                "peak_over_checkpoint": round(peak / ckpt, 3),
                "convert_seconds": round(res["seconds"], 1),
                "flags": a.convert_args,
                "mlx": mx.__version__,
                "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            },
            indent=1,
        )
    )
    if not a.keep:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        if work.exists() and not any(work.iterdir()):
            work.rmdir()


if __name__ == "__main__":
    main()
