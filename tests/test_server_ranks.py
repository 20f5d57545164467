"""The server on two ring ranks (`mlx.launch -n 2 -- python -m mlx_diffusiongemma.server`): the
model split across them, rank 0 serving HTTP and the other following its scheduler. Concurrent
requests (a completion, an infilling, a chat with n=2, a stop string) get what one process
answers; a rank that dies ends the other with one line."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from test_distributed import ENV, LAUNCH, ROOT, pytestmark  # noqa: F401 (the skip)

CLIENT = str(Path(__file__).parent / "server_ranks_client.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(ranks: int, model, port: int):
    cmd = [sys.executable, "-m", "mlx_diffusiongemma.server", "--model", str(model)]
    cmd += ["--port", str(port)]
    if ranks > 1:
        cmd = [LAUNCH, "-n", str(ranks), "--backend", "ring", "--", *cmd]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def answers(port: int) -> str:
    p = subprocess.run(
        [sys.executable, CLIENT, str(port)], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def stop(proc):
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def test_two_ranks_answer_as_one_process(text_demo):
    one = serve(1, text_demo, port := free_port())
    try:
        want = answers(port)
    finally:
        stop(one)
    two = serve(2, text_demo, port := free_port())
    try:
        got = answers(port)
    finally:
        out, _ = stop(two)
    assert got == want
    assert out == b""  # the ranks print nothing on stdout (rank 0's line is on stderr)


def rank_pids(launcher_pid: int) -> dict:
    """The server ranks under a launcher: {rank: pid} (MLX_RANK in each child's environment)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    ranks = {}
    for pid, ppid, args in rows:
        if int(ppid) == launcher_pid and "server" in args:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next(e for e in env if e.startswith(b"MLX_RANK="))
            ranks[int(rank.split(b"=")[1])] = int(pid)
    return ranks


def test_a_rank_that_dies_ends_the_other_with_one_line(text_demo):
    two = serve(2, text_demo, port := free_port())
    try:
        answers(port)  # both ranks up and serving
        pids = rank_pids(two.pid)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGKILL)
        tic = time.monotonic()
        survivor = pids[0]
        while time.monotonic() - tic < 60 and os.path.exists(f"/proc/{survivor}"):
            time.sleep(0.2)  # rank 0's idle turns reach the other rank every 0.2 s
        assert not os.path.exists(f"/proc/{survivor}"), "rank 0 still running after 60 s"
    finally:
        _, err = stop(two)
    # rank 0 says it lost the other rank, or (when mlx.launch ended it first) that it was ended
    err = err.decode()
    lines = [line for line in err.splitlines() if line.startswith(("error:", "rank 0:"))]
    assert len(lines) == 1 and "rank" in lines[0], err[-2000:]
