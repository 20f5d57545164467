"""Smoke tests of `python -m mlx_diffusiongemma.benchmark` and of the project's harness
(`python -m benchmarks.harness`), as subprocesses through their entry points (and the OpenBLAS
re-exec): a user's checkpoint measured with small -p/-g/-n, one prompt and a batch; bad input
as one line; the analytic weights section; tiny CPU dry runs of `gpu` and `gpu-step`; the
graph-building section (nothing computed); the server section at two requests; the LoRA
section at the tiny shape. The long sections (build, fullwidth, peers, profile, vision, sudoku)
are only checked to parse their arguments."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"\d+\.\d{3}"


def run(*args, entry="mlx_diffusiongemma.benchmark", timeout=180):
    return subprocess.run(
        [sys.executable, "-m", entry, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bench(*args, entry="mlx_diffusiongemma.benchmark", timeout=180):
    p = run(*args, entry=entry, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def assert_lines(out, *patterns):
    for pat in patterns:
        assert re.search(pat, out, re.MULTILINE), f"no line matches {pat!r} in:\n{out}"


def json_lines(path):
    return {d["section"]: d for d in map(json.loads, path.read_text().splitlines())}


def trial_line(label):
    keys = ("prompt_tps", "generation_tps", "steps_per_canvas", "tokens_per_forward", "step_ms")
    figures = ", ".join(f"{k}={NUMBER}" for k in (*keys, "peak_memory"))
    return rf"^Averages: {figures}$" if label == "Averages" else rf"^{label}:  {figures}, total"


@pytest.mark.parametrize("batch", [1, 2])
def test_model(text_demo, tmp_path, batch):
    # 2 canvases of 32 tokens at 4 fixed steps: every figure is known but the times
    out = bench(
        "--model",
        str(text_demo),
        *("-p", "16", "-g", "64", "-b", str(batch), "-n", "2", "--steps", "4"),
        *("--dtype", "float32", "--json", str(tmp_path / "m.jsonl")),
    )
    assert_lines(
        out,
        rf"^== model: {re.escape(str(text_demo))} \| .* \| BLAS: .* \| commit ",
        r"^Running warmup\.\.$",
        rf"^Timing with prompt_tokens=16, generation_tokens=64, batch_size={batch}, steps=4",
        trial_line("Trial 1"),
        trial_line("Trial 2"),
        trial_line("Averages"),
    )
    m = json_lines(tmp_path / "m.jsonl")["model"]
    assert len(m["trials"]) == 2
    avg = m["averages"]
    assert avg["steps_per_canvas"] == 4 and avg["tokens_per_forward"] == 32 * batch / 4
    assert avg["prompt_tps"] > 0 and avg["generation_tps"] > 0 and avg["peak_memory"] > 0


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--model", "/nonexistent/model"], 1, "error: model path '/nonexistent/model' does not"),
        (["-g", "0"], 1, "error: --generation-tokens must be at least 1 (got 0)"),
        (["--prompt-tokens", "x"], 2, "mlx_diffusiongemma.benchmark: error: argument -p/"),
        (["lora", "--part", "speed"], 2, "error: lora is a section of the project's measuring"),
    ],
)
def test_bad_input_is_one_line(args, status, message):
    p = run(*args, timeout=60)
    assert p.returncode == status, p.stderr
    assert p.stderr.startswith(message) and len(p.stderr.strip().splitlines()) == 1, p.stderr


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
    )
    recipes = json_lines(tmp_path / "w.jsonl")["weights"]["recipes"]
    assert len(recipes) == 4
    for r in recipes.values():
        assert r["bytes"] == sum(r["by_category"].values()) > 0


# the tiny shape at one layer and a small vocabulary: quantized matmuls are slow on a CPU
TINY = ("--allow-cpu", "--shape", "tiny", "--layers", "1", "--vocab", "256")


def test_gpu_dry_run(tmp_path):
    # the old spellings of -p, -g, -n and --prefill-step-size, as GPU runbooks give them
    out = bench(
        "gpu",
        *TINY,
        *("--prompt", "64", "--chunk", "64", "--max-tokens", "256", "--steps", "1"),
        *("--repeat", "1", "--json", str(tmp_path / "g.jsonl")),
    )
    assert_lines(
        out,
        r"^== gpu: tiny shape, 1 layers, vocab 256, mixed 4-bit, random weights \| ",
        r"^  weights \d+\.\d{3} GB, built in \d+ s$",
        r"^Timing with prompt_tokens=64, generation_tokens=256, batch_size=1, steps=1, canvas=256",
        trial_line("Trial 1"),
        trial_line("Averages"),
        r"^  [\d.]+ ms per denoising step, [\d.]+ ms per 256-token canvas; vLLM H100 FP8",
    )
    g = json_lines(tmp_path / "g.jsonl")["gpu"]
    assert (g["options"]["layers"], g["options"]["vocab"]) == (1, 256)
    assert g["averages"]["tokens_per_forward"] == 256 and g["averages"]["generation_tps"] > 0


def test_gpu_step_dry_run(tmp_path):
    out = bench(
        "gpu-step",
        *TINY,
        *("--prompt", "16", "--chunk", "16", "--repeat", "1", "--wait-idle", "0"),
        *("--json", str(tmp_path / "g.jsonl")),
        entry="benchmarks.harness",
    )
    assert_lines(
        out,
        r"^== gpu-step: tiny shape, 1 layers, vocab 256, mixed 4-bit, 16-token prompt \| ",
        r"^  prefill: 16 tokens in \d+ ms = \d+ tok/s$",
        r"^  decoder step latency \(forward, logits\) [\d.]+ ms; full step with sampler and self-conditioning "
        r"[\d.]+ ms \(sampler [\d.]+ ms, self-conditioning [\d.]+ ms: [\d.]+% of the step\)$",
        r"^  \(\d+ s wall",
    )
    figures = json_lines(tmp_path / "g.jsonl")
    assert set(figures) == {"gpu-step", "gpu-step:run"}
    assert figures["gpu-step"]["decode_step_s"] > 0


def test_graph(tmp_path):
    out = bench(
        "graph", "--repeat", "2", "--json", str(tmp_path / "g.jsonl"), entry="benchmarks.harness"
    )
    assert_lines(
        out,
        r"^== graph: host time to issue one denoising step at full shape, compiled and not, ",
        r"^  a generation of 8 canvases from a 4096-token prompt, compiled: 2 traces ",
        r"^  one step \(30 layers, mixed 4-bit, .*fastest of 20: compiled [\d.]+ ms, uncompiled ",
        r"^  per operation: replayed [\d.]+ us, .* one operation each\): compiled [\d.]+ ms ",
        r"^  the bundled demo, 8 Sudokus through stream_generate .* compiled output equal to "
        r"uncompiled: True",
    )
    g = json_lines(tmp_path / "g.jsonl")["graph"]
    assert g["layers"] == 30 and len(g["times_s"]) == 20 and g["build_s"] > 0
    assert g["build_uncompiled_s"] > 0 and g["traces_per_generation"] == 2
    one = g["fast_ops_as_one"]  # a GPU host's graph: fewer operations on a CPU, as many on a GPU
    assert one["nodes_per_step"] <= g["nodes_per_step"] and one["build_s"] > 0
    assert one["nodes_per_step_uncompiled"] <= g["nodes_per_step_uncompiled"]


def test_serve():
    # the scheduler's thread used to outlive the interpreter's finalization now and then, which
    # aborted the process ("terminate called without an active exception", exit 134)
    p = run(
        "serve",
        *("--concurrency", "2", "--repeat", "1", "--request-tokens", "32", "--wait-idle", "0"),
        entry="benchmarks.harness",
    )
    assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr
    assert_lines(
        p.stdout,
        r"^  2 requests: in turn +[\d.]+ s \( *[\d.]+ tok/s\), at once +[\d.]+ s .* answers ",
    )


@pytest.mark.parametrize(
    "section",
    [
        "build",
        "fullwidth",
        "lora",
        "sudoku",
        "peers",
        "profile",
        "_reference",
        "vision",
        "_vision_reference",
    ],
)
def test_harness_sections_parse(section):
    from benchmarks.harness.__main__ import CHILDREN, SECTIONS
    from benchmarks.harness.cli import parse

    o = parse([section], {**SECTIONS, **CHILDREN})
    assert o.section == section


def test_package_section_named_to_the_harness():
    p = run("gpu", "--allow-cpu", entry="benchmarks.harness", timeout=60)
    assert p.returncode == 1
    assert "python -m mlx_diffusiongemma.benchmark gpu --allow-cpu" in p.stderr


def test_lora_tiny(tmp_path):
    # the tiny shape (32-token canvas): three memory runs (each in its own process, plain and
    # with --grad-checkpoint's checkpointing, uncompiled: no C++ kernel builds), the fit and the
    # 30-layer extrapolation, then two LoRA steps through the trainer for the speed figure (with
    # --grad-checkpoint); the depth part runs the whole (2-layer) model once
    out = bench(
        "lora",
        *("--shape", "tiny", "--quick", "--no-compile", "--prompt", "16", "--batch-size", "1"),
        *("--train-prompt", "16", "--repeat", "1", "--grad-checkpoint", "--wait-idle", "0"),
        *("--json", str(tmp_path / "l.jsonl")),
        entry="benchmarks.harness",
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
