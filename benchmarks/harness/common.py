"""What the harness's sections share beyond the package's bench/common.py: the CPU-share meter
and idle wait, process memory, timing, the mid-size checkpoint and random float models."""

import gc
import os
import statistics
import sys
import time
from pathlib import Path

from mlx_diffusiongemma.bench.common import ROOT, GiB, say
from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, MID_TEXT


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
                f"  note: the machine is busy ({share:.0%} of its CPUs used by other processes); "
                "timing anyway"
            )
            return share
        time.sleep(5)


# ---------------------------------------------------------------------------------------------
# memory, timing
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def layer_counts(args):
    """(sliding layers, full-attention layers)."""
    s = sum(args.is_sliding(i) for i in range(args.num_hidden_layers))
    return s, args.num_hidden_layers - s


def ensure_mid_checkpoint(workdir, seed=0):
    path = Path(workdir) / "mid"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    from make_checkpoints import write_checkpoint

    say(f"  writing the mid-size random checkpoint to {path} (float32, transformers)")
    t = time.perf_counter()
    write_checkpoint(path, seed=seed, canvas_length=FULL_CANVAS, **MID_TEXT)
    say(f"  written in {time.perf_counter() - t:.0f} s")
    return path


def build_random_float(args, dtype, verbose=True):
    """A Model with random float weights in `dtype`, evaluated one layer at a time."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mlx_diffusiongemma.bench.models import param_bytes
    from mlx_diffusiongemma.model import Model

    model = Model(args)
    parts = [model.model.decoder.embed_tokens, model.model.decoder.self_conditioning, *model.layers]
    for part in parts:
        part.update(tree_map(lambda a: (a * 1.0).astype(dtype), part.parameters()))
        mx.eval(part.parameters())
    rest = [(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters()) if v.dtype != dtype]
    if rest:
        model.load_weights(rest, strict=False)
    mx.eval(model.parameters())
    model.eval()
    if verbose:
        say(f"  built: {param_bytes(model) / GiB:.2f} GiB of {dtype} weights")
    return model


def build_shared_float(args, dtype):
    """A Model with random float weights in `dtype` whose layers of one attention type all hold
    the first such layer's arrays: what a step keeps per layer can then be measured at the real
    depth in the memory of two layers (frozen weights are only read; a layer's activations,
    gradients and adapters are its own whatever weights it reads)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_diffusiongemma.model import Model

    model = Model(args)
    first = {}
    for part in [model.model.decoder.embed_tokens, model.model.decoder.self_conditioning]:
        part.update(tree_map(lambda a: (a * 1.0).astype(dtype), part.parameters()))
    for i, layer in enumerate(model.layers):
        kind = args.layer_types[i]
        if kind in first:
            layer.update(first[kind].parameters())
        else:
            layer.update(tree_map(lambda a: (a * 1.0).astype(dtype), layer.parameters()))
            first[kind] = layer
        mx.eval(layer.parameters())
    model.update(tree_map(lambda a: a if a.dtype == dtype else a.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    model.eval()
    return model
