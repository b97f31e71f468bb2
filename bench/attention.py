"""SAGAN attention softmax(q k^T) v, E != Ev: our kernels against every PyTorch path.

    python bench/attention.py                 # on the GPU: DESIGN.md shapes, fp32 + bf16, all impls
    python bench/attention.py --quick         # the SAGAN G 32x32 shape + a short map-size sweep
    python bench/attention.py --device cpu    # CPU implementations at small sizes (says so)

Implementations: ``sagan_fast triton`` (fp32 inputs: one row per dot precision, IEEE fp32 by
default, ``tf32x3`` and ``tf32`` tensor-core rows; 16-bit: also ``(deterministic)``, the atomic-free
backward of ``torch.use_deterministic_algorithms(True)``), ``sagan_fast cuda`` (the compiled
extension, when built; on the CPU its C++ path), ``naive bmm+softmax``
(:func:`sagan_fast.ops.reference.sagan_attention`, builds B x N x Nk), compiled FlexAttention
(``torch.compile(flex_attention)``, ``scale=1.0``, Ev != E; it has no backward on the CPU, so its
CPU rows are forward only and say why), and ``F.scaled_dot_product_attention`` pinned to each SDPA
backend with ``sdpa_kernel`` (a backend that refuses the shape, e.g. flash with E != Ev, gets a
row saying so). Unavailable ones are listed with the reason.

Per implementation, shape and dtype: fwd (inputs require grad, as in training), bwd alone
(``autograd.grad`` from a kept graph) and fwd+bwd, each the median of interleaved rounds (every
implementation and mode of a shape runs once per round; ``triton.testing.do_bench`` samples on the
GPU, perf_counter on the CPU) with its p20-p80 spread, flagged NOISY when wide and INCONSISTENT
when fwd + bwd and fwd+bwd disagree; TFLOP/s with fwd = 2 B N Nk (E + Ev) and bwd = 2 B N Nk
(3 E + 2 Ev) (q k^T recomputed, dV, dP, dQ, dK: flash-attention's 2.5x generalized to E != Ev);
peak MiB of forward + backward above the inputs; max relative error of out, dq, dk, dv against
float64 on the same inputs (first few batch items). For our Triton kernels also the FLOP and byte
count of every kernel launch (``sagan_fast.ops.triton.attention.plan_costs``, with the settings
the tuner chose) next to its time from the profiler on a GPU; on a CPU the counts alone, at the
GPU shapes. A PNG plots fwd+bwd time and peak memory against the map size (matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (Report, card_info, consistency_flag, default_device,  # noqa: E402
                          peak_memory_mib, rel_error, say, time_interleaved)
from sagan_fast.ops import reference  # noqa: E402
from sagan_fast.ops._backend import why_unavailable  # noqa: E402
from sagan_fast.ops.attention import OP_ATTENTION  # noqa: E402
from sagan_fast.ops.attention import sagan_attention as dispatch_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# name -> (B, N, Nk, E, Ev), from DESIGN.md.
GPU_SHAPES = {
    "G 32x32 C=256": (64, 1024, 1024, 32, 256),
    "G 32x32 C=256 BigGAN pooled": (64, 1024, 256, 32, 128),
    "D 32x32 C=512": (64, 1024, 1024, 64, 512),
    "G 64x64 C=128": (32, 4096, 4096, 16, 128),
}
# CPU: the same forms at sizes a few-core CPU times in seconds.
CPU_SHAPES = {
    "G 16x16 C=256": (2, 256, 256, 32, 256),
    "G 16x16 C=256 BigGAN pooled": (2, 256, 64, 32, 128),
    "G 32x32 C=128": (1, 1024, 1024, 16, 128),
}
SWEEP_MAPS_GPU = (8, 16, 32, 64)      # map side; C=128 (E=16, Ev=128), B=16
SWEEP_MAPS_CPU = (8, 16, 24)
ERROR_BATCH = 4
FLEX = "FlexAttention (compiled)"


# ------------------------------------------------------------------------------------------------
# Implementations: name -> Impl(f(q, k, v) -> out, why it has no backward here or None)
# ------------------------------------------------------------------------------------------------

class Impl:
    """An implementation: ``fn(q, k, v) -> out``; ``no_backward`` says why it has none here;
    ``deterministic`` runs it (forward and backward) under torch.use_deterministic_algorithms."""

    def __init__(self, fn, no_backward: str | None = None, deterministic: bool = False):
        self.fn, self.no_backward, self.deterministic = fn, no_backward, deterministic

    def __call__(self, q, k, v):
        return self.fn(q, k, v)

    def mode(self):
        return _deterministic() if self.deterministic else contextlib.nullcontext()


class _deterministic:
    """torch.use_deterministic_algorithms(True) within the block (our backward reads it when it runs)."""

    def __enter__(self):
        self.old = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.old[0], warn_only=self.old[1])


def _ours(backend: str, fp32_precision: str | None = None):
    if backend == "triton" and fp32_precision is not None:
        from sagan_fast.ops.triton import attention as tri

        def run(q, k, v):
            return tri.sagan_attention(q, k, v, 1.0, fp32_precision=fp32_precision)
        return run
    return lambda q, k, v: dispatch_attention(q, k, v, backend=backend)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return run


def _flex(device: torch.device) -> Impl:
    """Compiled FlexAttention on (B, 1, N, E) views; one compile per shape (dynamic=False)."""
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        return compiled(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0).squeeze(1)
    no_bwd = "FlexAttention has no backward on the CPU (torch raises NotImplementedError)" \
        if device.type != "cuda" else None
    return Impl(run, no_backward=no_bwd)


def implementations(device: torch.device, dtype: torch.dtype, backends: list[str], flex: bool = True) -> dict:
    impls: dict = {}
    for b in backends:
        if b == "triton" and dtype == torch.float32:
            impls["sagan_fast triton"] = Impl(_ours("triton", fp32_precision="ieee"))
            impls["sagan_fast triton (tf32x3)"] = Impl(_ours("triton", fp32_precision="tf32x3"))
            impls["sagan_fast triton (tf32)"] = Impl(_ours("triton", fp32_precision="tf32"))
        else:
            impls[f"sagan_fast {b}"] = Impl(_ours(b))
            if b == "triton":
                impls["sagan_fast triton (deterministic)"] = Impl(_ours(b), deterministic=True)
    impls["naive bmm+softmax"] = Impl(lambda q, k, v: reference.sagan_attention(q, k, v))
    if flex:
        try:
            impls[FLEX] = _flex(device)
        except ImportError as exc:  # torch without flex_attention
            say(f"skipping {FLEX}: {exc}")
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # old torch: no per-backend pinning
        impls["SDPA (default)"] = Impl(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0))
        return impls
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        if device.type == "cpu" and name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            continue  # CUDA-only
        impls[f"SDPA {name.split('_')[0].lower()}"] = Impl(_sdpa(backend))
    return impls


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------

def make_inputs(shape, dtype, device, seed=0):
    B, N, Nk, E, Ev = shape
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    return rand(B, N, E), rand(B, Nk, E), rand(B, Nk, Ev), rand(B, N, Ev)


def max_error_vs_fp64(fn, q, k, v, dout, forward_only: bool = False) -> float:
    """max over out, dq, dk, dv (out alone if ``forward_only``) of max|x - x64| / max|x64| on the
    first ERROR_BATCH items."""
    sub = [t[:ERROR_BATCH].detach() for t in (q, k, v, dout)]

    def grads(f, dtype):
        leaves = [t.to(dtype).requires_grad_(not forward_only) for t in sub[:3]]
        out = f(*leaves)
        return (out,) if forward_only else (out, *torch.autograd.grad(out, leaves, sub[3].to(out.dtype)))
    ours = grads(fn, q.dtype)
    ref = grads(lambda a, b, c: reference.sagan_attention(a, b, c), torch.float64)
    return max(rel_error(a, r) for a, r in zip(ours, ref))


def flops_fwd(shape) -> float:
    B, N, Nk, E, Ev = shape
    return 2.0 * B * N * Nk * (E + Ev)


def flops_bwd(shape) -> float:
    """q k^T recomputed (E), dV (Ev), dP (Ev), dQ (E), dK (E) per (query, key) pair."""
    B, N, Nk, E, Ev = shape
    return 2.0 * B * N * Nk * (3 * E + 2 * Ev)


def triton_costs(name: str, q, k, v) -> list[dict]:
    """Per launch of our Triton kernels for these inputs: FLOPs and bytes (plan_costs), with the
    tuned settings, for the row ``name`` (its fp32 precision and determinism)."""
    from sagan_fast.ops.triton import attention as tri
    precision = name[name.index("(") + 1:-1] if "(tf32" in name else "ieee"
    deterministic = name.endswith("(deterministic)")
    path = tri.backward_paths(q, k, v, deterministic=deterministic)[0]
    key = tri._tuning_key("bwd-path", q, k, v, precision, path.split("+")[1])
    return tri.plan_costs(q, k, v, backward_path=tri._PATHS.get(key, path), fp32_precision=precision)


def kernel_times_ms(fn, device: torch.device) -> dict[str, float]:
    """Device time per call of each kernel name during ``fn()`` (torch.profiler, mean of 3 calls)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
    times = {}
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None)
        if total is None:
            total = getattr(e, "cuda_time_total", 0.0)
        if total:
            times[e.key] = total / 1e3 / 3   # us over 3 calls -> ms per call
    return times


