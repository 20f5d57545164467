"""What every section shares: the OpenBLAS re-exec, the machine header, the CPU-share meter and
idle wait, timing, JSON lines, and the mid-size random checkpoint."""

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .shapes import FULL_CANVAS, MID_TEXT

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
# the command every re-execution and child process runs
ENTRY = [sys.executable, "-m", "mlx_diffusiongemma.benchmark"]


# ---------------------------------------------------------------------------------------------
# process setup
# ---------------------------------------------------------------------------------------------
def find_openblas():
    for p in OPENBLAS_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


def maybe_reexec_with_openblas(argv, entry=None):
    """Re-runs this command (`entry` + argv; default the benchmark's) with OpenBLAS preloaded
    (Linux, library present, not yet loaded)."""
    if not sys.platform.startswith("linux") or "--no-openblas" in argv:
        return
    if os.environ.get("DG_BENCH_REEXEC") or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = find_openblas()
    if lib is None:
        print(
            "note: OpenBLAS not found (apt-get install libopenblas0-pthread); MLX CPU matmuls "
            "use the wheel's slow BLAS",
            file=sys.stderr,
        )
        return
    env = dict(
        os.environ,
        DG_BENCH_REEXEC="1",
        LD_PRELOAD=" ".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x),
    )
    sys.stdout.flush()
    os.execve(sys.executable, [*(entry or ENTRY), *argv], env)


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


def _proc_kib(path, field):
    """A `field: N kB` line of a /proc file, in bytes, or None."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes(field="VmRSS"):
    return _proc_kib("/proc/self/status", field)


def mem_available():
    return _proc_kib("/proc/meminfo", "MemAvailable")


def _malloc_kept():
    try:
        from ..backends.cpu_memory import kept
    except ImportError:  # a version of the package from before cpu_memory.py
        return False
    return kept()


def env_info():
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
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
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
        f"{mem / GiB:.0f} GiB"
        if mem
        else platform.platform(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "gpu": _gpu_name(),
        "blas": blas_in_process(),
        "malloc": "freed memory kept (cpu_memory.py)" if _malloc_kept() else "default",
        "commit": (_git("rev-parse", "--short", "HEAD") or "?")
        + (" (model code modified)" if dirty else ""),
    }


def _gpu_name():
    import mlx.core as mx

    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def gpu_available():
    return _gpu_name() is not None


# ---------------------------------------------------------------------------------------------
# how busy the machine is
# ---------------------------------------------------------------------------------------------
def cpu_busy_seconds():
    """Seconds of CPU time all processes have used (from /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in fields]
    except (OSError, ValueError, IndexError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """How much CPU other processes took while a section ran: timings on a shared machine are only
    as good as this figure is small."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()

    def others_share(self):
        busy = cpu_busy_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        others = (busy - self.busy0) - (own_cpu_seconds() - self.own0)
        return max(others, 0.0) / (wall * (os.cpu_count() or 1))


def wait_idle(max_wait, threshold=0.1):
    """Waits (up to `max_wait` seconds) until other processes use under `threshold` of the CPUs."""
    t_end = time.time() + max_wait
    while True:
        m = CpuMeter()
        time.sleep(2)
        share = m.others_share()
        if share is None or share < threshold:
            return share
        if time.time() > t_end:
            say(
                f"  note: the machine is busy ({share:.0%} of its CPUs used by other processes); timing anyway"
            )
            return share
        time.sleep(5)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
class Report:
    def __init__(self, json_path=None):
        self.json_path = json_path
        self.env = None

    def header(self, section):
        self.env = env_info()
        e = self.env
        print(
            f"== {section} | {e['date']} | {e['machine']} | MLX {e['mlx']} on {e['device']}"
            f"{' (' + e['gpu'] + ')' if e['gpu'] else ''} | BLAS: {e['blas']} | malloc: {e['malloc']}"
            f" | commit {e['commit']}",
            flush=True,
        )

    def save(self, section, figures):
        if self.json_path:
            with open(self.json_path, "a") as f:
                f.write(
                    json.dumps({"section": section, "env": self.env, **figures}, default=str) + "\n"
                )


def say(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# timing, memory, inputs
# ---------------------------------------------------------------------------------------------
def timeit(fn, n=3, warmup=1):
    """Median seconds of `n` calls after `warmup` calls (fn must evaluate what it builds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def release():
    """Frees what the last measurement left (so that it does not count in the next one's peak)."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def random_prompt(n, vocab, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def ensure_mid_checkpoint(workdir, seed=0):
    path = Path(workdir) / "mid"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from make_checkpoints import write_checkpoint
    except ImportError as e:
        raise SystemExit(
            f"cannot write the mid-size checkpoint: tests/make_checkpoints.py not importable ({e})"
        )
    say(f"  writing the mid-size random checkpoint to {path} (float32, transformers)")
    t = time.perf_counter()
    write_checkpoint(path, seed=seed, canvas_length=FULL_CANVAS, **MID_TEXT)
    say(f"  written in {time.perf_counter() - t:.0f} s")
    return path
