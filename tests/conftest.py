import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # benchmarks.harness, the project's harness
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

from make_checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Writes (once per name) a tiny reference checkpoint; returns (path, torch reference)."""
    made = {}

    def make(name="default", **kwargs):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            made[name] = (path, write_checkpoint(path, **kwargs))
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny(checkpoint_factory):
    return checkpoint_factory("default")


@pytest.fixture(scope="session")
def text_demo(tmp_path_factory):
    """A text checkpoint with random weights and a byte-level BPE tokenizer with a Gemma 4 style
    chat template (what the bundled demo was before it learned Sudoku): tests that send free
    text through the pipeline use it."""
    from make_demo_checkpoint import main

    out = tmp_path_factory.mktemp("text_demo") / "demo"
    main(out)
    return out
