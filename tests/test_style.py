"""The tree stays formatted and lint-clean (ruff, configured in pyproject.toml): a change that
skips the formatter fails here, not in review."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ruff = pytest.importorskip("ruff")


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff(command):
    from ruff.__main__ import find_ruff_bin

    p = subprocess.run(
        [find_ruff_bin(), *command, "mlx_diffusiongemma", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
