"""The real `generate` command on the bundled demo checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate_streams_with_stats(text_demo):
    r = run("generate.py", "--model", str(text_demo), "--prompt", "Why is the sky blue?", "--seed", "0",
            "--steps", "6", "--verbose")
    assert r.returncode == 0, r.stderr
    for figure in ("Prompt:", "tokens-per-sec", "steps per canvas", "tokens per forward", "Peak memory"):
        assert figure in r.stdout


def test_module_and_stdin_prompt_are_repeatable(text_demo):
    a = run("-m", "mlx_diffusiongemma.generate", "--model", str(text_demo), "--prompt", "-", "--seed", "3",
            "--steps", "4", "--max-tokens", "8", "--ignore-chat-template", stdin="Hello there")
    b = run("generate.py", "--model", str(text_demo), "--prompt", "Hello there", "--seed", "3", "--steps", "4",
            "--max-tokens", "8", "--ignore-chat-template")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_bad_input_is_one_line_without_traceback(tmp_path, text_demo):
    cases = [
        (["--prompt", ""], "prompt is empty"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--steps", "-2"], "max_denoising_steps"),
        (["--t-min", "0.9", "--t-max", "0.8"], "t_max must be greater"),
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--model", str(tmp_path)], "no config.json"),
        (["--max-tokens", "100000"], "exceeds the model's context"),
    ]
    for args, msg in cases:
        r = run("generate.py", "--model", str(text_demo), *args)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr and msg in r.stderr, (args, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_visualize_draws_live_in_a_terminal_and_degrades_without_one(text_demo):
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "generate.py", "--model", str(text_demo), "--visualize", "--seed",
                             "1", "--steps", "5", "--prompt", "hi"], cwd=ROOT, stdout=slave,
                            stderr=subprocess.PIPE)
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
    plain = run("generate.py", "--model", str(text_demo), "--visualize", "--seed", "1", "--steps", "5",
                "--prompt", "hi")
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout and plain.stdout.strip()