def bench_group(label, shape, dtype, impls: dict, device, args, report, modes=("fwd", "bwd", "fwd+bwd")):
    """All implementations of one (shape, dtype), their modes timed in the same interleaved rounds."""
    q, k, v, dout = make_inputs(shape, dtype, device)
    base = dict(shape=label, B=shape[0], N=shape[1], Nk=shape[2], E=shape[3], Ev=shape[4],
                dtype=str(dtype).replace("torch.", ""))
    fns, ready = {}, {}
    for name, impl in impls.items():
        backward = impl.no_backward is None
        qi, ki, vi = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        try:
            with impl.mode():
                out = impl(qi, ki, vi)          # also compiles / autotunes outside the timing
                if backward:
                    torch.autograd.grad(out, (qi, ki, vi), dout)
        except Exception as exc:  # a refused shape is a result: say why in the row
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else repr(exc)[:160]
            report.add(**base, impl=name, status=f"refused: {type(exc).__name__}: {msg}")
            say(f"  {name:34s} {base['dtype']}: refused ({type(exc).__name__})")
            continue
        del out
        ready[name] = (impl, qi, ki, vi)

        def fwd(impl=impl, qi=qi, ki=ki, vi=vi):
            with impl.mode():
                return impl(qi, ki, vi)

        def fwd_bwd(impl=impl, qi=qi, ki=ki, vi=vi):
            with impl.mode():
                o = impl(qi, ki, vi)
                return torch.autograd.grad(o, (qi, ki, vi), dout)
        if "fwd" in modes or not backward:
            fns[(name, "fwd")] = fwd
        if backward:
            if "bwd" in modes:
                kept = impl(qi, ki, vi)

                def bwd(kept=kept, qi=qi, ki=ki, vi=vi, impl=impl):
                    with impl.mode():
                        return torch.autograd.grad(kept, (qi, ki, vi), dout, retain_graph=True)
                fns[(name, "bwd")] = bwd
            fns[(name, "fwd+bwd")] = fwd_bwd
    timing = dict(device=device, warmup_ms=10 if args.quick else 25, rep_ms=40 if args.quick else 100,
                  rounds=5, cpu_reps=3 if args.quick else 5)
    times = time_interleaved({f"{n}|{m}": f for (n, m), f in fns.items()}, **timing) if fns else {}
    rows = []
    for name, (impl, qi, ki, vi) in ready.items():
        t = {m: times.get(f"{name}|{m}") for m in ("fwd", "bwd", "fwd+bwd")}
        backward = impl.no_backward is None
        peak = peak_memory_mib(fns.get((name, "fwd+bwd")) or fns[(name, "fwd")], device)
        with impl.mode():
            err = max_error_vs_fp64(impl, q, k, v, dout, forward_only=not backward) if args.errors else None

        def tflops(mode, flop):
            return flop / (t[mode].median_ms * 1e-3) / 1e12 if t.get(mode) else None

        def ms(mode):
            return t[mode].median_ms if t.get(mode) else None
        flags = [f"{m} NOISY" for m, x in t.items() if x is not None and x.noisy]
        inconsistent = consistency_flag(t["fwd"], t["bwd"], t["fwd+bwd"])
        status = "ok" + ("" if backward else f" (forward only: {impl.no_backward})")
        status += "".join(f"; {f}" for f in flags + ([inconsistent] if inconsistent else []))
        row = dict(base, impl=name, fwd_ms=ms("fwd"), bwd_ms=ms("bwd"), fwd_bwd_ms=ms("fwd+bwd"),
                   fwd_spread=_spread(t["fwd"]), bwd_spread=_spread(t["bwd"]),
                   fwd_bwd_spread=_spread(t["fwd+bwd"]),
                   fwd_TFLOPs=tflops("fwd", flops_fwd(shape)), bwd_TFLOPs=tflops("bwd", flops_bwd(shape)),
                   fwd_bwd_TFLOPs=tflops("fwd+bwd", flops_fwd(shape) + flops_bwd(shape)),
                   peak_MiB=peak, rel_err_vs_fp64=err, status=status)
        if name.startswith("sagan_fast triton"):
            row.update(_our_kernels(name, impl, qi, ki, vi, dout, device, base, report))
        report.add(**row)
        rows.append(row)
        say(f"  {name:34s} {base['dtype']}: " + ", ".join(f"{m} {t[m].fmt()}" for m in t if t[m] is not None)
            + (f", peak {peak:.0f} MiB" if peak is not None else "")
            + (f", err {err:.2g}" if err is not None else "")
            + (f" [{inconsistent}]" if inconsistent else ""))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _spread(t) -> str | None:
    return None if t is None else f"{t.p20_ms:.3g}-{t.p80_ms:.3g}"


