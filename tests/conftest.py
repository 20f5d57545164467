import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
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
