"""The real `generate` command on the bundled demo checkpoint."""

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, input=stdin, timeout=300
    )


def test_generate_streams_with_stats(text_demo):
    r = run(
        "generate.py",
        "--model",
        str(text_demo),
        "--prompt",
        "Why is the sky blue?",
        "--seed",
        "0",
        "--steps",
        "6",
        "--verbose",
    )
    assert r.returncode == 0, r.stderr
    for figure in (
        "Prompt:",
        "tokens-per-sec",
        "steps per canvas",
        "tokens per forward",
        "Peak memory",
    ):
        assert figure in r.stdout


def test_module_and_stdin_prompt_are_repeatable(text_demo):
    a = run(
        "-m",
        "mlx_diffusiongemma.generate",
        "--model",
        str(text_demo),
        "--prompt",
        "-",
        "--seed",
        "3",
        "--steps",
        "4",
        "--max-tokens",
        "8",
        "--ignore-chat-template",
        stdin="Hello there",
    )
    b = run(
        "generate.py",
        "--model",
        str(text_demo),
        "--prompt",
        "Hello there",
        "--seed",
        "3",
        "--steps",
        "4",
        "--max-tokens",
        "8",
        "--ignore-chat-template",
    )
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_max_tokens_is_exact_in_the_cli(text_demo):
    import re

    r = run(
        "generate.py",
        "--model",
        str(text_demo),
        "--prompt",
        "Hello",
        "--seed",
        "1",
        "--steps",
        "3",
        "--max-tokens",
        "3",
        "--verbose",
    )
    assert r.returncode == 0, r.stderr
    assert int(re.search(r"Generation: (\d+) tokens", r.stdout).group(1)) <= 3


def test_bad_input_is_one_line_without_traceback(tmp_path, text_demo):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(text_demo, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    cases = [
        (["--prompt", ""], "prompt is empty"),
        (["--t-min", "nan"], "t_min must be a finite number >= 0 (got nan)"),
        (["--t-max", "inf"], "t_max must be a finite number"),
        (["--entropy-bound", "0"], "entropy_bound must be a finite number > 0 (got 0.0)"),
        (["--seed", "-1"], "seed must be an integer in [0, 18446744073709551615]"),
        (["--gap-length", "0", "--suffix", "x"], "gap length must be an integer >= 1"),
        (["--model", str(no_tokenizer)], "has no tokenizer (neither tokenizer.json"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--steps", "-2"], "max_denoising_steps"),
        (["--t-min", "0.9", "--t-max", "0.8"], "t_max must be greater"),
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--max-tokens", "100000"], "exceeds the model's context"),
    ]
    # four at a time: each spends most of its time importing, and CI has two cores
    with ThreadPoolExecutor(4) as pool:
        runs = pool.map(lambda a: run("generate.py", "--model", str(text_demo), *a[0]), cases)
        for r, (args, msg) in zip(runs, cases):
            assert r.returncode != 0, args
            assert "Traceback" not in r.stderr and msg in r.stderr, (args, r.stderr)
            assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_visualize_draws_live_in_a_terminal_and_degrades_without_one(text_demo):
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "generate.py",
            "--model",
            str(text_demo),
            "--visualize",
            "--seed",
            "1",
            "--steps",
            "5",
            "--prompt",
            "hi",
        ],
        cwd=ROOT,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "step 1/5" in text and "\x1b[" in text and "accepted" in text
    plain = run(
        "generate.py",
        "--model",
        str(text_demo),
        "--visualize",
        "--seed",
        "1",
        "--steps",
        "5",
        "--prompt",
        "hi",
    )
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout and plain.stdout.strip()


def test_two_quick_sigints_end_with_one_line():
    """Ctrl-C twice in a row while a command runs: status 130 and a line, never a traceback;
    so does SIGTERM."""
    for signals in ([signal.SIGINT, signal.SIGINT], [signal.SIGTERM]):
        proc = subprocess.Popen(
            [sys.executable, "generate.py", "--steps", "48"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # as from a terminal: a suite started in the background (`&`) runs with SIGINT
            # ignored, and an ignored signal stays ignored across exec
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        proc.stderr.readline()  # the demo notice: the command runs, and now loads the model
        for s in signals:
            proc.send_signal(s)
            time.sleep(0.005)
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, err
        assert "Traceback" not in err and "interrupted" in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_closed_stdout_is_quiet(text_demo):
    """`generate ... | head -c1`: no BrokenPipeError report."""
    argv = [
        "generate.py",
        "--model",
        str(text_demo),
        "--max-tokens",
        "256",
        "--steps",
        "3",
        "--seed",
        "0",
        "--ignore-chat-template",
    ]
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_server_port_out_of_range_is_a_usage_error():
    r = run("-m", "mlx_diffusiongemma.server", "--port", "70000")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid port '70000'" in r.stderr
