"""Every ```python block of README.md runs as written, each in a fresh interpreter.

Blocks fenced as ```bash (or unlabelled) are shell commands or output and are not run.
"""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_LIMIT_S = 120  # each example must run in seconds on a CPU; this leaves room for a loaded machine
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text):
    """(line number of the fence, code) of every ```python block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


with open(os.path.join(REPO, "README.md")) as f:
    BLOCKS = python_blocks(f.read())


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


def test_block_extraction_finds_only_python_fences():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```\nout\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (11, "y = 2\nz = 3\n")]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_example_runs(line, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    head = "\n".join(code.splitlines()[:3])
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md line {line}: the example ran over {TIME_LIMIT_S} s:\n{head}\n...")
    assert proc.returncode == 0, (f"README.md line {line}: the example failed:\n{head}\n...\n"
                                  f"{proc.stderr[-3000:]}")
