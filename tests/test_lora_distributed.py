"""Data-parallel fine-tuning on 2 ranks of MLX's ring backend over loopback: gradients, the
`mlx.launch` command's adapters and a resumed run equal one process's; rank 0 alone writes; a
batch that does not split, a killed rank, a stopped rank and a rank alone each end every rank
with one line. The launcher exits 0 even when a rank died, so the ranks' own outputs are read
(ranks started by hand where each one's output matters)."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from test_lora import data, task_model  # noqa: F401  (fixtures)

from mlx_diffusiongemma import lora

ROOT = Path(__file__).resolve().parent.parent
# the venv's launcher, also when the venv is not on PATH (python started by its full path)
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
pytestmark = pytest.mark.skipif(
    not os.path.exists(LAUNCH) or not mx.distributed.is_available(),
    reason="needs mlx.launch and MLX's ring backend",
)
TOLERANCE = 1e-4
# the check's command: `... lora --model M --train --data D` + these + `--adapter-path A`
FLAGS = ("--iters", "4", "--batch-size", "2", "--num-layers", "-1", "--seed", "3")
# a run that moves the adapters far (the default learning rate moves them by ~1e-5): plain SGD,
# whose step is linear in the gradient. Adam divides each gradient by its own size, so where a
# gradient is ~1e-8 the ranks' float32 rounding (their sums are split differently) becomes a
# difference of a whole step: with --learning-rate 1e-3, 4 steps differ by up to ~4e-4.
SGD = ("--optimizer", "sgd", "--learning-rate", "0.01", "--save-every", "2")
SGD += ("--steps-per-report", "2", "--val-batches", "2")


def free_ports(n=2) -> int:
    """A first port of n consecutive free loopback ports (the ring's rank r listens on p + r)."""
    for _ in range(100):
        first = random.randrange(20000, 60000)
        try:
            for p in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
    raise RuntimeError("no free ports")


def environment(**extra):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return {**env, **extra}


def launch(args, tmp_path, timeout=600):
    """`mlx.launch -n 2 --backend ring -- python -m mlx_diffusiongemma.lora ARGS`."""
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_ports())]
    cmd += ["--", sys.executable, "-m", "mlx_diffusiongemma.lora", *args]
    return subprocess.run(
        cmd, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=timeout
    )


class Ranks:
    """Two ranks started by hand (what mlx.launch does, without its own ending of the others),
    each in its own folder with its own stdout and stderr."""

    def __init__(self, tmp_path, args, n=2, **env):
        port = free_ports(n)
        hosts = tmp_path / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
        self.dirs = [tmp_path / f"rank{r}" for r in range(n)]
        self.procs = []
        for r, d in enumerate(self.dirs):
            d.mkdir()
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mlx_diffusiongemma.lora", *map(str, args)],
                    cwd=d,
                    env=environment(MLX_RANK=str(r), MLX_HOSTFILE=str(hosts), **env),
                    stdout=open(d / "stdout", "w"),
                    stderr=open(d / "stderr", "w"),
                )
            )

    def wait(self, timeout=600):
        for p in self.procs:
            p.wait(timeout=timeout)
        return [p.returncode for p in self.procs]

    def out(self, r, name="stdout"):
        return (self.dirs[r] / name).read_text()

    def wait_for(self, r, text, timeout=600):
        deadline = time.time() + timeout
        while text not in self.out(r):
            assert time.time() < deadline and self.procs[r].poll() is None, self.out(r, "stderr")
            time.sleep(0.2)

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def worst(a, b):
    a, b = mx.load(str(a)), mx.load(str(b))
    assert a.keys() == b.keys()
    return max(float(mx.abs(a[k] - b[k]).max()) for k in a)


def one_process_run(task_model, data, tmp_path_factory, *flags):  # noqa: F811
    path = tmp_path_factory.mktemp("one") / "adapters"
    base = ["--model", str(task_model), "--train", "--data", str(data), *FLAGS, *flags]
    lora.main([*base, "--adapter-path", str(path)])
    return path


@pytest.fixture(scope="module")
def one_process(task_model, data, tmp_path_factory):  # noqa: F811
    """The check's command on one process."""
    return one_process_run(task_model, data, tmp_path_factory)