def _our_kernels(name, impl, q, k, v, dout, device, base, report) -> dict:
    """Adds one "kernel" row per launch of our Triton kernels (FLOPs, bytes, profiled time);
    returns the fwd / bwd totals for the main row."""
    costs = triton_costs(name, q, k, v)

    def fwd_bwd():
        with impl.mode():
            o = impl(q, k, v)
            return torch.autograd.grad(o, (q, k, v), dout)
    times = kernel_times_ms(fwd_bwd, device)
    for c in costs:
        kernel_ms = times.get(c["kernel"].split(" ")[0]) if c["kernel"].startswith("_attn") else None
        report.add(**base, impl=name, kind="kernel", phase=c["phase"], kernel=c["kernel"], config=c["config"],
                   GFLOP=c["flops"] / 1e9, MB=c["bytes"] / 1e6, atomic_MB=c["atomic_bytes"] / 1e6,
                   kernel_ms=kernel_ms,
                   TFLOPs=c["flops"] / (kernel_ms * 1e-3) / 1e12 if kernel_ms else None,
                   GBs=(c["bytes"] + c["atomic_bytes"]) / (kernel_ms * 1e-3) / 1e9 if kernel_ms else None)
    total = {p: [c for c in costs if c["phase"] == p] for p in ("fwd", "bwd")}
    return dict(fwd_GFLOP=sum(c["flops"] for c in total["fwd"]) / 1e9,
                bwd_GFLOP=sum(c["flops"] for c in total["bwd"]) / 1e9,
                fwd_MB=sum(c["bytes"] for c in total["fwd"]) / 1e6,
                bwd_MB=sum(c["bytes"] + c["atomic_bytes"] for c in total["bwd"]) / 1e6,
                bwd_path=total["bwd"][0]["path"] if total["bwd"] else None)


