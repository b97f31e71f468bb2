"""The benchmark harness: interleaved timing with spread and flags (bench/common.py) and the
attention benchmark's rows (bench/attention.py) on tiny CPU shapes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import attention as bench_attention  # noqa: E402
from bench.common import Report, Timing, consistency_flag, time_interleaved  # noqa: E402

CPU = torch.device("cpu")


def test_time_interleaved_rotates_the_order_and_keeps_every_sample():
    calls = []

    def sleeper(name, ms):
        def run():
            calls.append(name)
            time.sleep(ms / 1e3)
        return run
    t = time_interleaved({"a": sleeper("a", 1), "b": sleeper("b", 6)}, device=CPU, rounds=4)
    assert calls[:2] == ["a", "b"]                 # one warm-up call each
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]   # rounds start at a rotating index
    assert t["a"].samples == t["b"].samples == 4
    assert t["a"].median_ms < t["b"].median_ms
    assert t["b"].p20_ms <= t["b"].median_ms <= t["b"].p80_ms


def test_spread_stays_within_the_samples():
    """p20 / p80 of a few samples lie between the fastest and the slowest (the --quick CPU rows have
    3: extrapolated quantiles printed 13.6 ms [-1.31-180])."""
    from bench.common import _timing
    for samples in ([0.6, 13.6, 180.0], [1.0, 2.0], [5.0, 1.0, 2.0, 9.0, 3.0]):
        t = _timing(samples, CPU)
        assert min(samples) <= t.p20_ms <= t.median_ms <= t.p80_ms <= max(samples), (samples, t)


def test_noisy_flag_and_consistency():
    durations = iter([0.0] + [1, 20, 1, 20, 1, 20] * 2)

    def erratic():
        time.sleep(next(durations) / 1e3)
    t = time_interleaved({"x": erratic}, device=CPU, rounds=6)["x"]
    assert t.noisy and t.spread > 0.25 and "NOISY" in t.fmt()
    steady = Timing(1.0, 0.98, 1.02, 5)
    assert not steady.noisy and steady.spread == pytest.approx(0.04)
    # The contradiction a shared CPU produced: fwd 1.2 + bwd 1.8 next to fwd+bwd 151 ms.
    assert "INCONSISTENT" in consistency_flag(Timing(1.2, 1, 1.4), Timing(1.8, 1.6, 2), Timing(151, 150, 152))
    assert consistency_flag(Timing(1.2, 1, 1.4), Timing(1.8, 1.6, 2), Timing(3.1, 3, 3.2)) is None


def test_attention_bench_rows_on_cpu():
    args = argparse.Namespace(quick=True, errors=True)
    report = Report("attention", {"name": "cpu"}, {})
    impls = {name: impl for name, impl in bench_attention.implementations(CPU, torch.float32, []).items()
             if name in ("naive bmm+softmax", "SDPA math")}
    rows = bench_attention.bench_group("tiny", (1, 16, 12, 8, 24), torch.float32, impls, CPU, args, report)
    assert [r["impl"] for r in rows] == ["naive bmm+softmax", "SDPA math"]
    for r in rows:
        assert r["status"].startswith("ok") and r["rel_err_vs_fp64"] < 1e-5
        assert all(r[f"{m}_ms"] > 0 and r[f"{m}_spread"] for m in ("fwd", "bwd", "fwd_bwd"))


def test_attention_bench_our_triton_rows_in_the_interpreter():
    """Our rows (default and deterministic backward) with their per-launch FLOP / byte rows; the
    Triton interpreter stands in for the GPU (not a timing: the interpreter is not timed)."""
    args = argparse.Namespace(quick=True, errors=True)
    report = Report("attention", {"name": "cpu"}, {})
    impls = {name: impl for name, impl in bench_attention.implementations(CPU, torch.float16, ["triton"]).items()
             if name.startswith("sagan_fast triton")}
    assert list(impls) == ["sagan_fast triton", "sagan_fast triton (deterministic)"]
    rows = bench_attention.bench_group("tiny", (1, 40, 36, 16, 24), torch.float16, impls, CPU, args, report)
    assert [r["status"][:2] for r in rows] == ["ok", "ok"]
    assert [r["bwd_path"] for r in rows] == ["fused+atomic-dq", "fused+dq-kernel"]
    assert all(r["rel_err_vs_fp64"] < 2e-2 and r["fwd_GFLOP"] > 0 for r in rows)
    kernels = [(r["impl"], r["kernel"]) for r in report.rows if r.get("kind") == "kernel"]
    assert ("sagan_fast triton", "_attn_bwd_dkdv_kernel +atomic dq") in kernels
    assert ("sagan_fast triton (deterministic)", "_attn_bwd_dq_kernel") in kernels


def test_cost_model_rows_count_the_design_shape():
    report = Report("attention", {"name": "cpu"}, {})
    bench_attention.cost_model_rows({"G": (64, 1024, 1024, 32, 256)}, [torch.bfloat16], report)
    fwd = [r for r in report.rows if r["phase"] == "fwd"]
    assert len(fwd) == 1 and fwd[0]["GFLOP"] == pytest.approx(2 * 64 * 1024 * 1024 * 288 / 1e9)
    paths = {r["path"] for r in report.rows if r["phase"] == "bwd"}
    assert paths == {"fused+atomic-dq", "fused+dq-kernel", "split+atomic-dq", "split+dq-kernel"}


def test_gpu_check_script_dry_run_lists_every_step(tmp_path):
    """kernels/tests/gpu_check.sh without a GPU: its step logic runs, nothing is executed, and
    the summary JSON names every step."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY_RUN="1")
    proc = subprocess.run(["bash", str(repo / "kernels" / "tests" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["build_extension", "extension_has_cuda", "pytest_gpu",
                                                     "bench_attention", "bench_spectral_norm", "ctest",
                                                     "bench_train_step"]
    assert "bench/attention.py --quick --json" in proc.stdout and "kernel_resources.py" in proc.stdout
    # The background jobs (resources report, CMake build) are cut at the budget too: the waits for
    # them cannot carry the run past its 8 minutes.
    background = [line for line in proc.stdout.splitlines() if "background" in line]
    assert len(background) == 2 and all("(timeout 470s)" in line for line in background), background


def test_spectral_norm_bench_times_every_implementation_in_the_same_rounds(tmp_path, monkeypatch):
    """bench/spectral_norm.py: the copy, every implementation's forward and its parts in one set
    of interleaved rounds, the backwards in another; every row has its spread and flags."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "bench" / "spectral_norm.py"
    spec = importlib.util.spec_from_file_location("bench_spectral_norm_timing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    groups = []

    def recording(fns, **kwargs):
        groups.append(sorted(fns))
        return time_interleaved(fns, **kwargs)
    monkeypatch.setattr(bench, "time_interleaved", recording)
    out = tmp_path / "sn.json"
    assert bench.main(["--quick", "--device", "cpu", "--backends", "reference", "--resolution", "32",
                       "--ch", "4", "--n-classes", "0", "--dtypes", "fp32", "--json", str(out)]) == 0
    assert groups == [["copy|fwd", "reference|fwd", "reference|normalize", "reference|power iteration",
                       "torch|fwd"], ["reference|bwd", "torch|bwd"]]
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if "bwd_ms" in r]
    assert [r["impl"] for r in timed] == ["torch parametrization", "sagan_fast reference"]
    assert all(r["fwd_spread"] and r["bwd_spread"] and r["status"].startswith("ok") for r in timed)