@pytest.fixture(scope="module")
def one_process_sgd(task_model, data, tmp_path_factory):  # noqa: F811
    """The SGD run on one process (with a checkpoint at iteration 2)."""
    return one_process_run(task_model, data, tmp_path_factory, *SGD)


def test_gradients_and_validation_loss_equal_one_process(task_model, data, tmp_path):  # noqa: F811
    out = tmp_path / "result.json"
    script = ROOT / "tests" / "dp_gradients.py"
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--"]
    cmd += [sys.executable, str(script), str(task_model), str(data), str(out)]
    run = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stderr[-3000:]
    r = json.loads(out.read_text())
    print(f"gradients: {r['grad_diff']:.3g} (largest {r['grad_scale']:.3g}); ", r)
    assert r["ranks"] == 2 and r["same_names"] and not r["zero"]
    assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), r
    assert r["loss"] == pytest.approx(r["want_loss"], abs=1e-5)
    assert r["val"] == pytest.approx(r["want_val"], abs=1e-5)


def test_launched_run_equals_one_process(task_model, data, one_process, tmp_path):  # noqa: F811
    args = ["--model", str(task_model), "--train", "--data", str(data), *FLAGS]
    run = launch([*args, "--adapter-path", "adapters"], tmp_path)
    got = tmp_path / "adapters"
    assert (got / "adapters.safetensors").is_file(), run.stderr[-3000:]
    diff = worst(got / "adapters.safetensors", one_process / "adapters.safetensors")
    print(f"launched run vs one process: adapters differ by at most {diff:.3g}")
    assert diff < TOLERANCE, diff
    # rank 0 alone prints; the log's losses (train, diffusion/AR, validation) are one process's
    assert run.stdout.count("Loading ") == 1 and run.stdout.count("Saved ") == 1, run.stdout
    mine = [json.loads(line) for line in (got / "train_log.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (one_process / "train_log.jsonl").read_text().splitlines()]
    assert len(mine) == len(want)
    for m, w in zip(mine, want):
        for key in ("loss", "diffusion_loss", "ar_loss", "val_loss"):
            if key in w:
                assert m[key] == pytest.approx(w[key], abs=1e-5), (key, m, w)


def test_resumed_run_equals_one_process_and_rank_0_alone_writes(
    task_model,  # noqa: F811
    data,  # noqa: F811
    one_process_sgd,
    tmp_path,
):
    """Resumed at iteration 2 of the one-process SGD run, the ranks end where it ended."""
    want = one_process_sgd / "adapters.safetensors"
    resume = one_process_sgd / "0000002_adapters.safetensors"
    assert worst(resume, want) > 1e-2  # the last two steps moved the adapters
    args = ["--model", task_model, "--train", "--data", data, *FLAGS, *SGD]
    ranks = Ranks(tmp_path, [*args, "--adapter-path", "adapters", "--resume-adapter-file", resume])
    try:
        assert ranks.wait() == [0, 0], ranks.out(0, "stderr") + ranks.out(1, "stderr")
    finally:
        ranks.kill()
    diff = worst(ranks.dirs[0] / "adapters" / "adapters.safetensors", want)
    print(f"resumed run on 2 ranks vs one process: adapters differ by at most {diff:.3g}")
    assert diff < TOLERANCE, diff
    assert "Resumed from" in ranks.out(0) and "Saved" in ranks.out(0)
    assert ranks.out(1) == "" and ranks.out(1, "stderr") == ""
    assert sorted(p.name for p in ranks.dirs[1].iterdir()) == ["stderr", "stdout"]


def test_batch_that_does_not_split_is_refused(task_model, data, tmp_path):  # noqa: F811
    args = ["--model", task_model, "--train", "--data", data, "--batch-size", "3"]
    ranks = Ranks(tmp_path, [*args, "--adapter-path", "adapters"])
    try:
        assert ranks.wait(timeout=300) == [1, 1]
    finally:
        ranks.kill()
    for r in (0, 1):
        err = ranks.out(r, "stderr").splitlines()
        assert err == ["error: --batch-size 3 does not split over 2 ranks: pass a multiple of 2"]


def long_run(task_model, data, tmp_path, **env):  # noqa: F811
    args = ["--model", task_model, "--train", "--data", data, "--iters", "100000"]
    args += ["--batch-size", "2", "--num-layers", "2", "--steps-per-report", "1"]
    args += ["--steps-per-eval", "100000"]
    ranks = Ranks(tmp_path, [*args, "--adapter-path", "adapters", "--val-batches", "1"], **env)
    ranks.wait_for(0, "Iter 2: train loss")
    return ranks


def test_killed_rank_ends_the_other_with_one_line(task_model, data, tmp_path):  # noqa: F811
    ranks = long_run(task_model, data, tmp_path)
    try:
        ranks.procs[1].kill()
        t = time.time()
        ranks.procs[0].wait(timeout=60)
        took = time.time() - t
    finally:
        ranks.kill()
    assert ranks.procs[0].returncode not in (0, None)
    err = ranks.out(0, "stderr").splitlines()
    print(
        f"rank 1 killed: rank 0 ended after {took:.1f} s, status {ranks.procs[0].returncode}: {err}"
    )
    assert len(err) == 1 and err[0].startswith("error: rank 0: lost the connection"), err


def test_stopped_rank_ends_every_rank_with_one_line(task_model, data, tmp_path):  # noqa: F811
    """A peer that hangs (here: stopped) is never reported by the ring backend: the watchdog
    ends both the waiting rank and the stopped one."""
    ranks = long_run(task_model, data, tmp_path, MLX_DIFFUSIONGEMMA_DIST_TIMEOUT="15")
    try:
        os.kill(ranks.procs[1].pid, signal.SIGSTOP)
        t = time.time()
        codes = ranks.wait(timeout=120)
        took = time.time() - t
    finally:
        ranks.kill()
    print(f"rank 1 stopped: both ended after {took:.1f} s, status {codes}")
    assert all(c not in (0, None) for c in codes), codes
    assert took < 60, took
    # the stopped rank's watchdog ends it; the other rank's ends it too, or, if the stopped
    # rank's deadline came first, the ring reports the connection lost
    for r, reasons in (
        (0, ("no answer from the other ranks", "lost the connection")),
        (1, ("no answer",)),
    ):
        err = ranks.out(r, "stderr").splitlines()
        assert len(err) == 1 and any(why in err[0] for why in reasons), err
    print(f"  rank 0: {ranks.out(0, 'stderr').strip()}; rank 1: {ranks.out(1, 'stderr').strip()}")


# a rank that reports an error of its own, then hangs on its way out past its deadline
SLOW_EXIT = """import os, sys, time
from mlx_diffusiongemma.watchdog import Watchdog
w = Watchdog(60)
w.expect(float(sys.argv[1]), "no answer from the other ranks")
time.sleep(float(sys.argv[2]))
print("[ring] noise", file=sys.stderr, flush=True)
print("error: rank 0: lost the connection to another rank", file=sys.stderr, flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize(
    "error_after, line",
    [
        (0.2, "error: rank 0: lost the connection to another rank"),  # the rank's own, then hang
        (3.0, "error: no answer from the other ranks"),  # the deadline's, before the rank says one
    ],
)
def test_watchdog_lets_one_error_line_out(error_after, line):
    """The race CI met: the peer's watchdog ended it, this rank reported the lost connection and
    was still exiting when its own deadline passed. One line either way, and the rank ends."""
    argv = [sys.executable, "-c", SLOW_EXIT, "1.0", str(error_after)]
    t = time.time()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    took = time.time() - t
    assert p.returncode == -signal.SIGKILL and took < 20, (p.returncode, took)
    assert p.stderr.splitlines() == [line], p.stderr


def test_rank_alone_gives_up_with_one_line(tmp_path):
    """A peer that never comes: MLX's init would wait forever."""
    ranks = Ranks(tmp_path, ["--model", "x", "--train"], MLX_DIFFUSIONGEMMA_DIST_TIMEOUT="2")
    ranks.procs[1].kill()
    try:
        assert ranks.procs[0].wait(timeout=60) not in (0, None)
    finally:
        ranks.kill()
    err = ranks.out(0, "stderr").splitlines()
    assert len(err) == 1 and "no connection to the other ranks within 2 s" in err[0], err
