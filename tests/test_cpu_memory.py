"""keep_freed_memory: applied once on Linux/glibc with the CPU as default device, never elsewhere."""

import sys

import mlx.core as mx
import pytest

from mlx_diffusiongemma.backends import cpu_memory


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_done", None)
    calls = []

    class Libc:
        def gnu_get_libc_version(self):
            return b"2.36"

        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(sys, "platform", "linux")
    return calls


def test_applied_once_on_linux_cpu(fresh, monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert cpu_memory.keep_freed_memory() and cpu_memory.keep_freed_memory()
    assert fresh == [
        (cpu_memory.M_MMAP_THRESHOLD, 32 << 20),
        (cpu_memory.M_TRIM_THRESHOLD, cpu_memory.TRIM_BYTES),
    ]


@pytest.mark.parametrize("case", ["gpu", "darwin", "env off"])
def test_not_applied_elsewhere(fresh, monkeypatch, case):
    monkeypatch.setattr(
        mx, "default_device", lambda: mx.Device(mx.gpu) if case == "gpu" else mx.cpu
    )
    if case == "darwin":
        monkeypatch.setattr(sys, "platform", "darwin")
    if case == "env off":
        monkeypatch.setenv("MLX_DG_KEEP_FREED_MEMORY", "0")
    assert not cpu_memory.keep_freed_memory()
    assert fresh == []


def test_not_glibc(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_done", None)
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    monkeypatch.setattr(sys, "platform", "linux")

    class Musl:
        def mallopt(self, *a):
            raise AssertionError("must not be called")

    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: Musl())
    assert not cpu_memory.keep_freed_memory()
