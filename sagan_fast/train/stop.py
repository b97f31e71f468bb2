"""Stopping on a signal without losing steps: SIGINT (Ctrl-C), SIGTERM (sent by torchrun to its
workers, by SLURM and Kubernetes before a kill) or SIGHUP (the terminal or ssh session closed;
torchrun forwards it too) lets the current step finish; the loop then writes a checkpoint of it
and ends. A second SIGINT aborts at once (KeyboardInterrupt); a second SIGTERM or SIGHUP is ignored
(SLURM signals every process, torchrun forwards the signal it got: a worker may get two). SIGHUP
and SIGINT are left alone where the run started with them ignored (``nohup`` ignores SIGHUP; a shell
script's ``cmd &`` ignores SIGINT, so a Ctrl-C meant for the script does not reach its background
jobs; Python keeps SIGINT ignored then too); SIGTERM is always handled. After a SIGHUP, what would go
to the closed terminal goes to /dev/null (writing there fails: the checkpoint must still be written).

Every rank must stop after the same step (each contributes its RNG state to the checkpoint: a
collective). :meth:`StopRequest.agreed` is called by every rank once per step: alone it reads the
flag; under DDP an all-reduce (max) of each rank's signal number, on the device. On a GPU its result
is read ``CUDA_LAG`` steps later from pinned memory (the copy finished long before): no host sync
per step, and the run stops ``CUDA_LAG`` steps after the signal, on every rank the same step.

How torchrun passes signals on (torch 2.13, checked in tests/test_faults.py): its workers run in
their own sessions, so a Ctrl-C in the terminal reaches torchrun only; torchrun sends the signal it
got (SIGINT, SIGTERM or SIGHUP) to each worker's process group, waits ``--shutdown_timeout`` (30 s by
default), then SIGKILLs. DataLoader worker processes are in that group: they ignore these signals
(see data.make_loader), the training process handles them.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque

import torch
import torch.distributed as dist

from .distributed import DistInfo

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))  # no SIGHUP on Windows
CUDA_LAG = 2
"""Steps between a rank's stop flag entering the all-reduce and every rank reading the result (GPU)."""


class StopRequest:
    """Signal handlers for the training loop (a context manager) and the per-step agreement."""

    def __init__(self, info: DistInfo, lag: int | None = None) -> None:
        self.info = info
        self.signum: int | None = None
        """The first stop signal this process received."""
        self.lag = (CUDA_LAG if info.device.type == "cuda" else 0) if lag is None else lag
        self._pending: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        self._previous: dict[int, object] = {}
        self._terminal_fds: list[int] = []

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal.signal
            self._terminal_fds = terminal_fds()
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            detach_from_terminal(self._terminal_fds)
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a third Ctrl-C kills, even inside C code
            raise KeyboardInterrupt

    def agreed(self) -> int:
        """0 to go on, else the signal to stop for; the same on every rank at the same step."""
        if not self.info.distributed:
            return self.signum or 0
        flag = torch.full((1,), self.signum or 0, dtype=torch.int32, device=self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        event = None
        if flag.is_cuda:
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self._pending.append((flag, event))
        if len(self._pending) <= self.lag:
            return 0
        flag, event = self._pending.popleft()
        if event is not None:
            event.synchronize()  # recorded `lag` steps ago: long done
        return int(flag[0])


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stop_signals() -> list[int]:
    """The signals a run stops on: :data:`STOP_SIGNALS`, less SIGHUP and SIGINT where they are ignored
    (``nohup``; a background job of a shell script)."""
    return [s for s in STOP_SIGNALS if s == signal.SIGTERM or signal.getsignal(s) != signal.SIG_IGN]


def terminal_fds() -> list[int]:
    """Which of stdout and stderr are a terminal (asked before a hangup: after it, isatty says no)."""
    found = []
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                found.append(fd)
        except OSError:
            pass
    return found


def detach_from_terminal(fds: list[int]) -> None:
    """Point ``fds`` (a hung-up terminal's) at /dev/null: writing to a hung-up terminal fails (EIO),
    and a failed progress bar or log line must not stop the checkpoint the hangup asks for."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)
