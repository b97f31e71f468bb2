"""Run logging: step statistics summed on the device (:class:`ScalarMeter`), and on rank 0
TensorBoard scalars, a JSONL file (one object per log step), a tqdm bar (:class:`RunLogger`).

Other ranks get a logger that does nothing, so the loop calls it unconditionally.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

if TYPE_CHECKING:
    import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _step_of(line: str) -> float:
    """The step of a JSONL record; +inf for a line a killed run left unfinished (dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def note(text: str, warning: bool = False) -> None:
    """A line for the user, before (or without) a :class:`RunLogger`: on stdout, a warning on stderr
    (errors and warnings only there, so a script can tell them apart); callers pick the rank."""
    print(text, file=sys.stderr if warning else sys.stdout, flush=True)


class RunLogger:
    """Scalars to ``<out>/tensorboard`` and ``<out>/metrics.jsonl``; progress to stderr.

    On resume from ``start_step`` the JSONL lines and TensorBoard events past it (written after the
    checkpoint by the interrupted run) are dropped, so each step is logged once.
    """

    def __init__(self, out: str | Path, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True) -> None:
        self.enabled = enabled
        self._writer = self._bar = self._jsonl = None
        if not enabled:
            return
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / METRICS_FILE
        if path.exists():  # keep only lines up to the resume point (and no half-written line)
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, desc="train")

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write ``scalars`` (plain floats) for ``step``; non-finite values are written as null."""
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if math.isfinite(v) else None) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for k, v in scalars.items():
            self._writer.add_scalar(k, v, step)
        if self._bar is not None:
            shown = {k: f"{scalars[k]:.3f}" for k in ("loss_d", "loss_g") if k in scalars}
            self._bar.set_postfix(shown, refresh=False)

    def image(self, tag: str, image: "np.ndarray", step: int) -> None:
        """An (H, W, C) uint8 image (a sample grid) to TensorBoard's image tab."""
        if self.enabled:
            self._writer.add_image(tag, image, step, dataformats="HWC")

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str, warning: bool = False) -> None:
        """A line for the user (through tqdm so it does not break the bar): on stdout, a warning on
        stderr."""
        if not self.enabled:
            return
        file = sys.stderr if warning else sys.stdout
        if self._bar is not None:
            self._bar.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._writer = self._bar = self._jsonl = None


class ScalarMeter:
    """Sums each step's statistics on the device; reads them back (one sync) only when logging."""

    def __init__(self, names: Sequence[str], device: torch.device, step: int) -> None:
        self.names = tuple(names)
        self.sums = torch.zeros(len(self.names), device=device)
        self.count, self.t0, self.step0 = 0, time.perf_counter(), step

    def add(self, stats: Mapping[str, torch.Tensor]) -> None:
        self.sums += torch.stack([stats[name] for name in self.names])
        self.count += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, say) out of the current interval's images/s."""
        self.t0 += seconds

    def peek(self) -> dict[str, float]:
        """Means since the last read, without starting a new interval (one sync)."""
        return dict(zip(self.names, (self.sums / max(self.count, 1)).tolist()))

    def read(self, step: int, images_per_step: int) -> dict[str, float]:
        """Means since the last read, and ``images_per_s`` over that time."""
        means = (self.sums / max(self.count, 1)).tolist()
        now = time.perf_counter()
        out = dict(zip(self.names, means))
        out["images_per_s"] = (step - self.step0) * images_per_step / max(now - self.t0, 1e-9)
        self.sums.zero_()
        self.count, self.t0, self.step0 = 0, now, step
        return out
