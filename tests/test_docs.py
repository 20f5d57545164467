"""README.md and docs/*.md against the tree: the Quickstart lines are the ones CI runs, every
relative link and every repository path the pages name exists, and every flag in a command block
is one its tool accepts (read from the tool's own `--help`)."""

import os
import re
import shlex
import subprocess
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICKSTART = [
    'pip install -e . && python generate.py --prompt "460000532046300560015430003000046010"',
    'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q',
]
FENCE = re.compile(r"^```[^\n]*\n.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"`((?:mlx_diffusiongemma|tests|benchmarks|docs|\.ci)/[\w./-]*)`")


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def code_blocks(text: str, langs=("bash", "sh", "shell")):
    for m in FENCE.finditer(text):
        block = m.group(0)
        if block.split("\n", 1)[0][3:].strip() in langs:
            yield block.split("\n", 1)[1].rsplit("```", 1)[0]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN" or c == "_")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set:
    out, seen = set(), {}
    for line in prose(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_there_are_pages():
    names = {p.name for p in PAGES}
    assert {"README.md", "LORA.md", "SERVER.md"} <= names, names


def test_quickstart_lines_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = next(code_blocks(quickstart))
    assert block.strip().splitlines() == QUICKSTART
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and l[0] != "#"]
    assert ci[-1] == QUICKSTART[1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = prose(page.read_text())
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no {file.relative_to(ROOT) if ROOT in file.parents else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {file.name}")
    for path in REPO_PATH.findall(text):
        if not (ROOT / path).exists():
            bad.append(f"`{path}` does not exist")
    assert not bad, bad


# ---- flags in command blocks ---------------------------------------------------------------
def commands():
    """(page, command line, argv of the tool, its arguments) for every Python tool invoked in a
    shell block of a page."""
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*", "", line)  # comments
                for part in re.split(r"&&|\|\||;|\|", line):
                    try:
                        words = shlex.split(part)
                    except ValueError:
                        words = part.split()
                    tool = invocation(words)
                    if tool:
                        yield page.name, part.strip(), tool[0], tool[1]


def invocation(words):
    """(argv that runs the tool, the words after it), or None when the words run no tool here."""
    if len(words) >= 3 and words[0] == "python" and words[1] == "-m":
        mod = words[2]
        if mod.startswith(("mlx_diffusiongemma", "benchmarks.")):
            return (sys.executable, "-m", mod), words[3:]
    elif len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
        return (sys.executable, words[1]), words[2:]
    elif words and re.fullmatch(r"mlx_diffusiongemma\.\w+", words[0]):  # console scripts
        return (sys.executable, "-m", words[0]), words[1:]
    return None


@lru_cache(maxsize=None)
def help_text(argv) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [*argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{' '.join(argv)} --help: {r.stderr[-2000:]}"
    return r.stdout


def positional_choices(help_out: str):
    m = re.search(r"positional arguments:\n\s+\{([^}]*)\}", help_out)
    return set(m.group(1).split(",")) if m else None


def test_command_flags_exist():
    found, bad = 0, []
    for page, line, argv, args in commands():
        found += 1
        out = help_text(argv)
        for word in args:
            flag = word.strip("[]").split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and not re.search(
                rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out
            ):
                bad.append(f"{page}: {flag} is not an option of `{line}`")
        choices = positional_choices(out)
        if choices and args and not args[0].startswith("-") and args[0] not in choices:
            bad.append(f"{page}: {args[0]!r} is not one of {sorted(choices)} in `{line}`")
    assert found >= 20, found  # the pages do hold commands: the parser above finds them
    assert not bad, bad