def cost_model_rows(shapes: dict, dtypes: list, report: Report) -> None:
    """Without a GPU: the FLOP / byte counts of our Triton launches at the GPU shapes with the
    default settings (meta tensors), for every backward path, untimed."""
    from sagan_fast.ops.triton import attention as tri
    for label, shape in shapes.items():
        for dtype in dtypes:
            B, N, Nk, E, Ev = shape
            q, k, v = (torch.empty(B, n, c, device="meta", dtype=dtype)
                       for n, c in ((N, E), (Nk, E), (Nk, Ev)))
            for path in tri.backward_paths(q, k, v):
                for c in tri.plan_costs(q, k, v, backward_path=path):
                    if c["phase"] == "fwd" and path != tri.backward_paths(q, k, v)[0]:
                        continue
                    report.add(shape=label, B=B, N=N, Nk=Nk, E=E, Ev=Ev,
                               dtype=str(dtype).replace("torch.", ""), impl="sagan_fast triton (cost model)",
                               kind="kernel", phase=c["phase"],
                               path=c["path"], kernel=c["kernel"], config=c["config"], GFLOP=c["flops"] / 1e9,
                               MB=c["bytes"] / 1e6, atomic_MB=c["atomic_bytes"] / 1e6, kernel_ms=None,
                               status="not timed: no GPU")


