"""Spectral norm of every SN layer of a SAGAN-128 G+D: torch's parametrization against ours.

    python bench/spectral_norm.py            # on the GPU: fp32 and bf16, every available backend
    python bench/spectral_norm.py --quick    # shorter timing
    python bench/spectral_norm.py --device cpu   # CPU numbers (small ch by default), says so

The layers are the SN weights of ``Generator(128, ch)`` + ``Discriminator(128, ch)`` (listed with
``sagan_fast.nn.spectral_norm_layers`` on models built on the meta device, so nothing is
initialized twice); each implementation gets its own copies of those weights, with the same seed.

What is timed, per implementation:
- forward: one training-mode evaluation of every weight (power iteration + W / sigma), as a
  training step pays it once per weight update. Torch: ``module.weight`` for every layer. Ours:
  ``update_spectral_norms(force=True)`` (the multi-tensor power iteration, no sigma check sync)
  then ``module.weight`` for every layer (per-layer W / sigma) or, for "triton+fused", every
  W / sigma in one call (what ``fuse_spectral_norms`` does in eager mode); also split into parts.
- backward: dL/dW for every layer from random dL/dW_sn (``torch.autograd.backward``).

Also: kernel launches (torch.profiler), peak memory, the error of W_sn against float64 from the
same start, and GB/s for a nominal 4 x weight bytes each way (forward: two reads for the power
iteration, a read and a write for W / sigma; backward: G twice, W once, dW written), next to the
card's copy bandwidth measured in the same run on a buffer of the same size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (Report, card_info, count_kernel_launches, default_device,  # noqa: E402
                          peak_memory_mib, rel_error, say, time_fn)
from sagan_fast.nn.spectral_norm import spectral_norm, spectral_norm_layers, update_spectral_norms  # noqa: E402
from sagan_fast.ops import reference  # noqa: E402
from sagan_fast.ops._backend import why_unavailable  # noqa: E402
from sagan_fast.ops.spectral_norm import (OP_NORMALIZE, OP_POWER_ITERATION,  # noqa: E402
                                          spectral_norm_normalize_multi)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sagan_sn_layers(resolution: int, ch: int, n_classes: int) -> list[tuple[tuple[int, ...], int]]:
    """(shape, SN dim) of every SN weight of the SAGAN G + D, from the real models (meta device)."""
    from sagan_fast.models import Discriminator, Generator
    with torch.device("meta"):
        g = Generator(resolution=resolution, ch=ch, n_classes=n_classes, sn_backend="reference")
        d = Discriminator(resolution=resolution, ch=ch, n_classes=n_classes, sn_backend="reference")
    return [(tuple(w.shape), sn.dim) for model in (g, d) for sn, w in spectral_norm_layers(model)]


class _Holder(nn.Module):
    """A bare module owning one weight, to carry a spectral-norm parametrization."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def build(impl: str, specs, device, dtype, seed: int = 0) -> nn.ModuleList:
    """One holder per layer; ``impl`` is "torch" or one of our backends."""
    torch.manual_seed(seed)
    holders = []
    for shape, dim in specs:
        w = (torch.randn(shape, device=device, dtype=torch.float32) * 0.05).to(dtype)
        h = _Holder(w)
        if impl == "torch":
            nn.utils.parametrizations.spectral_norm(h, dim=dim)
        else:
            spectral_norm(h, dim=dim, backend=impl)
        holders.append(h)
    return nn.ModuleList(holders).train()


def snapshot(model: nn.ModuleList, specs):
    """float64 copies of (weight, u, v) to compute the expected first evaluation."""
    out = []
    for h, (_, dim) in zip(model, specs):
        p = h.parametrizations.weight
        out.append((p.original.detach().double(), p[0]._u.double(), p[0]._v.double(), dim))
    return out


def expected_w_sn(state) -> list[torch.Tensor]:
    return [reference.spectral_norm(w, u, v, dim=dim)[0] for w, u, v, dim in state]


