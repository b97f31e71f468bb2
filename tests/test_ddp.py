"""DDP under torchrun on the CPU (gloo): ranks stay equal, and a killed worker resumes from the last
checkpoint under --max-restarts (tests/test_faults.py: SIGTERM under torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from sagan_fast.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _torchrun(out: Path, script: list[str], *flags: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags,
           *script, "--resolution", "32", "--ch", "4", "--z-dim", "16", "--batch-size", "8",
           "--n-classes", "10", "--steps", "3", "--ckpt-every", "1", "--sample-every", "3", "--log-every", "1",
           "--lr-g", "1e-3", "--lr-d", "2e-3", "--out", str(out), "--dump-rank-state", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_two_process_gloo_run_keeps_ranks_equal_and_restarts_a_killed_worker(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "crashed_once"
    # train_ddp.py, but rank 0 SIGKILLs itself right after writing the checkpoint of step 2, once;
    # torchrun restarts both workers, which resume from step 2 and finish step 3. Exactly one restart
    # allowed: the restarted workers must find each other (see distributed._per_attempt_store), and the
    # new rank 0 must get the run folder's lock again (--workers 1: the killed one had DataLoader
    # worker processes, which torchrun's SIGTERM to the survivors reaches too).
    crash_once = [str(REPO / "tests" / "train_crash_once.py"), "2", str(marker), "--workers", "1"]
    proc = _torchrun(out, crash_once, "--max-restarts=1")
    log = proc.stdout + proc.stderr
    assert marker.exists(), "the crash hook never fired"
    assert "resumed from" in log and "step_00000002.pt" in log, log[-3000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step_00000003.pt"
    # 1x1-conv weight gradients from channels_last activations get the parameter's strides (no copy;
    # batch 8: with 4 the CPU convolution happened to return them contiguous already).
    assert "Grad strides do not match bucket view strides" not in log

    states = [torch.load(out / "rank_state" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["step"] == states[1]["step"] == 3
    for model in ("G", "D"):
        a, b = states[0][model], states[1][model]
        assert a.keys() == b.keys()
        sn_keys = [k for k in a if k.endswith("._u") or k.endswith("._v")]
        assert len(sn_keys) >= 10, f"{model}: no spectral norm buffers found"
        # Weights (averaged gradients) and SN buffers (never broadcast after setup) equal bit for bit.
        for k in a:
            if "running_" in k:
                continue
            assert torch.equal(a[k], b[k]), f"{model}.{k} differs between ranks"
    # The ranks really saw different data and noise: G's per-rank BN statistics differ.
    running = [k for k in states[0]["G"] if k.endswith("running_mean")]
    assert running and any(not torch.equal(states[0]["G"][k], states[1]["G"][k]) for k in running)
