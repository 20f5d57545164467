"""Freed memory stays in the process on Linux CPUs, as MLX's GPU allocators keep theirs.

MLX's CPU allocator keeps at most 32 MB of freed buffers (its default cache limit); the rest goes
back to glibc's malloc, which returns large blocks to the kernel (munmap, heap trimming). The next
step's arrays of the same sizes then come back as fresh pages: a page fault and a zeroed page
each. Raising MLX's cache limit instead kept buffers that did not fit later requests and halved
the faults only.

`keep_freed_memory` fixes glibc's mmap threshold at its largest allowed value (32 MiB; blocks up
to that size come from the malloc heaps) and lets the heaps keep up to TRIM_BYTES free at their
top. Blocks above 32 MiB (vocabulary-sized arrays) are still mapped per use: glibc's mallopt
allows no more. The CPU attention (cpu.attention_cpu) needs it most. Page faults, kernel time and
step times with and without: benchmarks/RESULTS.md.

Only glibc on Linux with the CPU as MLX's default device; `MLX_DG_KEEP_FREED_MEMORY=0` turns it
off. It changes malloc for the whole process, which is why it is done at most once, by
`load_model` (through the CPU backend's `setup`), and said here.
"""

import ctypes
import os
import sys

import mlx.core as mx

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_BYTES = 512 << 20
_done = None


def keep_freed_memory() -> bool:
    """Tunes glibc's malloc as above when it applies; True when it is (or was) done."""
    global _done
    if _done is not None:
        return _done
    if (
        not sys.platform.startswith("linux")
        or mx.default_device() != mx.cpu
        or os.environ.get("MLX_DG_KEEP_FREED_MEMORY", "1") == "0"
    ):
        return False
    _done = set_malloc_thresholds()
    return _done


def set_malloc_thresholds() -> bool:
    """The mallopt calls themselves, with no device check (the benchmark also gives them to the
    transformers reference's process, to show what they do there)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt tunables)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)
        )
    except (OSError, AttributeError):
        return False


def kept() -> bool:
    """Whether keep_freed_memory is in effect in this process."""
    return bool(_done)
