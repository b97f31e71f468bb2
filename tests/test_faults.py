"""Faults and user mistakes (issue 12): nothing lost, nothing cryptic.

- Signals (subprocesses; torchrun with 2 gloo workers): SIGINT / SIGTERM finish the step, save it,
  print one line with the command that continues, exit 130 / 143; a second Ctrl-C aborts at once.
- Resume: unreadable checkpoints set aside, stale temporary files removed, changed settings applied
  and reported, the end line after a no-op resume.
- The run folder lock, the divergence guard, bad images named once per file.
- BAD_INPUTS: every mistake a user can make that we know of, each one line and exit 2 (one
  subprocess per case, run two at a time).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from sagan_fast.train import ConfigError, DistInfo, parse_config, train
from sagan_fast.train import checkpoint as ckpt
from sagan_fast.train.errors import Diverged
from sagan_fast.train.runfolder import LOCK_FILE, RunFolder
from sagan_fast.train.stop import StopRequest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = ["--resolution", "32", "--ch", "2", "--z-dim", "8", "--batch-size", "4", "--n-samples", "4",
        "--log-every", "1", "--sample-every", "1000", "--no-progress", "--cpu-threads", "1"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def cli(args: list[str], *, prefix: list[str] = (), timeout: float = 180) -> subprocess.CompletedProcess:
    """``python [prefix] train_ddp.py args`` from the repository root."""
    return subprocess.run([sys.executable, *prefix, "train_ddp.py", *map(str, args)], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def tiny(out: Path, *more) -> list[str]:
    return [*TINY, "--out", str(out), *map(str, more)]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


# --- shared inputs --------------------------------------------------------------------------------

def _rgb_folder(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A digits run folder with checkpoints of steps 1 and 2 (in this process: no start-up cost), an RGB
    image folder, a folder of 40 corrupt files."""
    base = tmp_path_factory.mktemp("shared")
    run = base / "run"
    train(parse_config(tiny(run, "--steps", 2, "--ckpt-every", 1, "--keep-ckpts", 3)))
    rgb = _rgb_folder(base / "rgb")
    corrupt = base / "corrupt"
    corrupt.mkdir()
    for i in range(40):
        (corrupt / f"bad{i:02d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg " + bytes([i]))
    return {"run": run, "ckpt": run / "checkpoints" / "step_00000002.pt", "rgb": rgb, "corrupt": corrupt,
            "base": base}


# --- signals ----------------------------------------------------------------------------------------

def _with_dispositions(ignore: tuple[str, ...] = ()) -> list[str]:
    """A prefix for ``python ARGS``: SIGHUP and SIGINT set to their defaults, or ignored for the names
    in ``ignore``, then the same interpreter exec'd on ARGS (same pid and argv). An ignored signal
    stays ignored through exec, so under `nohup pytest` or `pytest &` in a script every run started
    here would ignore SIGHUP or SIGINT; runs start as from a terminal unless a test asks otherwise.
    (No preexec_fn: unsafe with the threads here.)"""
    sets = "; ".join(f"signal.signal(signal.{name}, signal.{'SIG_IGN' if name in ignore else 'SIG_DFL'})"
                     for name in ("SIGHUP", "SIGINT"))
    code = f"import os, signal, sys; {sets}; os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    return [sys.executable, "-c", code]


def _start(args: list[str], tmp: Path, name: str = "run", ignore: tuple[str, ...] = ()
           ) -> tuple[subprocess.Popen, Path, Path]:
    out_file, err_file = tmp / f"{name}.out", tmp / f"{name}.err"
    with open(out_file, "w") as o, open(err_file, "w") as e:  # files, not pipes: nothing can block
        proc = subprocess.Popen([*_with_dispositions(ignore), *map(str, args)], env=ENV, cwd=REPO, stdout=o,
                                stderr=e, text=True)
    return proc, out_file, err_file


