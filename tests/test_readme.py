"""The README's code must run as written: its Python example, and the commands it documents."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "python train_ddp.py --out runs/digits" in text
    assert "python -m pytest -q tests" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci, ".ci/run must run the README's test command"


def test_readme_python_example_runs():
    blocks = python_blocks()
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    D, d_loss = namespace["D"], namespace["d_loss"]
    assert d_loss.isfinite()
    # Every weight in D got a gradient through the two D calls and one backward.
    assert all(p.grad is not None for p in D.parameters())
