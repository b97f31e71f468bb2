"""The package's own structure: no import cycles between sagan_fast modules (counting imports made
inside functions too: a lazy import that closes a cycle is still a cycle a reader must untangle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "sagan_fast").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                # A package re-exporting its submodules (or a submodule loading its package) is not a cycle.
                if t in mods and t != name and not t.startswith(name + ".") and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == start:
                found.add(tuple(sorted(path)))
            elif nxt not in path and len(path) < 8:
                walk(start, nxt, path + [nxt])

    for m in graph:
        walk(m, m, [m])
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}


def test_no_import_cycles_in_the_package():
    graph = _import_graph()
    assert "sagan_fast.ops.attention" in graph and graph["sagan_fast.ops.attention"], "graph not built"
    assert _cycles(graph) == set()


# --- the ops layer: inputs checked once, one accumulation-dtype rule --------------------------------

def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def _skip_unless_available(backend: str, op: str) -> None:
    from sagan_fast.ops._backend import why_unavailable

    reason = why_unavailable(backend, torch.device("cpu"), op)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_spectral_norm_ops_check_each_input_once_and_resolve_the_backend_once(monkeypatch, backend):
    """The public entry checks every (weight, u, v) once and picks the backend once, also where a
    multi-weight op falls back to one weight at a time (a non-contiguous weight; not triton)."""
    from sagan_fast.ops import spectral_norm as S

    _skip_unless_available(backend, S.OP_NORMALIZE)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=g), torch.randn(3, 4, 3, 3, generator=g),
               torch.randn(7, 4, generator=g).t()]  # (4, 7), not contiguous
    us = [torch.randn(w.shape[0], generator=g) for w in weights]
    vs = [torch.randn(w[0].numel(), generator=g) for w in weights]
    dims = [0] * len(weights)
    checks = _count_calls(monkeypatch, S, "check_spectral_norm_inputs")
    resolves = _count_calls(monkeypatch, S, "_resolve")
    outs = S.spectral_norm_normalize_multi(weights, us, vs, dims, backend=backend)
    assert (len(checks), len(resolves)) == (len(weights), 1)
    checks.clear(), resolves.clear()
    one = S.spectral_norm_normalize(weights[2], us[2], vs[2], backend=backend)
    assert (len(checks), len(resolves)) == (1, 1)
    torch.testing.assert_close(one, outs[2])
    checks.clear(), resolves.clear()
    S.spectral_norm_power_iteration_([w.contiguous() for w in weights], us, vs, dims, backend=backend)
    assert (len(checks), len(resolves)) == (len(weights), 1)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_attention_checks_its_inputs_once(monkeypatch, backend):
    from sagan_fast.ops import attention as A

    _skip_unless_available(backend, A.OP_ATTENTION)
    checks = _count_calls(monkeypatch, A, "check_attention_inputs")
    resolves = _count_calls(monkeypatch, A, "resolve_backend")
    limits = []
    if backend == "triton":
        import sagan_fast.ops.triton.attention as TA
        limits = _count_calls(monkeypatch, TA, "check_backend_limits")
    q, k, v = torch.randn(1, 8, 4), torch.randn(1, 8, 4), torch.randn(1, 8, 6)
    A.sagan_attention(q, k, v, backend=backend)
    assert (len(checks), len(resolves), len(limits)) == (1, 1, 1 if backend == "triton" else 0)


def _picks_float64_or_float32(node: ast.AST) -> bool:
    """``torch.float64 if ... else torch.float32`` (either way round): a copy of the rule."""
    def dtype(n):
        return n.attr if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) \
            and n.value.id == "torch" else None
    return isinstance(node, ast.IfExp) and {dtype(node.body), dtype(node.orelse)} == {"float64", "float32"}


def test_the_accumulation_dtype_rule_is_written_once():
    """Only ``ops._backend.accumulation_dtype`` decides what the ops accumulate in and return
    statistics as; the backends call it (for one dtype or a list's) instead of spelling it."""
    copies = []
    for path in sorted((ROOT / "sagan_fast" / "ops").rglob("*.py")):
        if path.name == "_backend.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            promote = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                       and node.func.attr == "promote_types")
            if promote or _picks_float64_or_float32(node):
                copies.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert copies == []


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_mixed_dtype_sigmas_follow_the_rule(backend):
    from sagan_fast.ops import spectral_norm_power_iteration_
    from sagan_fast.ops._backend import accumulation_dtype
    from sagan_fast.ops.spectral_norm import OP_POWER_ITERATION

    _skip_unless_available(backend, OP_POWER_ITERATION)
    assert accumulation_dtype(torch.bfloat16) == accumulation_dtype() == torch.float32
    assert accumulation_dtype(torch.float16, torch.float64, torch.float32) == torch.float64
    weights = [torch.randn(4, 6), torch.randn(5, 3, dtype=torch.float64)]
    us = [torch.randn(w.shape[0], dtype=w.dtype) for w in weights]
    vs = [torch.randn(w.shape[1], dtype=w.dtype) for w in weights]
    sigmas = spectral_norm_power_iteration_(weights, us, vs, [0, 0], backend=backend)
    assert sigmas.dtype == accumulation_dtype(*(w.dtype for w in weights)) == torch.float64


# --- the commands a pip user gets -----------------------------------------------------------------

def _console_scripts() -> dict[str, str]:
    import re

    return dict(re.findall(r'"(sagan-fast-[\w-]+)=([\w.]+:\w+)"', (ROOT / "setup.py").read_text()))


def test_setup_declares_a_console_script_per_job():
    import importlib

    scripts = _console_scripts()
    assert set(scripts) == {"sagan-fast-train", "sagan-fast-sample", "sagan-fast-evaluate"}
    for target in scripts.values():
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn)), target


def test_installed_train_command_runs_and_speaks_its_name(tmp_path):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("sagan-fast-train", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the package is not pip-installed here (CI installs it: pip install -e .)")
    args = ["--out", str(tmp_path / "run"), "--steps", "1", "--ch", "4", "--batch-size", "4",
            "--eval-every", "0", "--cpu-threads", "1", "--no-progress"]
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "done: step 1" in done.stdout, done.stderr
    bad = subprocess.run([exe, "--out", str(tmp_path / "run"), "--ch", "0"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "sagan-fast-train: error: --ch: must be >= 1, got 0"
