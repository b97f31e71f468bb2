"""Stopping on a signal without losing steps: SIGINT (Ctrl-C) or SIGTERM (sent by torchrun to its
workers, by SLURM and Kubernetes before a kill) lets the current step finish; the loop then writes
a checkpoint of it and ends. A second SIGINT aborts at once (KeyboardInterrupt); a second SIGTERM
is ignored (SLURM signals every process, torchrun forwards the signal it got: a worker may get two).

Every rank must stop after the same step (each contributes its RNG state to the checkpoint: a
collective). :meth:`StopRequest.agreed` is called by every rank once per step: alone it reads the
flag; under DDP an all-reduce (max) of each rank's signal number, on the device. On a GPU its result
is read ``CUDA_LAG`` steps later from pinned memory (the copy finished long before): no host sync
per step, and the run stops ``CUDA_LAG`` steps after the signal, on every rank the same step.

How torchrun passes signals on (torch 2.13, checked in tests/test_faults.py): its workers run in
their own sessions, so a Ctrl-C in the terminal reaches torchrun only; torchrun sends the signal it
got (SIGINT or SIGTERM) to each worker's process group, waits ``--shutdown_timeout`` (30 s by
default), then SIGKILLs. DataLoader worker processes are in that group: they ignore both signals
(see data.make_loader), the training process handles them.
"""

from __future__ import annotations

import signal
import threading
from collections import deque

import torch
import torch.distributed as dist

from .distributed import DistInfo

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
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

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python's rule for signal.signal
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
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
