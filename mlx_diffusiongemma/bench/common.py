"""What the benchmark's sections share (and the project's harness, benchmarks/harness/, with
them): the OpenBLAS re-exec, the machine header, JSON lines, random prompts."""

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
GB, GiB = 1e9, 2**30


def maybe_reexec_with_openblas(argv, entry):
    """Re-runs `entry` + argv with OpenBLAS preloaded (Linux, library present, not yet loaded):
    the MLX wheel's own CPU BLAS is ~20x slower for float32 matmuls. `--no-openblas` keeps it."""
    if not sys.platform.startswith("linux") or "--no-openblas" in argv:
        return
    if os.environ.get("DG_BENCH_REEXEC") or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
    if lib is None:
        print(
            "note: OpenBLAS not found (apt-get install libopenblas0-pthread); MLX CPU matmuls "
            "use the wheel's slow BLAS",
            file=sys.stderr,
        )
        return
    preload = " ".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x)
    env = dict(os.environ, DG_BENCH_REEXEC="1", LD_PRELOAD=preload)
    sys.stdout.flush()
    os.execve(sys.executable, [*entry, *argv], env)


def blas_in_process():
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for lib in ("libopenblas", "libmkl", "libblis"):
        if lib in maps:
            return lib
    return "MLX wheel default"


def _git(*args):
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_name():
    import mlx.core as mx

    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def env_info():
    import mlx.core as mx

    from ..backends.cpu_memory import kept

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        mem = ""
    # the benchmark's own code does not count as a change to the model
    dirty = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "mlx_diffusiongemma",
        ":!mlx_diffusiongemma/benchmark.py",
        ":!mlx_diffusiongemma/bench",
    )
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}){mem}",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "gpu": gpu_name(),
        "blas": blas_in_process(),
        "malloc": "freed memory kept (cpu_memory.py)" if kept() else "default",
        "commit": (_git("rev-parse", "--short", "HEAD") or "?")
        + (" (model code modified)" if dirty else ""),
    }


class Report:
    """The header line every section prints (machine, MLX, device, BLAS, commit) and its figures
    appended to `json_path` as JSON lines."""

    def __init__(self, json_path=None):
        self.json_path = json_path
        self.env = None

    def header(self, section):
        self.env = e = env_info()
        gpu = f" ({e['gpu']})" if e["gpu"] else ""
        print(
            f"== {section} | {e['date']} | {e['machine']} | MLX {e['mlx']} on {e['device']}{gpu}"
            f" | BLAS: {e['blas']} | malloc: {e['malloc']} | commit {e['commit']}",
            flush=True,
        )

    def save(self, section, figures):
        if self.json_path:
            with open(self.json_path, "a") as f:
                row = {"section": section, "env": self.env, **figures}
                f.write(json.dumps(row, default=str) + "\n")


def say(*a):
    print(*a, flush=True)


def random_prompt(n, vocab, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, n).tolist()
