"""Smoke test of `python -m mlx_diffusiongemma.benchmark` and of the project's harness
(`python -m benchmarks.harness`): the analytic weights section, a tiny CPU dry run of the GPU
section and the graph-building section (nothing computed), as subprocesses (through the entry
point and its OpenBLAS re-exec), checking that they exit 0, print their key figure lines and
write their JSON lines. The long sections (build, fullwidth, peers, profile) are only checked to
parse their arguments."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench(*args, timeout=180, entry="mlx_diffusiongemma.benchmark"):
    p = subprocess.run(
        [sys.executable, "-m", entry, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def assert_lines(out, *patterns):
    for pat in patterns:
        assert re.search(pat, out, re.MULTILINE), f"no line matches {pat!r} in:\n{out}"


def json_lines(path):
    return {d["section"]: d for d in map(json.loads, path.read_text().splitlines())}


def test_weights(tmp_path):
    out = bench("weights", "--json", str(tmp_path / "w.jsonl"))
    row = r"\s+[\d,]+\s+\d+\.\d\d\s+\d+\.\d\d$"
    assert_lines(
        out,
        r"^== weights: resident text-model weight bytes, full shape .* \| MLX .* \| BLAS: .* \| commit ",
        r"^  mixed 4-bit \(default: 8-bit embeddings/attention/dense MLP/router, 4-bit experts\)"
        + row,
        r"^  uniform 4-bit" + row,
        r"^  8-bit" + row,
        r"^  bf16" + row,
        r"^  mixed 4-bit by part: experts \d+\.\d{3} GB, embeddings \d+\.\d{3} GB",
        r"^  target <= 16 GB resident at 4 bits: mixed \d+\.\d\d GB \((met|missed) by \d+\.\d\d GB\)",
        r"^  \(\d+ s wall",
    )
    figures = json_lines(tmp_path / "w.jsonl")
    assert set(figures) == {"weights", "weights:run"}
    recipes = figures["weights"]["recipes"]
    assert len(recipes) == 4
    for r in recipes.values():
        assert r["bytes"] == sum(r["by_category"].values()) > 0


def test_gpu_dry_run(tmp_path):
    # the tiny shape at one layer and a small vocabulary: quantized matmuls are slow on a CPU
    out = bench(
        "gpu",
        "--allow-cpu",
        "--shape",
        "tiny",
        "--layers",
        "1",
        "--vocab",
        "256",
        "--prompt",
        "64",
        "--chunk",
        "64",
        "--max-tokens",
        "256",
        "--steps",
        "2",
        "--repeat",
        "1",
        "--wait-idle",
        "0",
        "--json",
        str(tmp_path / "g.jsonl"),
    )
    assert_lines(
        out,
        r"^== gpu: tiny shape, 1 layers, vocab 256, mixed 4-bit, 64-token prompt, 2 fixed steps \| ",
        r"^  weights \d+\.\d{3} GB, built in \d+ s$",
        r"^  prefill: 64 tokens in \d+ ms = \d+ tok/s$",
        r"^  decoder step latency \(forward, logits\) [\d.]+ ms; full step with sampler and self-conditioning "
        r"[\d.]+ ms \(sampler [\d.]+ ms, self-conditioning [\d.]+ ms: [\d.]+% of the step\)$",
        r"^  generation: 256 tokens, 2 decoder forwards, [\d.]+ tok/s, [\d.]+ ms per 256-token canvas",
        r"^  vLLM H100 FP8",
        r"^  \(\d+ s wall",
    )
    figures = json_lines(tmp_path / "g.jsonl")
    assert set(figures) == {"gpu", "gpu:run"}
    g = figures["gpu"]
    assert (g["layers"], g["vocab"], g["tokens"], g["forwards"]) == (1, 256, 256, 2)
    assert g["decode_step_s"] > 0 and g["generation_tps"] > 0


def test_graph(tmp_path):
    out = bench(
        "graph", "--repeat", "2", "--json", str(tmp_path / "g.jsonl"), entry="benchmarks.harness"
    )
    assert_lines(
        out,
        r"^== graph: host time to issue one denoising step at full shape, compiled and not, ",
        r"^  a generation of 8 canvases from a 4096-token prompt, compiled: 2 traces ",
        r"^  one step \(30 layers, mixed 4-bit, .*fastest of 20: compiled [\d.]+ ms, uncompiled ",
        r"^  the bundled demo, 8 Sudokus through stream_generate .* compiled output equal to "
        r"uncompiled: True",
    )
    g = json_lines(tmp_path / "g.jsonl")["graph"]
    assert g["layers"] == 30 and len(g["times_s"]) == 20 and g["build_s"] > 0
    assert g["build_uncompiled_s"] > 0 and g["traces_per_generation"] == 2


@pytest.mark.parametrize("section", ["build", "fullwidth", "lora", "sudoku"])
def test_long_sections_parse(section):
    from mlx_diffusiongemma.bench.cli import parse

    o = parse([section])
    assert o.section == section


@pytest.mark.parametrize(
    "section", ["peers", "profile", "_reference", "vision", "_vision_reference"]
)
def test_harness_sections_parse(section):
    from benchmarks.harness.__main__ import CHILDREN, SECTIONS
    from mlx_diffusiongemma.bench.cli import parse

    o = parse([section], {**SECTIONS, **CHILDREN})
    assert o.section == section


def test_harness_section_named_to_the_package_command():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma.benchmark", "peers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "python -m benchmarks.harness peers" in out.stderr


def test_lora_tiny(tmp_path):
    # the tiny shape (32-token canvas): three memory runs (each in its own process, plain and
    # with --grad-checkpoint's checkpointing, uncompiled: no C++ kernel builds), the fit and the 30-layer extrapolation, then two LoRA
    # steps through the trainer for the speed figure (with --grad-checkpoint); the depth part
    # runs the whole (2-layer) model once
    out = bench(
        "lora",
        "--shape",
        "tiny",
        "--quick",
        "--no-compile",
        "--prompt",
        "16",
        "--batch-size",
        "1",
        "--train-prompt",
        "16",
        "--repeat",
        "1",
        "--grad-checkpoint",
        "--wait-idle",
        "0",
        "--json",
        str(tmp_path / "l.jsonl"),
        timeout=900,
    )
    assert_lines(
        out,
        r"^== lora: LoRA training step, peak memory at tiny width .* \| commit ",
        r"^    sliding \+ full +vocab +512 plain +: peak +\d+\.\d\d GB = weights ",
        r"^    sliding \+ full +vocab +2048 checkpointed: peak ",
        r"^  30-layer constants: mixed 4-bit weights \d+\.\d\d GB .* LoRA [\d.]+M parameters",
        r"^  without grad checkpointing: step = ",
        r"^    extrapolated peak, \d+\+\d+ layers, vocab 4096: .* = \d+\.\d\d GB .*target <= 24 GB: (met|missed)",
        r"^  with --grad-checkpoint: step = ",
        r"^  depth: tiny shape, all 2 layers \(1 sliding \+ 1 full\), vocab 4096, ",
        r"^    --num-layers  16: skipped \(the tiny shape has 2 layers\)",
        r"^    --num-layers  -1: measured peak +\d+\.\d\d GB = shared float32 weights ",
        r"^      with the mixed 4-bit weights \(\d+\.\d\d GB\): peak \d+\.\d\d GB .*target <= 24 GB: (met|missed)",
        r"^  speed: tiny shape .*\(mlx-lm's compiled step, --grad-checkpoint\); 1 timed iterations",
        r"^  LoRA step at the tiny shape: [\d.]+ it/s, [\d.]+ tokens/s \(48 tokens a step",
    )
    figures = json_lines(tmp_path / "l.jsonl")
    assert set(figures) == {"lora:memory", "lora:depth", "lora:speed", "lora:run"}
    (d,) = figures["lora:depth"]["runs"]
    assert d["num_layers"] == -1 and d["checkpoint"]["transient"] > 0
    assert (
        d["peak30"]
        == d["weights30_mixed4"]
        + d["adapters"]
        + d["checkpoint"]["optimizer"]
        + d["checkpoint"]["transient"]
    )
    m = figures["lora:memory"]
    assert len(m["plain"]["runs"]) == len(m["checkpoint"]["runs"]) == 3
    assert m["optimizer30"] == 2 * m["adapters30"] > 0
    for kind in ("plain", "checkpoint"):
        assert m[kind]["peak30"] > m["weights30_mixed4"] + 3 * m["adapters30"]
    s = figures["lora:speed"]
    assert s["it_per_s"] > 0 and s["tokens_per_step"] == 48 and len(s["step_s"]) == 1
    assert s["grad_checkpoint"] is True and s["peak_gb"] > 0


def test_lora_memory_plot_reads_the_depth_logs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from lora_memory_plot import read_runs
    finally:
        sys.path.pop(0)
    runs = read_runs(ROOT / "benchmarks/logs/lora_depth/after-35e089b.txt")
    assert runs == [(-1, 15.40, 0.992, 1.984, 5.253), (16, 15.40, 0.529, 1.059, 3.319)]
