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


def test_the_design_note_is_in_the_repository_and_its_paths_exist():
    """README points at docs/DESIGN.md, nothing points at notes outside the repository, and every
    file or folder DESIGN.md names in backticks exists (from the root or inside sagan_fast/)."""
    root = README.parent
    assert "`docs/DESIGN.md`" in README.read_text()
    design = (root / "docs" / "DESIGN.md").read_text()
    def ours(p: Path) -> bool:  # text files of the repository (no hidden folders, builds, runs)
        parts = p.relative_to(root).parts
        return p.suffix in (".py", ".md", ".txt", ".toml", ".cfg") and p.is_file() and not any(
            part.startswith(".") or part in ("build", "runs") for part in parts)
    tracked = [p for p in root.rglob("*") if ours(p)]
    marker = "../" + "shared"  # spelled in two parts so this file does not match itself
    outside = [str(p.relative_to(root)) for p in tracked if marker in p.read_text(errors="ignore")]
    assert not outside, f"files pointing outside the repository: {outside}"
    named = {m.split(":")[0] for m in re.findall(r"`([\w./-]+/[\w./:-]*)`", design) if "<" not in m}
    missing = [n for n in named if not ((root / n).exists() or (root / "sagan_fast" / n).exists())]
    assert len(named) > 15 and not missing, f"DESIGN.md names paths that do not exist: {missing}"