def plot(sweep_rows: list[dict], path: Path, card_name: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    rows = [r for r in sweep_rows
            if str(r.get("status", "")).startswith("ok") and r.get("fwd_bwd_ms") is not None]
    if not rows:
        return "plot skipped: no successful sweep rows"
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((math.isqrt(r["N"]), r["fwd_bwd_ms"], r["peak_MiB"]) for r in rows if r["impl"] == impl)
        sides = [p[0] for p in pts]
        ax_t.plot(sides, [p[1] for p in pts], marker="o", label=impl)
        if all(p[2] is not None for p in pts):
            ax_m.plot(sides, [p[2] for p in pts], marker="o", label=impl)
    for ax, ylabel in ((ax_t, "fwd+bwd median ms"), (ax_m, "peak MiB (fwd+bwd)")):
        ax.set_xlabel("map side (N = side^2 tokens, Nk = N)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    if not ax_m.lines:
        ax_m.text(0.5, 0.5, "peak memory is measured on CUDA devices only", ha="center",
                  transform=ax_m.transAxes)
    r0 = rows[0]
    ax_t.legend(fontsize=7)
    fig.suptitle(f"SAGAN attention, B={r0['B']}, E={r0['E']}, Ev={r0['Ev']}, {r0['dtype']}, on {card_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the G 32x32 shape and a short sweep, short timing")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtypes", default=None, help="comma-separated from fp32,bf16,fp16 "
                        "(default: fp32,bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--backends", default="triton,cuda",
                        help="our backends to include (the unavailable ones are skipped, with the reason)")
    parser.add_argument("--no-flex", dest="flex", action="store_false",
                        help="skip compiled FlexAttention (~40 s of compilation per shape on a CPU)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the map-size sweep")
    parser.add_argument("--no-errors", dest="errors", action="store_false", help="skip the fp64 error check")
    parser.add_argument("--json", default=None, help="output path (default: bench/results/...)")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        # Baselines as PyTorch ships them: TF32 off for fp32 matmuls (our TF32 rows say so).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp32,bf16" if on_gpu else "fp32")).split(",")]
    shapes = dict(GPU_SHAPES if on_gpu else CPU_SHAPES)
    if args.quick:
        shapes = dict(list(shapes.items())[:1])
    sweep = SWEEP_MAPS_GPU if on_gpu else SWEEP_MAPS_CPU
    if args.quick:
        sweep = sweep[1:3] if on_gpu else sweep[:2]
    card = card_info(device)
    report = Report("attention", card, dict(vars(args), device=str(device)))
    if not on_gpu:
        say("NOTE: no GPU: CPU implementations at small sizes; CPU numbers, not comparable with the GPU "
            "targets (the Triton kernels need a GPU; the interpreter is not timed)")
    say(f"attention benchmark on {card['name']}")

    backends = []
    for b in args.backends.split(","):
        reason = why_unavailable(b, device, OP_ATTENTION)
        if b == "triton" and device.type == "cpu":
            reason = reason or "the Triton interpreter is a correctness tool, not timed"
        if reason:
            say(f"skipping backend {b}: {reason}")
            report.args.setdefault("skipped", {})[b] = reason
        else:
            backends.append(b)

    for dtype in dtypes:
        for label, shape in shapes.items():
            say(f"{label} {tuple(shape)} {dtype}")
            impls = implementations(device, dtype, backends, args.flex)
            bench_group(label, shape, dtype, impls, device, args, report)
    if not on_gpu and "triton" in args.backends.split(","):
        gpu_shapes = dict(list(GPU_SHAPES.items())[:1]) if args.quick else GPU_SHAPES
        cost_model_rows(gpu_shapes, [torch.bfloat16, torch.float32], report)

    sweep_rows = []
    if args.sweep:
        sweep_dtype = torch.bfloat16 if on_gpu and torch.bfloat16 in dtypes else dtypes[0]
        for side in sweep:
            n = side * side
            shape = (16 if on_gpu else 2, n, n, 16, 128)
            label = f"sweep {side}x{side} C=128"
            say(f"{label} {shape} {sweep_dtype}")
            # --quick: FlexAttention at the main shapes only (each sweep size is a compilation).
            impls = {name: impl for name, impl in implementations(device, sweep_dtype, backends,
                                                                  args.flex and not args.quick).items()
                     if not name.endswith(("(tf32)", "(tf32x3)", "(deterministic)"))}
            sweep_rows += [r for r in bench_group(label, shape, sweep_dtype, impls, device, args, report,
                                                  modes=()) if r.get("fwd_bwd_ms") is not None]

    main_rows = Report(report.benchmark, report.card, report.args,
                       [r for r in report.rows if r.get("kind") != "kernel"])
    kernel_rows = Report("attention kernels", report.card, report.args,
                         [r for r in report.rows if r.get("kind") == "kernel"])
    columns = ["shape", "impl", "dtype", "fwd_ms", "fwd_spread", "bwd_ms", "bwd_spread", "fwd_bwd_ms",
               "fwd_bwd_spread", "fwd_TFLOPs", "bwd_TFLOPs", "fwd_bwd_TFLOPs", "fwd_GFLOP", "bwd_GFLOP",
               "fwd_MB", "bwd_MB", "peak_MiB", "rel_err_vs_fp64", "status"]
    table = main_rows.markdown(columns)
    if kernel_rows.rows:
        table += "\n\n" + kernel_rows.markdown(["shape", "dtype", "impl", "phase", "path", "kernel", "config",
                                                 "GFLOP", "MB", "atomic_MB", "kernel_ms", "TFLOPs", "GBs",
                                                 "status"])
    notes = ("\n\nms: median of interleaved rounds, spread p20-p80 (NOISY: (p80 - p20) / median above "
             "bench.common.NOISY_SPREAD; INCONSISTENT: fwd + bwd timed apart vs fwd+bwd differ by > 50%); "
             "TFLOP/s with fwd = 2 B N Nk (E + Ev), bwd = 2 B N Nk (3 E + 2 Ev); GFLOP / MB: our launches' "
             "own counts (MB: global loads + stores of all programs, L2 serves repeats); peak MiB: forward + "
             "backward above the inputs; rel_err: max over out, dq, dk, dv of max|x - x64| / max|x64| on the "
             f"first {ERROR_BATCH} batch items. fp32 rows use IEEE fp32 dots except '(tf32x3)' and '(tf32)'. "
             "Sweep rows: fwd+bwd only.")
    if not on_gpu:
        notes += " CPU run: CPU implementations only, small sizes, not comparable with the GPU targets."
    path = report.save_json(args.json)
    plot_msg = (plot(sweep_rows, path.with_suffix(".png"), card["name"]) if sweep_rows
                else "plot skipped: no sweep")
    notes += f" {plot_msg}."
    print(table + notes)
    path.with_suffix(".md").write_text(table + notes + "\n")
    say(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