def run_impl(impl, specs, device, dtype, args, copy_gbps, weight_bytes, report):
    """``impl``: "torch", a backend name (per-layer W / sigma), or "<backend>+fused" (all layers'
    W / sigma in one call, as ``fuse_spectral_norms`` does in eager mode)."""
    backend, fused = impl.split("+")[0], impl.endswith("+fused")
    model = build(backend, specs, device, dtype)
    state = snapshot(model, specs)
    ours = impl != "torch"
    layers = [h.parametrizations.weight for h in model]

    def power_iteration():
        update_spectral_norms(model, force=True, check_finite=False)

    def normalize():
        if fused:
            return spectral_norm_normalize_multi(
                [p.original for p in layers], [p[0]._u for p in layers], [p[0]._v for p in layers],
                [p[0]._sigma for p in layers], [p[0].dim for p in layers], backend=backend)
        return [h.weight for h in model]

    def forward():
        if ours:
            power_iteration()
        return normalize()

    first = forward()
    err = max(rel_error(a, b) for a, b in zip(first, expected_w_sn(state)))
    del first, state
    timing = dict(device=device, warmup_ms=10 if args.quick else 25, rep_ms=50 if args.quick else 200,
                  cpu_reps=3 if args.quick else 5)
    t_fwd = time_fn(forward, **timing)
    fwd_launches = count_kernel_launches(forward, device)
    fwd_peak = peak_memory_mib(forward, device)
    t_pi = time_fn(power_iteration, **timing) if ours else None
    t_norm = time_fn(normalize, **timing) if ours else None

    # The graph timed in backward must be built after the last update: u, v are saved for backward
    # (as in training, where the update follows the optimizer step, after the last backward).
    outs = forward()
    grads = [torch.randn_like(o) for o in outs]

    def backward():
        torch.autograd.backward(outs, grads, retain_graph=True)

    t_bwd = time_fn(backward, **timing)
    bwd_launches = count_kernel_launches(backward, device)
    del outs, grads
    nominal = 4 * weight_bytes

    def gbps(ms):
        return nominal / (ms * 1e-3) / 1e9

    report.add(impl="torch parametrization" if impl == "torch" else f"sagan_fast {impl}",
               dtype=str(dtype).replace("torch.", ""),
               fwd_ms=t_fwd.median_ms, bwd_ms=t_bwd.median_ms,
               power_iter_ms=t_pi.median_ms if t_pi else None, normalize_ms=t_norm.median_ms if t_norm else None,
               fwd_launches=fwd_launches, bwd_launches=bwd_launches,
               fwd_GBps=gbps(t_fwd.median_ms), bwd_GBps=gbps(t_bwd.median_ms),
               fwd_pct_of_copy=100 * gbps(t_fwd.median_ms) / copy_gbps,
               bwd_pct_of_copy=100 * gbps(t_bwd.median_ms) / copy_gbps,
               fwd_peak_MiB=fwd_peak,
               w_sn_rel_err_vs_fp64=err,
               fwd_p20_p80=f"{t_fwd.p20_ms:.3g}-{t_fwd.p80_ms:.3g}",
               bwd_p20_p80=f"{t_bwd.p20_ms:.3g}-{t_bwd.p80_ms:.3g}")
    say(f"  {impl:9s} {dtype}: fwd {t_fwd.median_ms:.3f} ms, bwd {t_bwd.median_ms:.3f} ms, err {err:.2g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtypes", default=None, help="comma-separated from fp32,bf16,fp16 "
                        "(default: fp32,bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--backends", default="reference,triton,cuda",
                        help="ours to compare with torch (the unavailable ones are skipped, with the reason)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--ch", type=int, default=None, help="channel multiplier (default 64 on GPU, 8 on CPU)")
    parser.add_argument("--n-classes", type=int, default=1000)
    parser.add_argument("--json", default=None, help="output path (default: bench/results/...)")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    ch = args.ch or (64 if on_gpu else 8)
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp32,bf16" if on_gpu else "fp32")).split(",")]
    specs = sagan_sn_layers(args.resolution, ch, args.n_classes)
    numel = sum(torch.Size(s).numel() for s, _ in specs)
    card = card_info(device)
    report = Report("spectral_norm", card, dict(vars(args), ch=ch, layers=len(specs), weights=numel,
                                                 device=str(device)))
    if not on_gpu:
        say(f"NOTE: no GPU: CPU numbers at ch={ch}, not comparable with the GPU targets")
    say(f"SAGAN-{args.resolution} G+D, ch={ch}: {len(specs)} SN layers, {numel / 1e6:.2f} M weights, on {card['name']}")

    backends = []
    for b in args.backends.split(","):
        reason = why_unavailable(b, device, OP_POWER_ITERATION) or why_unavailable(b, device, OP_NORMALIZE)
        if reason:
            say(f"skipping backend {b}: {reason}")
            report.args.setdefault("skipped", {})[b] = reason
        else:
            backends.append(b)

    for dtype in dtypes:
        weight_bytes = numel * torch.empty((), dtype=dtype).element_size()
        src = torch.empty(numel, device=device, dtype=dtype).normal_()
        dst = torch.empty_like(src)
        t_copy = time_fn(lambda: dst.copy_(src), device=device)
        copy_gbps = 2 * weight_bytes / (t_copy.median_ms * 1e-3) / 1e9
        del src, dst
        report.add(impl="copy of the same bytes (on the device)", dtype=str(dtype).replace("torch.", ""),
                   fwd_ms=t_copy.median_ms, fwd_GBps=copy_gbps)
        say(f"  copy {dtype}: {copy_gbps:.0f} GB/s")
        impls = ["torch", *backends] + (["triton+fused"] if "triton" in backends else [])
        for impl in impls:
            try:
                run_impl(impl, specs, device, dtype, args, copy_gbps, weight_bytes, report)
            except Exception as exc:  # one broken backend must not hide the others' numbers
                say(f"  {impl} {dtype} FAILED: {exc!r}")
                report.add(impl=f"sagan_fast {impl}", dtype=str(dtype).replace("torch.", ""),
                           error=repr(exc)[:300])
            if on_gpu:
                torch.cuda.empty_cache()

    columns = ["impl", "dtype", "fwd_ms", "bwd_ms", "power_iter_ms", "normalize_ms", "fwd_launches",
               "bwd_launches", "fwd_GBps", "bwd_GBps", "fwd_pct_of_copy", "bwd_pct_of_copy",
               "fwd_peak_MiB", "w_sn_rel_err_vs_fp64", "error"]
    table = report.markdown(columns)
    notes = (f"\n\n{len(specs)} SN layers of SAGAN-{args.resolution} G+D (ch={ch}, n_classes={args.n_classes}), "
             f"{numel / 1e6:.2f} M weights. fwd = power iteration + W/sigma for every layer; GB/s for "
             "4 x weight bytes; copy = device-to-device copy of the weight bytes (read + write)."
             + ("" if on_gpu else " CPU run: not comparable with the GPU targets."))
    print(table + notes)
    path = report.save_json(args.json)
    path.with_suffix(".md").write_text(table + notes + "\n")
    say(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
