"""Several processes as one model, on MLX's ring backend over loopback: logits and generations
split over 2 and 3 ranks against one process, the generate command under `mlx.launch`, and the
faults (a rank that dies, stops answering, never comes, or holds another checkpoint). The ranks
write what they computed (distributed_worker.py) or say it on their own stderr, and the tests
read that: `mlx.launch` exits 0 even when a rank died. Ranks other than the command's are
started as mlx.launch starts them (a ring hostfile and MLX_RANK), each with its own pipes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import distributed_worker as worker
import mlx.core as mx
import numpy as np
import pytest
from make_checkpoints import write_checkpoint

from mlx_diffusiongemma import distributed
from mlx_diffusiongemma.cli import LOST_PEER
from mlx_diffusiongemma.config import ModelArgs
from mlx_diffusiongemma.loader import load_model, weight_file_names
from mlx_diffusiongemma.model import Model

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).parent / "distributed_worker.py")
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
pytestmark = pytest.mark.skipif(
    not (mx.distributed.is_available("ring") and os.path.exists(LAUNCH)),
    reason="MLX's ring backend (mlx.launch) is not available",
)
ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    HF_HUB_OFFLINE="1",
)
# A layer that splits over 2 and 3 ranks with 64-wide quantization groups: 6 heads of 64 (6 KV
# heads; 1 on the full-attention layer, replicated), and dense / expert widths of 5 groups (3 + 2
# over two ranks, 2 + 2 + 1 over three).
SPLITTABLE = dict(
    hidden_size=128,
    num_attention_heads=6,
    num_key_value_heads=6,
    num_global_key_value_heads=1,
    head_dim=64,
    global_head_dim=128,
    intermediate_size=320,
    moe_intermediate_size=320,
    num_hidden_layers=3,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
)
TP_TOLERANCE = 1e-5  # float32 logits: the split sums add up in another order


@pytest.fixture(scope="module")
def splittable(tmp_path_factory):
    """(float32 checkpoint, its 4-bit conversion: the mlx-community layout, experts at 4 bits,
    group 64)."""
    from mlx_diffusiongemma.convert import main as convert

    src = tmp_path_factory.mktemp("splittable") / "f32"
    write_checkpoint(src, **SPLITTABLE)
    q4 = src.parent / "q4"
    assert convert(["--hf-path", str(src), "--mlx-path", str(q4), "-q"]) == 0
    return src, q4


@pytest.fixture(scope="module")
def sharp(checkpoint_factory):
    return checkpoint_factory("sharp0", seed=0, sharpen=20.0)[0]


def launch(n: int, *args, timeout=600, stdin=None):
    """`mlx.launch -n N --backend ring -- python ARGS` (`n` 1: python ARGS alone): its stdout and
    stderr. mlx.launch sends its stdin to every rank."""
    cmd = [sys.executable, *map(str, args)]
    if n > 1:
        cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--"] + cmd
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, input=stdin)
    return p.stdout, p.stderr


def spawn(argvs, env=None):
    """Ranks started as mlx.launch starts them (a ring hostfile and MLX_RANK), each with its own
    arguments (None: that rank never starts)."""
    ports = []
    for _ in argvs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hostfile = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump([[f"127.0.0.1:{p}"] for p in ports], hostfile)
    hostfile.close()
    procs = {}
    for r, argv in enumerate(argvs):
        if argv is not None:
            e = {**ENV, **(env or {}), "MLX_HOSTFILE": hostfile.name, "MLX_RANK": str(r)}
            procs[r] = subprocess.Popen(
                [sys.executable, *map(str, argv)],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
    return procs


def run_checks(tmp_path, n: int, jobs):
    """The worker's `checks` on N ranks (started directly: mlx.launch's I/O loop spins, which
    halves the ranks' speed on a 2-core machine): each rank's results."""
    out = tmp_path / "ranks"
    procs = spawn([[WORKER, "checks", out, *jobs]] * n)
    err = "".join(p.communicate(timeout=600)[1].decode() for p in procs.values())
    ranks = []
    for r in range(n):
        f = Path(f"{out}.{r}.npz")
        assert f.exists(), f"rank {r} wrote nothing: {err[-2000:]}"
        ranks.append(dict(np.load(f)))
    return ranks


def one_process(job: str) -> dict:
    _, kind, path = job.split(":", 2)
    return worker.run_job(kind, path)


def compare(ranks, jobs, exact: bool):
    """Every rank's logits equal one process's (within TP_TOLERANCE unless exact), and its
    seeded tokens too; the unseeded ones agree across the ranks."""
    for job in jobs:
        want = one_process(job)
        for r, got in enumerate(ranks):
            for name, value in want.items():
                mine = got[f"{job}.{name}"]
                if name == "unseeded":
                    assert np.array_equal(mine, ranks[0][f"{job}.{name}"]), (r, job)
                elif job.split(":")[1] == "gen":
                    assert np.array_equal(mine, value), (r, job, name)
                    assert len(mine) > 0
                elif exact:
                    assert np.array_equal(mine, value), (r, job, name)
                else:
                    err = float(np.abs(mine - value).max())
                    assert err < TP_TOLERANCE, (r, job, name, err)


def test_two_ranks(tmp_path, tiny, sharp, splittable):
    """Tensor parallel: logits within 1e-5 on both backends' expert routes (float32; the 4-bit
    layout, its widths split 3 + 2 groups); seeded near-greedy stream (3 canvases), batch,
    infill, image and compiled-step (default backend) generations token-equal to one process.
    Pipelined (layers 4 + 2): generations and logits equal."""
    tensor = [
        f"tensor:gen:{sharp}",
        f"tensor:logits:{tiny[0]}",  # 2 KV heads split; 1 on full attention, replicated
        f"tensor:logits:{splittable[1]}",
    ]
    pipeline = [f"pipeline/4-2:gen:{sharp}", f"pipeline:logits:{splittable[1]}"]
    ranks = run_checks(tmp_path, 2, tensor + pipeline)
    compare(ranks, tensor, exact=False)
    compare(ranks, pipeline, exact=True)


def test_three_ranks(tmp_path, tiny, splittable):
    """Tensor parallel logits (float32 and 4-bit, widths split 2 + 2 + 1 groups) within 1e-5;
    pipelined (layers 3 + 2 + 1) logits equal."""
    tensor = [f"tensor:logits:{splittable[0]}", f"tensor:logits:{splittable[1]}"]
    pipeline = [f"pipeline/3-2-1:logits:{tiny[0]}"]
    ranks = run_checks(tmp_path, 3, tensor + pipeline)
    compare(ranks, tensor, exact=False)
    compare(ranks, pipeline, exact=True)


@pytest.fixture(scope="module")
def cli_reference(text_demo):
    """The one-process command's output (run here: the same code as in a subprocess)."""
    import contextlib
    import io

    from mlx_diffusiongemma.generate import main

    argv = ["--model", str(text_demo), "--prompt", "hello there", "--seed", "7"]
    argv += ["--max-tokens", "64", "--steps", "8"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    assert out.getvalue().strip()
    return argv, out.getvalue()


@pytest.mark.parametrize("flags", [[], ["--pipeline"]], ids=["tensor", "pipeline"])
def test_generate_command_on_two_ranks_prints_what_one_process_prints(cli_reference, flags):
    argv, want = cli_reference
    out, err = launch(2, "-m", "mlx_diffusiongemma.generate", *argv, *flags, timeout=300)
    assert out == want, err[-2000:]  # rank 0's output alone: the other rank prints nothing
    assert "Traceback" not in err and "error" not in err


def test_chat_on_two_ranks_answers_what_one_process_answers(text_demo):
    """Every rank reads the turns (mlx.launch sends its stdin to each); rank 0 alone prints."""
    argv = ["-m", "mlx_diffusiongemma.chat", "--model", text_demo, "--seed", "1"]
    argv += ["--max-tokens", "16", "--steps", "4"]
    turns = "hello\nwhat next\nq\n"
    want, _ = launch(1, *argv, stdin=turns, timeout=300)
    out, err = launch(2, *argv, stdin=turns, timeout=300)
    assert out == want and want.count(">> ") == 3, err[-2000:]


# ---- faults ------------------------------------------------------------------------------------
def test_faults_end_every_rank_with_one_line(text_demo, tmp_path):
    """Run together (they mostly wait): a rank killed mid-run, a rank that stops answering
    (SIGSTOP; watchdog at 5 s), a rank that never starts (connection deadline 5 s), and ranks
    holding different checkpoints. Every rank left ends non-zero with one `error:` line."""
    other = tmp_path / "other"
    shutil.copytree(text_demo, other)
    weights = mx.load(str(other / "model.safetensors"))
    mx.save_safetensors(
        str(other / "model.safetensors"),
        {k: v * 1.01 if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()},
    )
    cli = ["-m", "mlx_diffusiongemma.generate", "--prompt", "hi", "--seed", "1", "--model"]
    cases = {
        "killed": (  # the ring backend's error, or the watchdog's (the ring may wait on)
            spawn([[WORKER, "die"]] * 2),
            {0: ("lost the connection to another rank", "rank 1 is gone")},
        ),
        "stopped": (
            spawn([[WORKER, "stall"]] * 2, {"MLX_DG_PEER_TIMEOUT": "5"}),
            {0: "rank 1 has not answered for 5 s"},
        ),
        "never came": (
            spawn([cli + [text_demo], None], {"MLX_DG_CONNECT_TIMEOUT": "5"}),
            {0: "could not connect to the other ranks in 5 s"},
        ),
        "other checkpoint": (
            spawn([cli + [text_demo], cli + [other]]),
            {r: "rank 1 holds another checkpoint than rank 0" for r in (0, 1)},
        ),
    }
    start = time.monotonic()
    try:
        for name, (procs, expected) in cases.items():
            for r, message in expected.items():
                left = max(1.0, 240 - (time.monotonic() - start))
                out, err = procs[r].communicate(timeout=left)
                lines = err.decode().splitlines()
                assert procs[r].returncode != 0, (name, r, lines)
                messages = (message,) if isinstance(message, str) else message
                assert len(lines) == 1, (name, lines)
                assert lines[0].startswith(tuple(f"error: {m}" for m in messages)), (name, lines)
                assert out == b"", (name, r)
    finally:
        for procs, _ in cases.values():
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                p.wait()


# a rank whose main thread reports the lost peer and whose watchdog fires while it exits
BOTH_SEE_IT = """import atexit, threading, time
from mlx_diffusiongemma import distributed
from mlx_diffusiongemma.cli import one_line_errors
atexit.register(time.sleep, 60)  # a way out that hangs (the ring backend's, at times)
threading.Timer(0.5, distributed.fail, ["rank 1 is gone (its process ended)"]).start()
with one_line_errors():
    raise RuntimeError("[ring] connection to a peer was lost")
"""


def test_rank_whose_threads_both_see_a_peer_go_says_one_line():
    env = {**os.environ, "MLX_RANK": "0"}
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", BOTH_SEE_IT], env=env, capture_output=True)
    assert time.monotonic() - t < 30 and p.returncode == 1, p
    assert p.stderr.decode().splitlines() == [f"error: {LOST_PEER}"]


# ---- in one process ------------------------------------------------------------------------------
class FakeGroup:
    """Rank `rank` of `size`, for splitting a model in one process (no collective runs)."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.fixture
def no_spanning(monkeypatch):
    """Splitting over a fake group must not leave it behind for the seeds of later tests."""
    monkeypatch.setattr(distributed, "_spanning", None)


def test_split_bounds_take_whole_groups():
    assert distributed.split_bounds(704, 2, 64) == [0, 384, 704]  # 11 groups: 6 + 5
    assert distributed.split_bounds(704, 3, 64) == [0, 256, 512, 704]  # 4 + 4 + 3
    assert distributed.split_bounds(32, 2) == [0, 16, 32]
    from mlx_diffusiongemma import sharded_load

    assert sharded_load is distributed.sharded_load


@pytest.mark.parametrize(
    "text, ranks, message",
    [
        ({}, 3, "4 attention heads cannot be split over 3 ranks"),
        (
            dict(num_attention_heads=12, num_key_value_heads=4),
            3,
            "4 KV heads can be neither split over nor replicated across 3 ranks",
        ),
    ],
)
def test_what_cannot_be_split_is_refused(tiny, no_spanning, text, ranks, message):
    config = json.loads((tiny[0] / "config.json").read_text())
    config["text_config"].update(text)
    with pytest.raises(distributed.DistributedError, match=message):
        Model(ModelArgs.from_config(config)).shard(FakeGroup(ranks, 0))


def test_quantization_groups_are_not_cut(splittable, no_spanning):
    model = load_model(splittable[1], lazy=True)
    message = r"the dense MLP's intermediate \(5 groups of 64\) cannot be split over 6 ranks"
    with pytest.raises(distributed.DistributedError, match=message):
        model.shard(FakeGroup(6, 0))


def test_pipeline_stage_reads_only_its_files(tiny, tmp_path, no_spanning, monkeypatch):
    """A checkpoint in many files: a stage lists, opens and keeps only the files and tensors of
    its layers (the others' files may be absent). A split model keeps ~1/N of each layer, and
    loading it never holds the whole model."""
    from mlx_diffusiongemma.convert import main as convert

    out = tmp_path / "shards"
    assert (
        convert(["--hf-path", str(tiny[0]), "--mlx-path", str(out), "--max-shard-size", "60000"])
        == 0
    )
    mine = weight_file_names(out, range(3, 6))  # rank 0 of 2: the last three layers
    theirs = set(weight_file_names(out)) - set(mine)
    assert theirs and mine
    for name in theirs:
        (out / name).unlink()
    opened = []
    load = mx.load
    monkeypatch.setattr(
        mx, "load", lambda f, *a, **k: opened.append(Path(f).name) or load(f, *a, **k)
    )
    model = load_model(out, pipeline_group=FakeGroup(2, 0))
    assert set(opened) <= set(mine)
    layers = model.model.decoder.layers
    assert layers[:3] == [None] * 3 and all(layer is not None for layer in layers[3:])

    full = load_model(tiny[0])
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    split = load_model(tiny[0], tensor_group=FakeGroup(2, 1))
    # a layer's whole tensors are read, cut and dropped one layer at a time
    assert mx.get_peak_memory() - before < 0.75 * sum(v.nbytes for _, v in _flat(full))
    for name in ("experts.gate_up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight"):
        a, b = (dict(_flat(m.layers[0]))[name] for m in (full, split))
        assert b.size * 2 == a.size, name


def _flat(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def test_hub_pipeline_stage_downloads_only_its_files(text_demo, tmp_path, no_spanning, monkeypatch):
    """`sharded_load` of a hub id, pipelined: the config, index and tokenizer first, then only
    the weight files holding this rank's layers (or no layer), as mlx-lm's sharded_load."""
    import fnmatch

    import huggingface_hub

    from mlx_diffusiongemma.convert import main as convert

    repo = tmp_path / "repo"
    assert (
        convert(
            ["--hf-path", str(text_demo), "--mlx-path", str(repo), "--max-shard-size", "200000"]
        )
        == 0
    )
    cache = tmp_path / "cache"
    fetched = []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        cache.mkdir(exist_ok=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, cache / f.name)
                fetched.append(f.name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, _ = distributed.sharded_load("org/diffusiongemma", pipeline_group=FakeGroup(2, 1))
    mine = weight_file_names(repo, range(0, 3))  # rank 1 of 2: the first three layers
    weights = {f for f in fetched if f.endswith(".safetensors")}
    assert weights == set(mine) and weights < set(weight_file_names(repo))
    assert model.model.decoder.layers[3:] == [] and None not in model.model.decoder.layers[:3]
