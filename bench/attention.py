"""SAGAN attention softmax(q k^T) v, E != Ev: our kernels against every PyTorch path.

    python bench/attention.py                 # on the GPU: DESIGN.md shapes, fp32 + bf16, all impls
    python bench/attention.py --quick         # the SAGAN G 32x32 shape + a short map-size sweep
    python bench/attention.py --device cpu    # CPU implementations at small sizes (says so)

Implementations: ``sagan_fast triton`` (fp32 inputs: one row per dot precision, IEEE fp32 by
default, ``tf32x3`` and ``tf32`` tensor-core rows), ``sagan_fast cuda`` (the compiled extension,
when built; on the CPU its C++ path),
``naive bmm+softmax`` (:func:`sagan_fast.ops.reference.sagan_attention`, builds B x N x Nk), and
``F.scaled_dot_product_attention`` pinned to each SDPA backend with ``sdpa_kernel`` (a backend that
refuses the shape, e.g. flash with E != Ev, gets a row saying so). Unavailable ones are listed
with the reason.

Per implementation, shape and dtype: median ms (``triton.testing.do_bench`` on the GPU,
perf_counter on the CPU) of the forward (inputs require grad, as in training), the backward alone
(``autograd.grad`` from a kept graph) and both; TFLOP/s with forward = 2 B N Nk (E + Ev) and
backward = 2.5 x forward (flash-attention's convention, recomputation included); peak MiB of
forward + backward above the inputs; max relative error of out, dq, dk, dv against float64 on the
same inputs (computed on the first few batch items: attention is independent per item).
A PNG plots fwd+bwd time and peak memory against the map size (matplotlib, when importable).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (Report, card_info, default_device, peak_memory_mib, rel_error,  # noqa: E402
                          say, time_fn)
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


# ------------------------------------------------------------------------------------------------
# Implementations: name -> f(q, k, v) -> out
# ------------------------------------------------------------------------------------------------

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


def implementations(device: torch.device, dtype: torch.dtype, backends: list[str]) -> dict:
    impls: dict = {}
    for b in backends:
        if b == "triton" and dtype == torch.float32:
            impls["sagan_fast triton"] = _ours("triton", fp32_precision="ieee")
            impls["sagan_fast triton (tf32x3)"] = _ours("triton", fp32_precision="tf32x3")
            impls["sagan_fast triton (tf32)"] = _ours("triton", fp32_precision="tf32")
        else:
            impls[f"sagan_fast {b}"] = _ours(b)
    impls["naive bmm+softmax"] = lambda q, k, v: reference.sagan_attention(q, k, v)
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # old torch: no per-backend pinning
        impls["SDPA (default)"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return impls
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        if device.type == "cpu" and name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            continue  # CUDA-only
        impls[f"SDPA {name.split('_')[0].lower()}"] = _sdpa(backend)
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


def max_error_vs_fp64(fn, q, k, v, dout) -> float:
    """max over out, dq, dk, dv of max|x - x64| / max|x64| on the first ERROR_BATCH items."""
    sub = [t[:ERROR_BATCH].detach() for t in (q, k, v, dout)]

    def grads(f, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in sub[:3]]
        out = f(*leaves)
        return (out, *torch.autograd.grad(out, leaves, sub[3].to(out.dtype)))
    ours = grads(fn, q.dtype)
    ref = grads(lambda a, b, c: reference.sagan_attention(a, b, c), torch.float64)
    return max(rel_error(a, r) for a, r in zip(ours, ref))


def flops_fwd(shape) -> float:
    B, N, Nk, E, Ev = shape
    return 2.0 * B * N * Nk * (E + Ev)


def bench_one(name, fn, shape, dtype, device, args, report, label, modes=("fwd", "bwd", "fwd+bwd")):
    q, k, v, dout = make_inputs(shape, dtype, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    row = dict(shape=label, B=shape[0], N=shape[1], Nk=shape[2], E=shape[3], Ev=shape[4],
               impl=name, dtype=str(dtype).replace("torch.", ""))
    try:
        out = fn(q, k, v)          # also compiles / autotunes outside the timing
        torch.autograd.grad(out, (q, k, v), dout)
    except Exception as exc:  # a refused shape is a result: say why in the row
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else repr(exc)[:160]
        report.add(**row, status=f"refused: {type(exc).__name__}: {msg}")
        say(f"  {name:26s} {row['dtype']}: refused ({type(exc).__name__})")
        return None
    del out
    timing = dict(device=device, warmup_ms=10 if args.quick else 25, rep_ms=40 if args.quick else 100,
                  cpu_reps=3 if args.quick else 5)

    def fwd():
        return fn(q, k, v)

    def fwd_bwd():
        o = fn(q, k, v)
        return torch.autograd.grad(o, (q, k, v), dout)

    result = {}
    if "fwd" in modes:
        result["fwd"] = time_fn(fwd, **timing)
    if "bwd" in modes:
        kept = fn(q, k, v)
        result["bwd"] = time_fn(lambda: torch.autograd.grad(kept, (q, k, v), dout, retain_graph=True),
                                **timing)
        del kept
    result["fwd+bwd"] = time_fn(fwd_bwd, **timing)
    peak = peak_memory_mib(fwd_bwd, device)
    err = max_error_vs_fp64(fn, q, k, v, dout) if args.errors else None
    f = flops_fwd(shape)

    def tflops(mode, flop):
        return flop / (result[mode].median_ms * 1e-3) / 1e12 if mode in result else None
    row.update(
        fwd_ms=result["fwd"].median_ms if "fwd" in result else None,
        bwd_ms=result["bwd"].median_ms if "bwd" in result else None,
        fwd_bwd_ms=result["fwd+bwd"].median_ms,
        fwd_TFLOPs=tflops("fwd", f), bwd_TFLOPs=tflops("bwd", 2.5 * f),
        fwd_bwd_TFLOPs=tflops("fwd+bwd", 3.5 * f),
        peak_MiB=peak, rel_err_vs_fp64=err,
        fwd_bwd_p20_p80=f"{result['fwd+bwd'].p20_ms:.3g}-{result['fwd+bwd'].p80_ms:.3g}", status="ok")
    report.add(**row)
    say(f"  {name:26s} {row['dtype']}: fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
        + (f", fwd {row['fwd_ms']:.3f}" if row["fwd_ms"] is not None else "")
        + (f", peak {peak:.0f} MiB" if peak is not None else "")
        + (f", err {err:.2g}" if err is not None else ""))
    return row


def plot(sweep_rows: list[dict], path: Path, card_name: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    rows = [r for r in sweep_rows if r.get("status") == "ok"]
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
            for name, fn in implementations(device, dtype, backends).items():
                bench_one(name, fn, shape, dtype, device, args, report, label)
                if on_gpu:
                    torch.cuda.empty_cache()

    sweep_rows = []
    if args.sweep:
        sweep_dtype = torch.bfloat16 if on_gpu and torch.bfloat16 in dtypes else dtypes[0]
        for side in sweep:
            n = side * side
            shape = (16 if on_gpu else 2, n, n, 16, 128)
            label = f"sweep {side}x{side} C=128"
            say(f"{label} {shape} {sweep_dtype}")
            for name, fn in implementations(device, sweep_dtype, backends).items():
                if name.endswith(("(tf32)", "(tf32x3)")):
                    continue
                row = bench_one(name, fn, shape, sweep_dtype, device, args, report, label, modes=())
                if row is not None:
                    sweep_rows.append(row)
                if on_gpu:
                    torch.cuda.empty_cache()

    columns = ["shape", "impl", "dtype", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_TFLOPs", "bwd_TFLOPs",
               "fwd_bwd_TFLOPs", "peak_MiB", "rel_err_vs_fp64", "status"]
    table = report.markdown(columns)
    notes = ("\n\nms: median; TFLOP/s with fwd = 2 B N Nk (E + Ev), bwd = 2.5 x fwd; peak MiB: forward + "
             "backward above the inputs; rel_err: max over out, dq, dk, dv of max|x - x64| / max|x64| on the "
             f"first {ERROR_BATCH} batch items. fp32 rows use IEEE fp32 dots except '(tf32x3)' and "
             "'(tf32)'. Sweep rows: fwd+bwd only.")
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
