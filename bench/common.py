"""What every benchmark script shares: timing, memory, the card's identity, JSON and markdown output.

Timing (:func:`time_interleaved`, and :func:`time_fn` for one function): every figure is the
median of repeats taken in interleaved rounds (each round runs every function once, in a rotated
order), with its 20 / 80 % quantiles and a ``noisy`` flag when (p80 - p20) / median passes
NOISY_SPREAD, so a load change on the machine hits all functions alike instead of one of them.
On a GPU each round's sample is ``triton.testing.do_bench`` (L2 flushed, its own repeats); on a
machine with no GPU ``time.perf_counter`` around one call, and every report says that the numbers
are CPU numbers. :func:`consistency_flag` says when a fwd + bwd figure disagrees with fwd and
bwd timed apart (the self-contradictory rows of a noisy shared CPU).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# (p80 - p20) / median above which a figure is flagged noisy.
NOISY_SPREAD = {"cuda": 0.10, "cpu": 0.25}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int = 0
    noisy: bool = False

    @property
    def spread(self) -> float:
        """(p80 - p20) / median."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def fmt(self) -> str:
        """'1.23 ms [1.2-1.3]' with ' NOISY' when flagged."""
        text = f"{self.median_ms:.4g} ms [{self.p20_ms:.3g}-{self.p80_ms:.3g}]"
        return text + (" NOISY" if self.noisy else "")


def _timing(samples: list[float], device: torch.device) -> Timing:
    samples = sorted(samples)
    # "inclusive": quantiles within the samples (the default "exclusive" method extrapolates past
    # the smallest / largest of a few samples: a p20 below zero from 3 CPU samples).
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) >= 2 else [samples[0]] * 4
    t = Timing(statistics.median(samples), q[0], q[3], len(samples))
    t.noisy = t.spread > NOISY_SPREAD.get(device.type, 0.25)
    return t


def time_interleaved(fns: dict[str, Callable[[], object]], *, device: torch.device, warmup_ms: float = 25,
                     rep_ms: float = 100, rounds: int = 5, cpu_reps: int | None = None) -> dict[str, Timing]:
    """Median and 20 / 80 % quantiles (ms) of each function, from ``rounds`` interleaved rounds.

    GPU: each round gives each function ``rep_ms / rounds`` of do_bench repeats (all kept as
    samples) after one ``warmup_ms`` warm-up per function. CPU: one call per function per round
    (``cpu_reps`` rounds if given), after one warm-up call each.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    if device.type == "cuda":
        from triton.testing import do_bench
        for n in names:
            do_bench(fns[n], warmup=warmup_ms, rep=1)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                got = do_bench(fns[n], warmup=0, rep=max(1.0, rep_ms / rounds), return_mode="all")
                samples[n] += [float(x) for x in got]
        return {n: _timing(samples[n], device) for n in names}
    for n in names:
        fns[n]()  # warm-up (allocations, lazy init)
    for r in range(cpu_reps or rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: _timing(samples[n], device) for n in names}


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup_ms: float = 25,
            rep_ms: float = 100, cpu_reps: int = 5) -> Timing:
    """Median (and 20/80 % quantiles, noisy flag) of ``fn()`` in milliseconds on ``device``."""
    return time_interleaved({"fn": fn}, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                            cpu_reps=cpu_reps)["fn"]


def consistency_flag(fwd: Timing | None, bwd: Timing | None, fwd_bwd: Timing | None, tolerance: float = 0.5,
                     names: tuple[str, str, str] = ("fwd", "bwd", "fwd+bwd")) -> str | None:
    """A note when fwd + bwd (timed apart) and fwd+bwd (timed together) differ by more than
    ``tolerance`` of the larger, else None. ``names``: how the three figures are called."""
    if fwd is None or bwd is None or fwd_bwd is None:
        return None
    parts, whole = fwd.median_ms + bwd.median_ms, fwd_bwd.median_ms
    if abs(parts - whole) > tolerance * max(parts, whole):
        return f"INCONSISTENT: {names[0]} + {names[1]} = {parts:.3g} ms vs {names[2]} {whole:.3g} ms"
    return None


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated while running ``fn`` once, above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def count_kernel_launches(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device kernels launched by one call of ``fn`` (torch.profiler); None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def card_info(device: torch.device) -> dict:
    """Name, clocks, driver and memory of the card (nvidia-ml-py), plus library versions."""
    info: dict = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # triton is optional for the reference path
        info["triton"] = None
    if device.type != "cuda":
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        info["note"] = "no GPU: CPU numbers, not comparable with GPU targets"
        return info
    info["name"] = torch.cuda.get_device_name(device)
    info["cuda"] = torch.version.cuda
    try:
        import pynvml
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        info["name"] = name.decode() if isinstance(name, bytes) else name
        drv = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        info["sm_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
        info["mem_clock_mhz"] = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)
        info["max_sm_clock_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
        info["memory_total_mib"] = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**20
        info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000
    except Exception as exc:  # nvml missing or restricted: keep the torch-side name
        info["nvml_error"] = repr(exc)
    return info


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Report:
    """Rows of one benchmark run, with the card they were measured on."""
    benchmark: str
    card: dict
    args: dict
    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def markdown(self, columns: list[str] | None = None) -> str:
        if not self.rows:
            return "(no rows)"
        columns = columns or list(dict.fromkeys(k for r in self.rows for k in r))

        def fmt(x):
            if x is None:
                return ""
            if isinstance(x, float):
                return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e5 else f"{x:.3f}".rstrip("0").rstrip(".")
            return str(x)
        lines = [f"{self.benchmark} on {self.card.get('name')} (torch {self.card.get('torch')}, "
                 f"triton {self.card.get('triton')}, driver {self.card.get('driver', '-')})", "",
                 "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in self.rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
        return "\n".join(lines)

    def save_json(self, path: str | os.PathLike | None = None) -> Path:
        if path is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            card = "".join(ch if ch.isalnum() else "_" for ch in str(self.card.get("name", "cpu")))[:40]
            path = RESULTS_DIR / f"{self.benchmark}-{card}-{stamp}.json"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        return path


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|, in float64."""
    a, r = actual.detach().double(), reference.detach().double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-300)).item()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
