"""What every benchmark script shares: timing, memory, the card's identity, JSON and markdown output.

GPU timings use ``triton.testing.do_bench`` (median with 0.2 / 0.8 quantiles, L2 flushed between
runs). On a machine with no GPU the CPU fallback times with ``time.perf_counter`` (median of
repeats) and every report says that the numbers are CPU numbers.
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


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup_ms: float = 25,
            rep_ms: float = 100, cpu_reps: int = 5) -> Timing:
    """Median (and 20/80 % quantiles) of ``fn()`` in milliseconds on ``device``."""
    if device.type == "cuda":
        from triton.testing import do_bench
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(*map(float, q))
    fn()  # warm-up (allocations, lazy init)
    samples = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) >= 2 else [samples[0]] * 4
    return Timing(statistics.median(samples), q[0], q[3])


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