def _wait_for_logged_steps(out: Path, n: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        for p in procs:
            assert p.poll() is None, f"exited early ({p.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"no {n} logged steps in {timeout} s")


STOP_LINE = re.compile(r"^train_ddp\.py: stopped by (SIG\w+) after step (\d+), saved (\S+); "
                       r"to continue: (.+)$")


def _stop_line(err: str, signame: str) -> tuple[int, Path, str]:
    found = [m for line in err.splitlines() if (m := STOP_LINE.match(line))]
    assert len(found) == 1, err
    m = found[0]
    assert m.group(1) == signame
    return int(m.group(2)), Path(m.group(3)), m.group(4)


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    for part in ("G", "D", "G_ema"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k} differs"
    assert sa["sampler"] == sb["sampler"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_says_how_to_continue_and_the_continuation_is_exact(sig, tmp_path):
    out = tmp_path / "run"
    args = ["train_ddp.py", *tiny(out, "--steps", 100000, "--ckpt-every", 1000)]
    proc, _, err_file = _start(args, tmp_path)
    try:
        _wait_for_logged_steps(out, 2, [proc])
        if sig == signal.SIGINT:  # meanwhile, a second run on the same folder is refused
            second = cli(tiny(out, "--steps", 3))
            assert second.returncode == 2, second.stderr
            assert len(lines(second.stderr)) == 1 and re.fullmatch(
                rf"train_ddp\.py: error: --out {re.escape(str(out))}: in use by another training run \(pid "
                rf"{proc.pid} on {re.escape(os.uname().nodename)} since [\d: -]+\); wait for it to finish or "
                r"choose another --out", lines(second.stderr)[0]), second.stderr
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_file.read_text()
    assert rc == 128 + sig, err
    assert_no_traceback(err)
    step, saved, command = _stop_line(err, sig.name)
    assert step >= 2 and saved == out / "checkpoints" / f"step_{step:08d}.pt" and saved.is_file()
    assert ckpt.list_checkpoints(out / "checkpoints") == [saved]  # --ckpt-every 1000: only the stop's
    # The printed command continues (one more step here) from that checkpoint, bit for bit.
    argv = shlex.split(command)
    assert argv[1:3] == ["train_ddp.py", *TINY[:1]] and "--resume" not in argv
    resumed = subprocess.run([*argv, "--steps", str(step + 1)], env=ENV, cwd=REPO, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {saved} at step {step} of {step + 1}" in resumed.stdout
    straight = tmp_path / "straight"
    train(parse_config(tiny(straight, "--steps", step + 1, "--ckpt-every", 1000)))
    name = f"step_{step + 1:08d}.pt"
    _same_weights(out / "checkpoints" / name, straight / "checkpoints" / name)


def test_a_run_started_ignoring_hang_up_and_ctrl_c_leaves_them_alone_and_sigterm_still_saves(tmp_path):
    """`nohup python train_ddp.py ... &` in a shell script starts the run with SIGHUP ignored (nohup)
    and SIGINT ignored (a script's background job): it asked to outlive the terminal and the
    script's Ctrl-C. Both stay ignored (the run goes on); SIGTERM still saves and exits 143."""
    out = tmp_path / "run"
    proc, _, err_file = _start(["train_ddp.py", *tiny(out, "--steps", 100000, "--ckpt-every", 1000)],
                               tmp_path, ignore=("SIGHUP", "SIGINT"))
    try:
        _wait_for_logged_steps(out, 2, [proc])
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGINT)
        logged = len((out / "metrics.jsonl").read_text().splitlines())
        _wait_for_logged_steps(out, logged + 2, [proc])  # two more steps after both
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_file.read_text()
    assert rc == 128 + signal.SIGTERM, err
    assert_no_traceback(err)
    step, saved, _ = _stop_line(err, "SIGTERM")
    assert step >= logged + 2 and saved.is_file()


def test_a_second_ctrl_c_aborts_the_step_at_once(tmp_path):
    out = tmp_path / "run"
    # A step of a few seconds (64 px, batch 64), so the second signal lands inside the first step.
    args = ["--resolution", "64", "--ch", "16", "--batch-size", "64", "--steps", "5", "--no-progress",
            "--cpu-threads", "1", "--n-samples", "4", "--out", str(out)]
    proc, out_file, err_file = _start(["train_ddp.py", *args], tmp_path)
    try:
        deadline = time.monotonic() + 180
        while "starting at step 0" not in out_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err_file.read_text()
            time.sleep(0.05)
        time.sleep(0.2)  # the handlers are in place a moment after the banner
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        assert proc.poll() is None, "the first Ctrl-C ended the run: it must let the step finish"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_file.read_text()
    assert rc == 130, err
    assert_no_traceback(err)
    assert lines(err) == [f"train_ddp.py: interrupted (Ctrl-C), no checkpoint written; to continue: "
                          f"{shlex.join([sys.executable, 'train_ddp.py', *args])}"]
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text(), \
        "the first step finished: the second signal did not abort it"
    assert took < 10, f"took {took:.1f} s to abort"


def test_stop_request_handles_real_signals_in_this_process():
    # Ctrl-C handled as from a terminal, even where pytest itself started with SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest(DistInfo()) as stop:
            assert stop.agreed() == 0
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and stop.agreed() == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun and SLURM may both send one: not an abort
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # the second signal, a Ctrl-C: abort
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal handlers from /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_starting_is_one_line_not_a_traceback_or_a_silent_death(sig, tmp_path):
    """Sent as soon as train_ddp.py has its handlers, that is while it imports torch (seconds): a Ctrl-C
    printed a KeyboardInterrupt traceback from inside the imports, a SIGTERM or SIGHUP killed it
    without a word."""
    out = tmp_path / "run"
    args = ["train_ddp.py", *tiny(out, "--steps", 5)]
    proc, out_file, err_file = _start(args, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None and time.monotonic() < deadline, err_file.read_text()
            time.sleep(0.002)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_file.read_text()
    assert_no_traceback(err)
    name = "(Ctrl-C)" if sig == signal.SIGINT else f"by {sig.name}"
    command = shlex.join([sys.executable, *args])
    assert rc == 128 + sig and lines(err) == [
        f"train_ddp.py: interrupted {name} while starting, nothing trained yet; to continue: {command}"], err
    assert not out_file.read_text() and not out.exists()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_closing_the_terminal_saves_the_step_like_sigterm(tmp_path):
    """A run in a terminal that is closed (ssh dropped): the kernel sends SIGHUP to the run and its
    DataLoader workers (the foreground process group). It used to die of it, saving nothing. Writing
    to the hung-up terminal fails (EIO): the run must not trip over its own progress bar or log lines."""
    import pty

    out = tmp_path / "run"
    folder = _rgb_folder(tmp_path / "rgb")
    flags = tiny(out, "--steps", 100000, "--ckpt-every", 1000, "--data", folder, "--workers", 2, "--progress")
    args = [sys.executable, "train_ddp.py", *flags]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own, the pty its controlling terminal
        try:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal, even under `nohup pytest`
            os.chdir(REPO)
            os.execve(args[0], args, ENV)
        finally:
            os._exit(127)
    shown = b""
    try:
        deadline = time.monotonic() + 180
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline, shown.decode(errors="replace")[-3000:]
            ready, _, _ = select.select([terminal], [], [], 0.1)
            if ready:
                shown += os.read(terminal, 1 << 16)
    finally:
        os.close(terminal)  # hang up
    deadline = time.monotonic() + 120
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    status = waited[1]
    if waited[0] == 0:  # still running: the hang-up did not stop it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the run went on after its terminal was closed: " + shown.decode(errors="replace")[-3000:])
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP, shown.decode(errors="replace")[-3000:]
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and ckpt.load_checkpoint(saved[0])["step"] >= 2
    assert_no_traceback(shown.decode(errors="replace"))


def test_a_ctrl_c_during_a_checkpoint_write_leaves_the_old_state_and_no_file(tmp_path):
    """A second Ctrl-C while the stop's checkpoint is written raises KeyboardInterrupt inside torch.save's
    write: torch then reported "[enforce fail at inline_container.cc] unexpected pos" (a RuntimeError
    with a traceback, the interrupt lost). The write blocks here in a real system call (a FIFO at the
    temporary file's name, read only after the signal), where the signal interrupts it."""
    import fcntl
    import termios

    path = tmp_path / "step_00000001.pt"
    tmp = tmp_path / f".{path.name}.tmp{os.getpid()}"
    os.mkfifo(tmp)
    main = threading.main_thread().ident
    blocked = []

    def interrupt_the_blocked_write_then_read() -> None:
        with open(tmp, "rb") as f:
            queued, deadline = [-1], time.monotonic() + 60
            while time.monotonic() < deadline:  # the pipe is full (the 1 MiB write waits): no more growth
                time.sleep(0.2)
                queued.append(struct.unpack("i", fcntl.ioctl(f.fileno(), termios.FIONREAD, b"\0" * 4))[0])
                if queued[-1] == queued[-2] > 0:
                    blocked.append(queued[-1])
                    break
            signal.pthread_kill(main, signal.SIGINT)
            while f.read(1 << 16):
                pass

    reader = threading.Thread(target=interrupt_the_blocked_write_then_read)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reader.start()
        with pytest.raises(KeyboardInterrupt):
            ckpt.atomic_torch_save({"w": torch.zeros(1 << 18)}, path)
    finally:
        signal.signal(signal.SIGINT, previous)
        reader.join(60)
    assert blocked, "the write never blocked"
    assert not path.exists() and not tmp.exists()


def _torchrun(args: list[str], tmp: Path) -> tuple[subprocess.Popen, Path, Path]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return _start([*launcher, "train_ddp.py", *args], tmp, "torchrun")


def _worker_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0") if ppid == torchrun.pid else []
        except (OSError, ValueError, IndexError):  # not a process, or gone
            continue
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if rank:
            pids[int(rank[0])] = int(proc.name)
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker pids from /proc")
@pytest.mark.parametrize("target", ["torchrun", "rank1"])
def test_sigterm_under_torchrun_stops_both_ranks_after_the_same_step(target, tmp_path):
    """``torchrun``: SIGTERM to torchrun (what Kubernetes does), which sends it to each worker's process
    group (DataLoader workers included: --workers 1). ``rank1``: SIGTERM to one worker only (what
    torchrun does to the survivors of a failed worker): the all-reduced stop flag stops rank 0 too."""
    out = tmp_path / "run"
    proc, out_file, err_file = _torchrun(tiny(out, "--steps", 100000, "--ckpt-every", 1000, "--workers", 1,
                                              "--dump-rank-state"), tmp_path)
    try:
        _wait_for_logged_steps(out, 2, [proc])
        os.kill(proc.pid if target == "torchrun" else _worker_pids(proc)[1], signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = out_file.read_text() + err_file.read_text()
    # No traceback frame from our code (torchrun prints its own; CI's venv lives inside the repository).
    ours = [line for line in log.splitlines()
            if f'File "{REPO}' in line and f'File "{sys.prefix}' not in line]
    assert not ours, log[-4000:]
    step, saved, command = _stop_line(log, "SIGTERM")
    assert saved.is_file() and ckpt.list_checkpoints(out / "checkpoints") == [saved]
    assert "torch.distributed.run --standalone --nproc_per_node=2 train_ddp.py" in command
    states = [torch.load(out / "rank_state" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["step"] == states[1]["step"] == step
    for k in states[0]["D"]:
        assert torch.equal(states[0]["D"][k], states[1]["D"][k]), k


# --- resume ------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_unreadable_checkpoints_are_set_aside_and_the_newest_good_one_resumes(tmp_path, capfd):
    out = tmp_path / "run"
    train(parse_config(tiny(out, "--steps", 4, "--ckpt-every", 1, "--keep-ckpts", 4)))
    folder = out / "checkpoints"
    fourth, third, second = (folder / f"step_0000000{i}.pt" for i in (4, 3, 2))
    fourth.write_bytes(fourth.read_bytes()[:5000])  # a copy cut short
    third.write_bytes(b"")  # a full disk elsewhere
    torch.save({"format": 1, "step": 2}, second)  # someone else's file under our name
    dead = _dead_pid()
    stale = [folder / f".step_00000005.pt.tmp{dead}", out / "samples" / f".step_00000005.png.tmp{dead}"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    own = folder / f".step_00000009.pt.tmp{os.getpid()}"  # this process's own: never touched
    own.write_bytes(b"")
    capfd.readouterr()
    result = train(parse_config(tiny(out, "--steps", 5, "--ckpt-every", 1, "--keep-ckpts", 4)))
    captured = capfd.readouterr()
    assert result.resumed_from == folder / "step_00000001.pt" and result.step == 5
    then = "trying the one before"
    assert [line for line in lines(captured.err) if line.startswith("warning:")] == [
        f"warning: checkpoint {fourth} is unreadable: truncated (5000 bytes: the zip archive torch.save "
        f"writes has no end record); renamed to step_00000004.pt.corrupt, {then}",
        f"warning: checkpoint {third} is unreadable: an empty file (0 bytes); renamed to "
        f"step_00000003.pt.corrupt, {then}",
        f"warning: checkpoint {second} is unreadable: not a complete sagan_fast training checkpoint (no "
        f"['config', 'G', 'D', 'G_ema', 'opt_G', 'opt_D', 'sn', 'sampler', 'rng', 'skipped_images']); "
        f"renamed to step_00000002.pt.corrupt, {then}"]
    assert (folder / "step_00000004.pt.corrupt").stat().st_size == 5000  # kept as it was
    assert (folder / "step_00000003.pt.corrupt").stat().st_size == 0
    assert torch.load(folder / "step_00000002.pt.corrupt", weights_only=True) == {"format": 1, "step": 2}
    assert not any(p.exists() for p in stale) and own.exists()
    assert f"removed 2 temporary file(s) of interrupted writes in {out}" in captured.out
    assert [p.name for p in ckpt.list_checkpoints(folder)] == [f"step_0000000{i}.pt" for i in (2, 3, 4, 5)]
    own.unlink()


def test_changed_settings_are_applied_and_said_and_the_checkpoint_records_them(tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_config(tiny(out, "--steps", 1, "--ckpt-every", 1, "--lr-g", 1e-3)))
    capsys.readouterr()
    train(parse_config(tiny(out, "--steps", 2, "--ckpt-every", 1, "--lr-g", 2e-3, "--batch-size", 8)))
    said = capsys.readouterr().out
    assert ("resume: settings changed since the checkpoint, the new values apply: --batch-size 4 -> 8, "
            "--lr-g 0.001 -> 0.002") in said
    assert "resume: not bit-exact with an uninterrupted run: --batch-size changed" in said
    saved = ckpt.load_checkpoint(out / "checkpoints" / "step_00000002.pt")
    # What the optimizer used is what the config says (the optimizer state alone brought 1e-3 back).
    assert [g["lr"] for g in saved["opt_G"]["param_groups"]] == [2e-3] == [saved["config"]["optim"]["lr_g"]]
    assert json.loads((out / "config.json").read_text())["optim"]["lr_g"] == 2e-3
    # A checkpoint of two processes, resumed by one: said, not silent.
    saved["world_size"], saved["rng"] = 2, saved["rng"] * 2
    ckpt.atomic_torch_save(saved, out / "checkpoints" / "step_00000002.pt")
    train(parse_config(tiny(out, "--steps", 3, "--ckpt-every", 1, "--lr-g", 2e-3, "--batch-size", 8)))
    said = capsys.readouterr().out
    assert ("resume: not bit-exact with an uninterrupted run: 2 process(es) then, 1 now (RNG states "
            "reseeded)") in said
    assert "settings changed" not in said


def test_a_no_op_resume_ends_with_a_true_line_and_the_banner_says_where_it_starts(shared, capsys):
    import train_ddp

    result = train(parse_config(tiny(shared["run"], "--steps", 2, "--ckpt-every", 1, "--keep-ckpts", 3)))
    said = capsys.readouterr().out
    assert (result.start_step, result.step) == (2, 2)
    assert train_ddp.done_line(result) == (
        f"done: step 2 (reached already: nothing to train), checkpoint {shared['ckpt']}, samples "
        f"{shared['run']}/samples/step_00000002.png")
    banner = lines(said)
    assert re.fullmatch(r"train: cpu, 1 CPU thread\(s\), 1 process\(es\); G \d+\.\dk parameters, D \d+\.\dk; "
                        r"data: digits \(1797 images, 1 channel, 449 batches per epoch per process\); "
                        rf"run folder {re.escape(str(shared['run']))}", banner[0]), banner[0]
    assert banner[1] == (f"train: resumed from {shared['ckpt']} at step 2: --steps 2 is reached already, "
                         "nothing to train (raise --steps to go on)")


# --- the run folder lock ------------------------------------------------------------------------------

def test_the_lock_refuses_a_second_run_and_is_free_again_when_its_holder_is_killed(tmp_path):
    """The holder forks a child (as DataLoader workers are forked) before it is killed: the folder is
    free at once all the same (a POSIX record lock is the process's, not shared with its children)."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; from sagan_fast.train import DistInfo; "
         "from sagan_fast.train.runfolder import RunFolder; RunFolder(sys.argv[1], DistInfo()).__enter__(); "
         "child = os.fork(); child or time.sleep(120); print(child, flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    child = None
    try:
        child = int(holder.stdout.readline())
        busy = rf"--out {re.escape(str(out))}: in use by another training run \(pid {holder.pid} on "
        with pytest.raises(ConfigError, match=busy + rf"{re.escape(os.uname().nodename)} since"):
            RunFolder(out, DistInfo()).__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # the forked child lives on
        with RunFolder(out, DistInfo()):  # yet the kernel released the lock with its holder
            assert f"pid {os.getpid()} on " in (out / LOCK_FILE).read_text()
    finally:
        for pid in (holder.pid, child):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        holder.wait(timeout=30)
        holder.stdout.close()


# --- divergence ----------------------------------------------------------------------------------------

def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(shared, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002.pt").write_bytes(shared["ckpt"].read_bytes())
    # The new learning rates apply on resume (they used to be ignored): the next step blows up.
    with pytest.raises(Diverged, match=r"^step 3: the run diverged: loss_\w = -?[\d.]+e\+\d+, beyond "
                                       r"--max-loss 10000; the last checkpoint, .*step_00000002\.pt, is "
                                       r"kept: lower"):
        train(parse_config(tiny(out, "--steps", 6, "--ckpt-every", 1, "--lr-g", 1e8, "--lr-d", 1e8)))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000002.pt"]
    last_logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_logged["step"] == 3  # logged, then stopped


def test_exploding_weights_with_small_losses_stop_the_run_before_a_checkpoint_of_them(shared, tmp_path):
    """--lr-g 1e8 alone: SN keeps D's outputs, so the losses, finite and small, and the loss guard
    passes; G's weights and batch-norm statistics explode (~1e32 by step 2). The run used to go to the
    end, writing checkpoints of that state over the good ones."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002.pt").write_bytes(shared["ckpt"].read_bytes())
    # Found at the checkpoint of step 4 at the latest (the log steps may look at the weights too).
    found = (r"^step [34]: the run diverged: G\.\S+ (reached|holds) .*; the last checkpoint, "
             r".*step_00000002\.pt, is kept: lower --lr-g / --lr-d")
    with pytest.raises(Diverged, match=found) as err:
        train(parse_config(tiny(out, "--steps", 6, "--ckpt-every", 2, "--lr-g", 1e8)))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000002.pt"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == int(str(err.value).split(":")[0].split()[1])  # logged, then stopped
    assert all(abs(r[k]) < 100 for r in logged for k in ("loss_d", "loss_g"))  # what the loss guard saw


def test_the_divergence_check_reads_nan_the_threshold_and_a_degenerate_spectral_norm(shared):
    from sagan_fast.models import build_models
    from sagan_fast.nn.spectral_norm import set_check_finite
    from sagan_fast.train.loop import _raise_if_diverged
    from sagan_fast.train.step import PLAIN, GANStep

    cfg = parse_config(tiny(shared["base"] / "unused", "--max-loss", 100, "--n-classes", 0))
    G, D = build_models(cfg.model, 1)
    step = GANStep(G, D, torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters()), precision="fp32",
                   **PLAIN)
    ok = {"loss_d": 1.0, "loss_g": -99.0, "d_real": 0.5, "d_fake": -0.5}
    _raise_if_diverged(cfg, 7, ok, step)
    for bad, match in (({"loss_g": -101.0}, "loss_g = -101, beyond --max-loss 100"),
                       ({"loss_d": math.nan}, "loss_d is nan"), ({"d_fake": math.inf}, "d_fake is inf")):
        with pytest.raises(Diverged, match=f"^step 7: the run diverged: {match}; no checkpoint was written"):
            _raise_if_diverged(cfg, 7, {**ok, **bad}, step)
    # A zero weight: its sigma is 0, the SN check the step leaves to log steps finds it.
    weight = next(p for n, p in D.named_parameters() if n.endswith("original"))
    with torch.no_grad():
        weight.zero_()
    previous = set_check_finite(False)
    try:
        D(torch.randn(2, 1, 32, 32))
    finally:
        set_check_finite(previous)
    with pytest.raises(Diverged, match=r"the run diverged: spectral norm: sigma is zero, NaN or Inf for "
                                       r"weight\(s\) of shape \[.*\]; no checkpoint"):
        _raise_if_diverged(cfg, 7, ok, step)


# --- bad images ------------------------------------------------------------------------------------------

def test_bad_images_are_named_once_per_file_and_counted_once_over_workers_and_epochs(tmp_path, capfd):
    root = _rgb_folder(tmp_path / "imgs", 4)
    (root / "zz_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("1", (20000, 10000)).save(root / "huge.png")  # 200 megapixels: DecompressionBombError
    capfd.readouterr()
    # 6 files, batches of 2: 3 per epoch, 9 steps = 3 epochs, in 2 DataLoader worker processes.
    result = train(parse_config(tiny(tmp_path / "run", "--data", root, "--batch-size", 2, "--workers", 2,
                                     "--steps", 9, "--log-every", 3, "--ckpt-every", 9)))
    err = capfd.readouterr().err
    assert_no_traceback(err)
    # One line per file (in the order they were met), not one per worker or epoch.
    assert {re.sub(r"; \d skipped so far$", "", line) for line in lines(err)} == {
        f"warning: skipped unreadable image {root / 'huge.png'} (DecompressionBombError: Image size "
        "(200000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack.)",
        f"warning: skipped unreadable image {root / 'zz_truncated.jpg'} (OSError: Truncated File Read)"}, err
    assert len(lines(err)) == 2 and lines(err)[1].endswith("; 2 skipped so far"), err
    assert result.skipped_images == 2
    saved = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000009.pt")
    assert saved["skipped_images"] == 2
    assert saved["unreadable_images"] == sorted([str(root / "huge.png"), str(root / "zz_truncated.jpg")])


# --- the table of user mistakes --------------------------------------------------------------------------

# Runs train_ddp.py after setting a resource limit or dropping privileges (rlimits and the capability
# bounding set survive exec; preexec_fn is unsafe with the threads that run the cases).
_EXEC = "import os, sys; {setup}; os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
FSIZE_LIMIT = ["-c", _EXEC.format(setup="import resource; resource.setrlimit(resource.RLIMIT_FSIZE, "
                                        "(64 << 10, 64 << 10))")]
# The address space the run needs to import torch, plus 2 GiB: what is asked for beyond fails in the
# allocator at once (nothing is used up: a shared machine's memory stays free).
AS_LIMIT = ["-c", _EXEC.format(setup="import resource, torch; vm = int(open('/proc/self/status').read()"
                                     ".split('VmPeak:')[1].split()[0]) * 1024 + (2 << 30); "
                                     "resource.setrlimit(resource.RLIMIT_AS, (vm, vm))")]
# root ignores file permissions (CAP_DAC_OVERRIDE): drop that, CAP_DAC_READ_SEARCH and CAP_FOWNER
# from the bounding set before exec, so a read-only folder is read-only to the run too.
NO_DAC = ["-c", _EXEC.format(setup="import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
                                   "[sys.exit(77) for cap in (1, 2, 3) if libc.prctl(24, cap, 0, 0, 0) != 0] "
                                   "if os.geteuid() == 0 else None")]


@dataclasses.dataclass
class Bad:
    id: str
    setup: Callable[[Path, dict], list]
    error: str
    """A regex the one error line must match (after "train_ddp.py: error: ")."""
    prefix: list[str] = dataclasses.field(default_factory=list)
    warnings: int = 0
    """Warning lines expected before the error."""


def _copy_run(shared: dict, tmp: Path) -> Path:
    out = tmp / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002.pt").write_bytes(shared["ckpt"].read_bytes())
    return out


def _foreign(tmp: Path) -> Path:
    torch.save({"hello": torch.ones(2)}, tmp / "foreign.pt")
    return tmp / "foreign.pt"


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def _evil(tmp: Path) -> Path:
    torch.save({"format": 1, "x": _Evil()}, tmp / "evil.pt")
    return tmp / "evil.pt"


def _truncated(shared: dict, tmp: Path) -> Path:
    (tmp / "cut.pt").write_bytes(shared["ckpt"].read_bytes()[:4096])
    return tmp / "cut.pt"


def _read_only_out(tmp: Path) -> Path:
    out = tmp / "ro"
    out.mkdir()
    out.chmod(0o555)
    return out


def _busy(tmp: Path, shared: dict) -> list:
    out = tmp / "busy"
    folder = RunFolder(out, DistInfo())
    folder.__enter__()  # held by this (the test) process while the case runs
    shared.setdefault("held", []).append(folder)
    return tiny(out, "--steps", 2)


def _prepared_truncated(tmp: Path, shared: dict) -> Path:
    from sagan_fast.train.prepared_data import prepare

    prepare(shared["rgb"], tmp / "prepared", 32, workers=0, quiet=True)
    images = tmp / "prepared" / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    return tmp / "prepared"


def _all_corrupt_checkpoints(shared: dict, tmp: Path) -> Path:
    out = _copy_run(shared, tmp)
    (out / "checkpoints" / "step_00000001.pt").write_bytes(b"")
    (out / "checkpoints" / "step_00000002.pt").write_bytes(shared["ckpt"].read_bytes()[:100])
    return out


def _q(p) -> str:
    return re.escape(str(p))


def _text_file(tmp: Path) -> Path:
    (tmp / "notes.pt").write_text("hello, not a checkpoint\n")
    return tmp / "notes.pt"


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.pt")  # reading it would block for ever
    return tmp / "pipe.pt"


def _link_loop(tmp: Path) -> Path:
    (tmp / "a").symlink_to(tmp / "b")
    (tmp / "b").symlink_to(tmp / "a")
    return tmp / "a"


def _read_only_sub(tmp: Path, shared: dict, sub: str) -> Path:
    out = _copy_run(shared, tmp)
    (out / sub).mkdir(exist_ok=True)
    (out / sub).chmod(0o555)
    return out


def _unreadable_sub(tmp: Path, shared: dict, sub: str) -> Path:
    out = _copy_run(shared, tmp)
    (out / sub).chmod(0o000)
    return out


def _prepared_float(tmp: Path, shared: dict) -> Path:
    from sagan_fast.train.prepared_data import prepare

    prepare(shared["rgb"], tmp / "prepared", 32, workers=0, quiet=True)
    np.save(tmp / "prepared" / "images.npy", np.full((4, 32, 32, 3), np.nan, np.float32))
    return tmp / "prepared"


def _prepared_bad_index(tmp: Path, shared: dict) -> Path:
    from sagan_fast.train.prepared_data import prepare

    prepare(shared["rgb"], tmp / "prepared", 32, workers=0, quiet=True)
    index = tmp / "prepared" / "index.json"
    index.write_text(index.read_text()[:30])  # cut short
    return tmp / "prepared"


BAD_INPUTS = [
    Bad("device-cuda-without-gpu", lambda t, s: tiny(t / "r", "--device", "cuda"),
        r"--device cuda: CUDA is not available \(this PyTorch .* (finds no GPU|was built without CUDA)\); "
        r"use --device cpu"),
    Bad("bad-flag-value", lambda t, s: tiny(t / "r", "--lr-g", 0), r"--lr-g: must be > 0, got 0.0"),
    Bad("max-loss-not-positive", lambda t, s: tiny(t / "r", "--max-loss", -1), r"--max-loss: must be > 0"),
    Bad("resume-missing-file", lambda t, s: tiny(t / "r", "--resume", t / "nope.pt"),
        r"--resume .*nope\.pt: no such file$"),
    Bad("resume-a-folder", lambda t, s: tiny(t / "r", "--resume", s["run"]),
        r"--resume .*: a folder, not a checkpoint file; its newest checkpoint is .*step_00000002\.pt, and "
        r"--out .* continues that run from it$"),
    Bad("resume-foreign-pt", lambda t, s: tiny(t / "r", "--resume", _foreign(t)),
        r"--resume .*foreign\.pt: not a sagan_fast training checkpoint \(format 1\)$"),
    Bad("resume-pickle-with-code", lambda t, s: tiny(t / "r", "--resume", _evil(t)),
        r"--resume .*evil\.pt: holds objects other than tensors and plain values \(refused by "
        r"torch\.load\(weights_only=True\)\)$"),
    Bad("resume-truncated-file", lambda t, s: tiny(t / "r", "--resume", _truncated(s, t)),
        r"--resume .*cut\.pt: truncated \(4096 bytes: the zip archive torch\.save writes has no end "
        r"record\)$"),
    Bad("resume-latest-none", lambda t, s: tiny(t / "r", "--resume"),
        r"--resume: no checkpoint in .*checkpoints$"),
    Bad("no-resume-over-checkpoints", lambda t, s: tiny(_copy_run(s, t), "--no-resume"),
        r"--no-resume: .* already holds checkpoints \(up to step_00000002\.pt\); choose another --out"),
    Bad("all-checkpoints-unreadable", lambda t, s: tiny(_all_corrupt_checkpoints(s, t), "--steps", 3),
        r"none of the 2 checkpoint\(s\) in .* can be read \(each kept as \*\.pt\.corrupt\); --no-resume "
        r"starts this run folder afresh$", warnings=2),
    Bad("checkpoint-of-other-channels", lambda t, s: tiny(_copy_run(s, t), "--data", s["rgb"], "--steps", 3),
        r"cannot resume from .*step_00000002\.pt: it was trained on 1-channel images, the data .* has "
        r"3-channel images \(use another --out\)$"),
    Bad("checkpoint-of-other-model", lambda t, s: tiny(_copy_run(s, t), "--ch", 4, "--steps", 3),
        r"cannot resume from .*: model settings differ \(checkpoint, now\): \{'ch': \(2, 4\)\}$"),
    Bad("out-is-a-file", lambda t, s: tiny(s["ckpt"], "--steps", 1),
        r"--out .*step_00000002\.pt: exists and is not a folder$"),
    Bad("out-read-only", lambda t, s: tiny(_read_only_out(t), "--steps", 1),
        r"--out .*ro: not writable \(Permission denied\)$", prefix=NO_DAC),
    Bad("out-in-use", lambda t, s: _busy(t, s),
        r"--out .*busy: in use by another training run \(pid \d+ on .* since .*\); wait for it to finish or "
        r"choose another --out$"),
    Bad("disk-full", lambda t, s: tiny(t / "r", "--steps", 2, "--ckpt-every", 1),
        r"cannot write the checkpoint of step 1 to .*step_00000001\.pt \(File too large\); there is no "
        r"earlier one: make room and run the same command again$",
        prefix=FSIZE_LIMIT),
    # All 1797 digits at 256 px in one batch: several GiB per activation.
    Bad("out-of-memory",
        lambda t, s: tiny(t / "r", "--resolution", 256, "--batch-size", 1797, "--device", "cpu"),
        r"out of memory \([\d.]+ GiB more were asked for\): lower --batch-size \(it is per process\) or use "
        r"--precision bf16 on a GPU, and run again$", prefix=AS_LIMIT),
    Bad("data-missing", lambda t, s: tiny(t / "r", "--data", t / "nowhere"),
        r"--data .*nowhere': no such folder"),
    Bad("data-no-images", lambda t, s: tiny(t / "r", "--data", t),
        r"--data .*: no jpg/jpeg/png/webp images found"),
    Bad("data-all-corrupt", lambda t, s: tiny(t / "r", "--data", s["corrupt"], "--workers", 2, "--steps", 2),
        r"--data .*corrupt': none of its 40 images can be read \(e\.g\. bad00\.jpg: OSError: Truncated File "
        r"Read\)$"),
    Bad("batch-larger-than-data", lambda t, s: tiny(t / "r", "--data", s["rgb"], "--batch-size", 8),
        r"4 images give 4 per process: fewer than one batch of 8"),
    Bad("labels-for-unlabelled-data", lambda t, s: tiny(t / "r", "--data", s["rgb"], "--n-classes", 3),
        r"--n-classes 3: the data .* has no class labels"),
    Bad("prepared-data-damaged", lambda t, s: tiny(t / "r", "--data", _prepared_truncated(t, s)),
        r".*prepared: images\.npy cannot be read \(.*\); prepare the folder again$"),
    Bad("diverged", lambda t, s: tiny(t / "r", "--steps", 4, "--ckpt-every", 1, "--lr-g", 1e8, "--lr-d", 1e8),
        r"step 1: the run diverged: loss_\w = .*, beyond --max-loss 10000; no checkpoint was written: lower "
        r"--lr-g / --lr-d \(or raise --max-loss\) and start again$"),
    # Only G's rate: SN keeps the losses finite and small, G's weights and batch-norm statistics explode.
    Bad("diverged-lr-g-only", lambda t, s: tiny(t / "r", "--steps", 4, "--ckpt-every", 2, "--lr-g", 1e8),
        r"step [12]: the run diverged: G\.\S+ (reached [\d.]+e\+\d+ \(no weight or statistic of a healthy "
        r"run gets near 1e\+08\)|holds (nan|inf)); no checkpoint was written: lower --lr-g / --lr-d and "
        r"start again$"),
    Bad("resume-text-file", lambda t, s: tiny(t / "r", "--resume", _text_file(t)),
        r"--resume .*notes\.pt: not a checkpoint \(torch\.save writes a zip archive; this file starts with "
        r"b'hello, not a'\)$"),
    Bad("resume-not-a-regular-file", lambda t, s: tiny(t / "r", "--resume", _fifo(t)),
        r"--resume .*pipe\.pt: not a regular file$"),
    Bad("out-under-a-file", lambda t, s: tiny(s["ckpt"] / "run", "--steps", 1),
        r"--out .*step_00000002\.pt/run: cannot create the run folder \(Not a directory\)$"),
    Bad("data-is-a-file", lambda t, s: tiny(t / "r", "--data", s["ckpt"]),
        r"--data .*step_00000002\.pt' is not a folder$"),
    Bad("checkpoints-not-readable", lambda t, s: tiny(_unreadable_sub(t, s, "checkpoints"), "--steps", 3),
        r".*/checkpoints: Permission denied \(a full disk, a quota, permissions\?\); fix that and run the "
        r"same command to continue from the newest checkpoint$", prefix=NO_DAC),
    Bad("out-link-loop", lambda t, s: tiny(_link_loop(t), "--steps", 1),
        r"--out .*/a: a symbolic link to .*/b, which does not exist \(or is a loop of links\)$"),
    Bad("checkpoints-not-writable", lambda t, s: tiny(_read_only_sub(t, s, "checkpoints"), "--steps", 3),
        r"cannot write the checkpoint of step 3 to .*step_00000003\.pt \(Permission denied\); the newest "
        r"complete one, .*step_00000002\.pt, is kept: fix that and run the same command to continue from it$",
        prefix=NO_DAC),
    # TensorBoard writes from a thread of its own: its error must not print a thread traceback.
    Bad("tensorboard-not-writable", lambda t, s: tiny(_read_only_sub(t, s, "tensorboard"), "--steps", 3),
        r".*/tensorboard/events\.out\.tfevents\.\S+: Permission denied \(a full disk, a quota, "
        r"permissions\?\); fix that and run the same command to continue from the newest checkpoint$",
        prefix=NO_DAC),
    Bad("prepared-data-not-uint8", lambda t, s: tiny(t / "r", "--data", _prepared_float(t, s)),
        r".*prepared: images\.npy holds float32 \(4, 32, 32, 3\), the index says uint8 \(N, 32, 32, 3\): "
        r"prepare the folder again$"),
    Bad("prepared-index-damaged", lambda t, s: tiny(t / "r", "--data", _prepared_bad_index(t, s)),
        r"--data .*prepared': a prepared folder whose index\.json is damaged or of another format \(not "
        r"sagan_fast\.prepared_images/1\): prepare the folder again$"),
]
_IDS = [case.id for case in BAD_INPUTS]


def test_the_table_counts_the_bad_inputs_tried():
    """Every mistake issue 12 lists is in the table (and a few like them); ids are unique."""
    assert len(set(_IDS)) == len(_IDS) == 36
    listed = {"device-cuda-without-gpu", "resume-missing-file", "resume-a-folder", "resume-foreign-pt",
              "checkpoint-of-other-channels", "out-read-only", "disk-full", "data-all-corrupt", "out-in-use",
              "diverged", "diverged-lr-g-only", "resume-truncated-file"}
    assert listed <= set(_IDS)


@pytest.fixture(scope="module")
def bad_input_runs(shared, tmp_path_factory):
    """Every case of BAD_INPUTS, two subprocesses at a time: {id: CompletedProcess}."""
    def run(case: Bad) -> subprocess.CompletedProcess:
        tmp = tmp_path_factory.mktemp(case.id)
        return cli(case.setup(tmp, shared), prefix=case.prefix)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            return dict(zip(_IDS, pool.map(run, BAD_INPUTS)))
    finally:
        for folder in shared.pop("held", []):
            folder.release()


@pytest.mark.parametrize("case", BAD_INPUTS, ids=_IDS)
def test_a_bad_input_is_one_clear_line_and_exit_2(case, bad_input_runs):
    if case.id == "device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is there")
    proc = bad_input_runs[case.id]
    if proc.returncode == 77:
        pytest.skip("cannot drop root's file permission override here")
    assert_no_traceback(proc.stdout + proc.stderr)
    err = lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in err if line.startswith("train_ddp.py: error: ")]
    assert len(errors) == 1 and len(err) == 1 + case.warnings, err
    assert all(line.startswith("warning: ") for line in err if line not in errors), err
    assert re.match(case.error, errors[0][len("train_ddp.py: error: "):]), errors[0]
