"""Spectral norm: speed of every SN layer of a SAGAN-128 G+D (torch's parametrization against ours),
the update table (does every optimizer's step get its power iteration?), and the host cost of the
optimizer hook.

    python bench/spectral_norm.py                  # timing; on the GPU: fp32, fp32 + bf16 autocast, bf16
    python bench/spectral_norm.py --quick          # shorter timing
    python bench/spectral_norm.py --device cpu     # CPU numbers (small ch by default), says so
    python bench/spectral_norm.py --update-table   # optimizer form x backend: sigma of W_sn after 50 steps
    python bench/spectral_norm.py --hook-cost      # host microseconds the SN optimizer hook adds per step
    python bench/spectral_norm.py --traffic        # launches and bytes per phase of the triton path (no GPU)

Timing. The layers are the SN weights of ``Generator(128, ch)`` + ``Discriminator(128, ch)``
(listed with ``sagan_fast.nn.spectral_norm_layers`` on models built on the meta device, so nothing
is initialized twice); each implementation gets its own copies of those weights, with the same
seed (a unit rank-one part plus noise, so the top singular value is well separated and the timed
path can be checked to normalize). What is timed, per implementation:

- forward: one training-mode evaluation of every weight (power iteration + W / sigma), as a
  training step pays it once per weight update. Torch: ``module.weight`` for every layer. Ours:
  ``update_spectral_norms(force=True)`` (the multi-tensor power iteration, no sigma check sync)
  then ``module.weight`` for every layer (per-layer W / sigma) or, for "triton+fused", the model
  forward of ``fuse_spectral_norms`` (every W / sigma in one call); also split into parts.
- backward: dL/dW for every layer from random dL/dW_sn (``torch.autograd.backward``).

Every figure is the median of interleaved rounds (``bench.common.time_interleaved``): per dtype,
the copy baseline and every implementation's forward and its two parts run once per round, then
every backward likewise; each with its p20-p80 spread, NOISY when wide, INCONSISTENT when the
parts timed apart do not add up to the forward.

dtypes: ``fp32``, ``bf16``, ``fp16`` weights, or ``amp-bf16`` / ``amp-fp16``: fp32 master
weights with the forward under autocast, where a convolution needs W_sn in the autocast dtype:
each implementation's W_sn is cast to it when it is not already (torch's parametrization: an
fp32 W_sn that autocast casts; ours: written in the autocast dtype), and the backward's
gradients arrive in that dtype.

Also: kernel launches (torch.profiler), peak memory, the error of W_sn against float64 from the
same start, and GB/s for the bytes the semantics need at least (``traffic_bytes``): forward two
reads of W for the power iteration, one for u . W v, one more and the W_sn write for W / sigma;
backward G twice, W once, dW written. Next to the card's copy bandwidth measured in the same run
on a buffer of the same size. Every implementation ends with ``assert_normalized`` on the
weights it timed.

Traffic (``--traffic``, no GPU): the triton path's launches for SAGAN-128 G+D recorded, not run
(tables built on CPU tensors), per phase - power iteration, model-level (fused) normalize and its
backward, per-layer normalize and backward - with how many passes over weight-sized data each
kernel makes and the bytes that adds up to, and the time those bytes take at a bandwidth given
with ``--bandwidth-tbps`` (an estimate from bytes, not a measurement).

Update table. A small model (conv, transposed conv, linear; two linears for Muon) trained 50
steps by every torch.optim optimizer in each form torch offers on the device (for-loop, foreach,
fused; on CUDA also capturable, and fused / capturable Adam with the whole step captured in one
CUDA graph and replayed), with our SN on each backend and with torch's in the same loop: the
largest singular value of the W_sn the next training forward uses (worst layer), and the power
iteration updates per optimizer step (``spectral_norm_update_counts``; a captured update counts
once, at capture).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (Report, card_info, consistency_flag, count_kernel_launches,  # noqa: E402
                          default_device, peak_memory_mib, rel_error, say, time_interleaved)
from sagan_fast.nn import (SNConv2d, SNConvTranspose2d, SNLinear, SpectralNormError,  # noqa: E402
                           assert_normalized, fuse_spectral_norms, normalized_sigmas, spectral_norm,
                           spectral_norm_layers, spectral_norm_update_counts, update_spectral_norms)
from sagan_fast.ops import reference  # noqa: E402
from sagan_fast.ops._backend import why_unavailable  # noqa: E402
from sagan_fast.ops.spectral_norm import OP_NORMALIZE, OP_POWER_ITERATION  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 master weights, forward under autocast in this dtype.
AMP_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


def traffic_bytes(numel: int, weight_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[int, int]:
    """(forward, backward) bytes the semantics need at least: forward reads W four times (two
    power-iteration passes, u . W v, W / sigma) and writes W_sn; backward reads G twice and W
    once and writes dW (G and W_sn in ``out_dtype``)."""
    w = numel * torch.empty((), dtype=weight_dtype).element_size()
    o = numel * torch.empty((), dtype=out_dtype).element_size()
    return 4 * w + o, 2 * o + 2 * w


def sagan_sn_layers(resolution: int, ch: int, n_classes: int) -> list[tuple[tuple[int, ...], int]]:
    """(shape, SN dim) of every SN weight of the SAGAN G + D, from the real models (meta device)."""
    from sagan_fast.models import Discriminator, Generator
    with torch.device("meta"):
        g = Generator(resolution=resolution, ch=ch, n_classes=n_classes, sn_backend="reference")
        d = Discriminator(resolution=resolution, ch=ch, n_classes=n_classes, sn_backend="reference")
    return [(tuple(w.shape), sn.dim) for model in (g, d) for sn, w in spectral_norm_layers(model)]


def gapped_weight(shape, dim: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A weight whose (out, rest) matrix is a unit rank-one matrix plus noise (second singular
    value ~0.25): the power iteration converges in a few steps, so "normalized" is checkable."""
    rows = shape[dim]
    cols = torch.Size(shape).numel() // rows
    a = torch.randn(rows, generator=generator, dtype=torch.float64)
    b = torch.randn(cols, generator=generator, dtype=torch.float64)
    mat = torch.outer(a / a.norm(), b / b.norm())
    noise = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    mat += 0.25 * noise / (rows ** 0.5 + cols ** 0.5)
    return reference.matrix_to_weight_shape(mat, shape, dim).contiguous().to(dtype)


class _Holder(nn.Module):
    """A bare module owning one weight, to carry a spectral-norm parametrization."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class _AllWeights(nn.ModuleList):
    """The holders as one model whose forward is every normalized weight (what a model forward
    reads): with fuse_spectral_norms, all W / sigma in one call."""

    def forward(self) -> list[torch.Tensor]:
        return [h.weight for h in self]


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def build(impl: str, specs, device, dtype, seed: int = 0) -> _AllWeights:
    """One holder per layer; ``impl`` is "torch" or one of our backends."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    holders = []
    for shape, dim in specs:
        h = _Holder(gapped_weight(shape, dim, gen).to(device=device, dtype=dtype))
        if impl == "torch":
            nn.utils.parametrizations.spectral_norm(h, dim=dim)
        else:
            spectral_norm(h, dim=dim, backend=impl)
        holders.append(h)
    model = _AllWeights(holders).train()
    scramble_vectors(model, seed)
    return model


@torch.no_grad()
def scramble_vectors(model: nn.Module, seed: int) -> None:
    """Random unit u and v for every SN layer (the same draws for every implementation): the
    registration's 15 warm-up iterations leave u, v converged for these gapped weights, which never
    change while timed, so W_sn would be normalized even if the timed path skipped its power
    iterations. From here only the timed path's own iterations bring it to 1."""
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if hasattr(m, "parametrizations"):
            sn = m.parametrizations.weight[0]
            for vec in (sn._u, sn._v):
                r = torch.randn(vec.shape, generator=gen, dtype=torch.float64)
                vec.copy_(r / r.norm())


def snapshot(model: _AllWeights, specs):
    """float64 copies of (weight, u, v) from the state dicts, to compute the expected evaluation."""
    out = []
    for h, (_, dim) in zip(model, specs):
        state = h.state_dict()
        out.append((state["parametrizations.weight.original"].double(),
                    state["parametrizations.weight.0._u"].double(),
                    state["parametrizations.weight.0._v"].double(), dim))
    return out


def expected_w_sn(state) -> list[torch.Tensor]:
    return [reference.spectral_norm(w, u, v, dim=dim)[0] for w, u, v, dim in state]


def prepare_impl(impl, specs, device, dtype, amp_dtype=None) -> dict:
    """``impl``: "torch", a backend name (per-layer W / sigma), or "<backend>+fused" (all layers'
    W / sigma in one call, the model forward of ``fuse_spectral_norms``). ``amp_dtype``: the
    forward runs under autocast and W_sn must end up in that dtype (cast when it is not).
    Builds the weights and the timed closures and runs the forward once (the W_sn error)."""
    backend, fused = impl.split("+")[0], impl.endswith("+fused")
    model = build(backend, specs, device, dtype)
    if fused:
        fuse_spectral_norms(model)
    state = snapshot(model, specs)
    ours = impl != "torch"

    iterations = [0]  # power iterations the timed path asked for (ours), to check they all ran

    def power_iteration():
        iterations[0] += 1
        update_spectral_norms(model, force=True, check_finite=False)

    def normalize():
        if amp_dtype is None:
            return model()
        with torch.autocast(device.type, dtype=amp_dtype):
            # what a convolution under autocast gets: W_sn cast to amp_dtype unless it is already
            return [w if w.dtype == amp_dtype else w.to(amp_dtype) for w in model()]

    def forward():
        if ours:
            power_iteration()
        return normalize()

    first = forward()
    err = max(rel_error(a, b) for a, b in zip(first, expected_w_sn(state)))
    return dict(impl=impl, model=model, ours=ours, forward=forward, power_iteration=power_iteration,
                normalize=normalize, err=err, iterations=iterations)


def prepare_backward(p: dict) -> None:
    """The timed backward of ``p``: its graph is built after the last update (u, v are saved for
    backward, as in training, where the update follows the optimizer step, after the last
    backward), so nothing of this implementation may run a forward until it is timed."""
    outs = p["forward"]()
    grads = [torch.randn_like(o) for o in outs]

    def backward():
        torch.autograd.backward(outs, grads, retain_graph=True)
    p["backward"] = backward


def finish_impl(p: dict, device, times: dict, dtype, amp_dtype, copy_gbps, traffic, report) -> None:
    """Launch counts, the normalized check and the report row of a timed implementation."""
    impl, model = p["impl"], p["model"]
    bwd_launches = count_kernel_launches(p["backward"], device)
    p.pop("backward")   # frees the kept graph
    # What was timed must really be normalized (bf16 weights: W_sn is rounded to 2^-8), by power
    # iterations the timed path really ran (u, v started random): one per layer per timed update.
    assert_normalized(model, tol=0.02)
    if p["ours"]:
        asked = p["iterations"][0]
        counts = spectral_norm_update_counts(model)
        if set(counts.values()) != {asked}:
            raise SpectralNormError(f"the timed path asked for {asked} power iterations per layer "
                                    f"but the layers ran {sorted(set(counts.values()))}: it skipped some")
    t_fwd, t_bwd = times[f"{impl}|fwd"], times[f"{impl}|bwd"]
    t_pi, t_norm = times.get(f"{impl}|power iteration"), times.get(f"{impl}|normalize")

    def gbps(ms, nbytes):
        return nbytes / (ms * 1e-3) / 1e9

    fwd_bytes, bwd_bytes = traffic
    flags = [f"{m} NOISY" for m, t in (("fwd", t_fwd), ("bwd", t_bwd), ("power iteration", t_pi),
                                       ("normalize", t_norm)) if t is not None and t.noisy]
    # fwd is the power iteration then the normalize: timed apart, they should add up to it.
    inconsistent = consistency_flag(t_pi, t_norm, t_fwd, names=("power_iter", "normalize", "fwd"))
    report.add(impl="torch parametrization" if impl == "torch" else f"sagan_fast {impl}",
               dtype=_dtype_label(dtype, amp_dtype),
               fwd_ms=t_fwd.median_ms, fwd_spread=_spread(t_fwd), bwd_ms=t_bwd.median_ms,
               bwd_spread=_spread(t_bwd),
               power_iter_ms=t_pi.median_ms if t_pi else None, normalize_ms=t_norm.median_ms if t_norm else None,
               fwd_launches=p["fwd_launches"], bwd_launches=bwd_launches,
               fwd_GBps=gbps(t_fwd.median_ms, fwd_bytes), bwd_GBps=gbps(t_bwd.median_ms, bwd_bytes),
               fwd_pct_of_copy=100 * gbps(t_fwd.median_ms, fwd_bytes) / copy_gbps,
               bwd_pct_of_copy=100 * gbps(t_bwd.median_ms, bwd_bytes) / copy_gbps,
               fwd_peak_MiB=p["fwd_peak"],
               w_sn_rel_err_vs_fp64=p["err"],
               max_sigma_minus_1=max(abs(s - 1) for s in normalized_sigmas(model).values()),
               status="ok" + "".join(f"; {f}" for f in flags + ([inconsistent] if inconsistent else [])))
    say(f"  {impl:12s} {_dtype_label(dtype, amp_dtype)}: fwd {t_fwd.fmt()}, bwd {t_bwd.fmt()}, "
        f"err {p['err']:.2g}" + (f" [{inconsistent}]" if inconsistent else ""))


def _spread(t) -> str | None:
    return None if t is None else f"{t.p20_ms:.3g}-{t.p80_ms:.3g}"


def _dtype_label(dtype: torch.dtype, amp_dtype: torch.dtype | None) -> str:
    name = str(dtype).replace("torch.", "")
    return name if amp_dtype is None else f"{name} W, autocast {str(amp_dtype).replace('torch.', '')}"


def available_backends(requested: str, device: torch.device, report: Report | None = None) -> list[str]:
    backends = []
    for b in requested.split(","):
        reason = why_unavailable(b, device, OP_POWER_ITERATION) or why_unavailable(b, device, OP_NORMALIZE)
        if reason:
            say(f"skipping backend {b}: {reason}")
            if report is not None:
                report.args.setdefault("skipped", {})[b] = reason
        else:
            backends.append(b)
    return backends


def timing_main(args, device: torch.device) -> int:
    on_gpu = device.type == "cuda"
    ch = args.ch or (64 if on_gpu else 8)
    default = ("fp32,amp-bf16" if args.quick else "fp32,amp-bf16,bf16") if on_gpu else "fp32"
    names = (args.dtypes or default).split(",")
    unknown = [n for n in names if n not in DTYPES and n not in AMP_DTYPES]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from {', '.join([*DTYPES, *AMP_DTYPES])}")
    # (weight dtype, autocast dtype or None)
    dtypes = [(DTYPES[n], None) if n in DTYPES else (torch.float32, AMP_DTYPES[n]) for n in names]
    specs = sagan_sn_layers(args.resolution, ch, args.n_classes)
    numel = sum(torch.Size(s).numel() for s, _ in specs)
    card = card_info(device)
    report = Report("spectral_norm", card, dict(vars(args), ch=ch, layers=len(specs), weights=numel,
                                                 device=str(device)))
    if not on_gpu:
        say(f"NOTE: no GPU: CPU numbers at ch={ch}, not comparable with the GPU targets")
    say(f"SAGAN-{args.resolution} G+D, ch={ch}: {len(specs)} SN layers, {numel / 1e6:.2f} M weights, "
        f"on {card['name']}")
    backends = available_backends(args.backends, device, report)
    failures = 0
    timing = dict(device=device, warmup_ms=10 if args.quick else 25, rep_ms=50 if args.quick else 200,
                  rounds=5, cpu_reps=3 if args.quick else 5)
    for dtype, amp_dtype in dtypes:
        label = _dtype_label(dtype, amp_dtype)
        weight_bytes = numel * torch.empty((), dtype=dtype).element_size()
        traffic = traffic_bytes(numel, dtype, amp_dtype or dtype)
        src = torch.empty(numel, device=device, dtype=dtype).normal_()
        dst = torch.empty_like(src)
        impls = ["torch", *backends] + (["triton+fused"] if "triton" in backends else [])
        prepared = []
        for impl in impls:
            try:
                prepared.append(prepare_impl(impl, specs, device, dtype, amp_dtype))
            except Exception as exc:  # one broken backend must not hide the others' numbers
                failures += 1
                say(f"  {impl} {label} FAILED: {exc!r}")
                report.add(impl=f"sagan_fast {impl}", dtype=label, error=repr(exc)[:300])
        # Every figure of this dtype in interleaved rounds (a load change on the machine hits all
        # implementations alike): the copy, each forward and its parts; then each backward.
        fns = {"copy|fwd": lambda: dst.copy_(src)}
        for p in prepared:
            fns[f"{p['impl']}|fwd"] = p["forward"]
            if p["ours"]:
                fns[f"{p['impl']}|power iteration"] = p["power_iteration"]
                fns[f"{p['impl']}|normalize"] = p["normalize"]
        times = time_interleaved(fns, **timing)
        for p in prepared:
            p["fwd_launches"] = count_kernel_launches(p["forward"], device)
            p["fwd_peak"] = peak_memory_mib(p["forward"], device)
        for p in prepared:
            prepare_backward(p)
        times.update(time_interleaved({f"{p['impl']}|bwd": p["backward"] for p in prepared}, **timing))
        t_copy = times["copy|fwd"]
        copy_gbps = 2 * weight_bytes / (t_copy.median_ms * 1e-3) / 1e9
        del src, dst
        report.add(impl="copy of the same bytes (on the device)", dtype=label, fwd_ms=t_copy.median_ms,
                   fwd_spread=_spread(t_copy), fwd_GBps=copy_gbps,
                   status="ok" + ("; fwd NOISY" if t_copy.noisy else ""))
        say(f"  copy {label}: {copy_gbps:.0f} GB/s ({t_copy.fmt()})")
        for p in prepared:
            try:
                finish_impl(p, device, times, dtype, amp_dtype, copy_gbps, traffic, report)
            except Exception as exc:
                failures += 1
                say(f"  {p['impl']} {label} FAILED: {exc!r}")
                report.add(impl=f"sagan_fast {p['impl']}", dtype=label, error=repr(exc)[:300])
        del prepared
        if on_gpu:
            torch.cuda.empty_cache()

    columns = ["impl", "dtype", "fwd_ms", "fwd_spread", "bwd_ms", "bwd_spread", "power_iter_ms",
               "normalize_ms", "fwd_launches", "bwd_launches", "fwd_GBps", "bwd_GBps", "fwd_pct_of_copy",
               "bwd_pct_of_copy", "fwd_peak_MiB", "w_sn_rel_err_vs_fp64", "max_sigma_minus_1", "status",
               "error"]
    table = report.markdown(columns)
    notes = (f"\n\n{len(specs)} SN layers of SAGAN-{args.resolution} G+D (ch={ch}, "
             f"n_classes={args.n_classes}), "
             f"{numel / 1e6:.2f} M weights. fwd = power iteration + W/sigma for every layer; GB/s for "
             "the bytes the semantics need (fwd: 4 reads of W + the W_sn write; bwd: 2 reads of G, a read "
             "of W, the dW write; autocast rows: W_sn and G in the autocast dtype); copy = device-to-device "
             "copy of the weight bytes (read + write); max_sigma_minus_1: |largest singular value of "
             "W_sn - 1| after timing. ms: median of interleaved rounds (every implementation, the copy and "
             "the forward's parts in the same rounds; the backwards in later ones), spread p20-p80, NOISY "
             "when (p80 - p20) / median passes bench.common.NOISY_SPREAD, INCONSISTENT when power_iter + "
             "normalize timed apart and fwd differ by > 50%."
             + ("" if on_gpu else " CPU run: not comparable with the GPU targets."))
    print(table + notes)
    path = report.save_json(args.json)
    path.with_suffix(".md").write_text(table + notes + "\n")
    say(f"wrote {path} and {path.with_suffix('.md')}")
    if failures:
        say(f"FAILED: {failures} implementation(s) raised (see the error column)")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# Update table: every optimizer form x backend
# ------------------------------------------------------------------------------------------------

LEARNING_RATES = dict(SGD=0.05, Adam=1e-2, AdamW=1e-2, NAdam=1e-2, RAdam=3e-3, Adamax=1e-2, Adagrad=0.05,
                      Adadelta=1.0, RMSprop=3e-3, Rprop=1e-2, ASGD=0.02, Adafactor=3e-3, Muon=5e-3, LBFGS=0.1)


def _table_model(backend: str | None, device: torch.device, linear_only: bool) -> nn.Module:
    """Conv, transposed conv (dim 1), linear; or two bias-free linears (Muon: 2-D parameters only).
    ``backend`` None: torch's parametrization, same draws. Weights with a spectral gap."""
    torch.manual_seed(0)
    tsn = nn.utils.parametrizations.spectral_norm

    def make(ours, plain, *a, **k):
        return tsn(plain(*a, **k)) if backend is None else ours(*a, backend=backend, **k)
    if linear_only:
        model = nn.Sequential(nn.Flatten(), make(SNLinear, nn.Linear, 48, 24, bias=False), nn.Tanh(),
                              make(SNLinear, nn.Linear, 24, 8, bias=False))
    else:
        model = nn.Sequential(make(SNConv2d, nn.Conv2d, 3, 8, 3, padding=1), nn.Tanh(),
                              make(SNConvTranspose2d, nn.ConvTranspose2d, 8, 4, 4, stride=2, padding=1),
                              nn.Tanh(),
                              nn.Flatten(), make(SNLinear, nn.Linear, 4 * 8 * 8, 8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "parametrizations"):
                plist = m.parametrizations.weight
                plist.original.copy_(gapped_weight(plist.original.shape, plist[0].dim, gen))
    return model.to(device)


def _worst_sigma(model: nn.Module) -> float:
    """Largest singular value of the W_sn each layer's next training forward uses (read in training
    mode: an update due happens then), the one farthest from 1."""
    sigmas = []
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "parametrizations"):
                mat = reference.weight_to_matrix(m.weight.double(), m.parametrizations.weight[0].dim)
                sigmas.append(float(torch.linalg.matrix_norm(mat, ord=2)))
    return max(sigmas, key=lambda s: abs(s - 1))


def _forms(device: torch.device) -> list[tuple[str, str, dict]]:
    """(optimizer, form, keyword arguments) for every form torch offers on ``device``."""
    forms = []
    for name in LEARNING_RATES:
        cls = getattr(torch.optim, name, None)
        if cls is None:
            continue
        params = inspect.signature(cls.__init__).parameters
        if "foreach" not in params:
            forms.append((name, "default", {}))
            continue
        forms += [(name, "for-loop", {"foreach": False}), (name, "foreach", {"foreach": True})]
        for form, kwargs in (("fused", {"fused": True}), ("capturable", {"capturable": True})):
            if form in params and _runs(cls, device, kwargs):
                forms.append((name, form, kwargs))
    if device.type == "cuda":
        forms += [("Adam", "fused, CUDA graph", {"fused": True, "capturable": True}),
                  ("Adam", "capturable, CUDA graph", {"capturable": True})]
    return forms


def _runs(cls, device: torch.device, kwargs: dict) -> bool:
    p = nn.Parameter(torch.zeros(2, 2, device=device))
    p.grad = torch.zeros_like(p)
    try:
        cls([p], lr=0.1, **kwargs).step()
    except (RuntimeError, ValueError, TypeError, AssertionError):  # e.g. capturable on a CPU
        return False
    return True


def _train(model, name, kwargs, steps, device, graph: bool) -> None:
    extra = dict(momentum=0.9) if name == "SGD" else dict(max_iter=1) if name == "LBFGS" else {}
    opt = getattr(torch.optim, name)(model.parameters(), lr=LEARNING_RATES[name], **extra, **kwargs)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 4, 4, generator=gen).to(device)
    y = torch.randn(4, 8, generator=gen).to(device)

    def closure():
        opt.zero_grad(set_to_none=not graph)
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    def step():
        if name == "LBFGS":
            opt.step(closure)
        else:
            closure()
            opt.step()
    if not graph:
        for _ in range(steps):
            step()
        return
    warmup = 3  # lazy optimizer state, Triton tables, cuBLAS handles: not in the graph
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        step()
    for _ in range(steps - warmup):
        cuda_graph.replay()
    torch.cuda.synchronize(device)


def update_table_main(args, device: torch.device) -> int:
    card = card_info(device)
    report = Report("spectral_norm_updates", card, dict(vars(args), device=str(device)))
    backends = available_backends(args.backends, device, report)
    wanted = set(args.optimizers.split(",")) if args.optimizers else None
    steps, failures = args.steps, 0
    for name, form, kwargs in _forms(device):
        if wanted is not None and name not in wanted:
            continue
        graph = "CUDA graph" in form
        torch_model = _table_model(None, device, name == "Muon")
        _train(torch_model, name, kwargs, steps, device, graph)
        torch_sigma = _worst_sigma(torch_model)
        for backend in backends:
            t0 = time.perf_counter()
            model = _table_model(backend, device, name == "Muon")
            try:
                _train(model, name, kwargs, steps, device, graph)
                counts = list(spectral_norm_update_counts(model).values())
                sigma = _worst_sigma(model)
            except Exception as exc:  # one failing form must not hide the others
                failures += 1
                report.add(optimizer=name, form=form, backend=backend, error=repr(exc)[:200])
                say(f"  {name} {form} {backend} FAILED: {exc!r}")
                continue
            # First forward: one update (as torch's first forward); then one per optimizer step
            # (captured steps: one at capture, run by every replay).
            per_step = (counts[0] - 1) / (steps if not graph else 3 + 1)
            ok = abs(sigma - 1) <= 0.02 and all(c == counts[0] for c in counts) and per_step == 1
            failures += not ok
            report.add(optimizer=name, form=form, backend=backend, steps=steps, sigma_W_sn=f"{sigma:.5f}",
                       torch_sn_sigma=f"{torch_sigma:.5f}", updates_per_step=f"{per_step:.2f}",
                       ok="yes" if ok else "NO")
            say(f"  {name:9s} {form:22s} {backend:9s} sigma {sigma:.5f} (torch {torch_sigma:.5f}) "
                f"updates/step {per_step:.2f} {time.perf_counter() - t0:.1f}s")
    columns = ["optimizer", "form", "backend", "steps", "sigma_W_sn", "torch_sn_sigma", "updates_per_step",
               "ok", "error"]
    table = report.markdown(columns)
    notes = (f"\n\nsigma_W_sn: largest singular value of the W_sn the next training forward uses, after "
             f"{steps} steps (worst of the model's SN layers); torch_sn_sigma: the same with "
             "torch.nn.utils.parametrizations.spectral_norm (one power iteration per forward) in the same "
             "loop; updates_per_step: power-iteration updates after the first forward's, per optimizer "
             "step (CUDA-graph rows: per captured step, which every replay runs). ok: sigma within 2% of "
             "1 and one update per step.")
    print(table + notes)
    path = report.save_json(args.json)
    path.with_suffix(".md").write_text(table + notes + "\n")
    say(f"wrote {path} and {path.with_suffix('.md')}")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# Host cost of the optimizer hook
# ------------------------------------------------------------------------------------------------

def hook_cost_main(args, device: torch.device) -> int:
    """opt.step() over the SAGAN-128 G+D's SN weights (as tiny tensors: host time only) minus the
    same step over plain parameters of the same count: what the SN optimizer hook adds."""
    specs = sagan_sn_layers(args.resolution, 64, args.n_classes)
    backends = available_backends(args.backends, device)
    rows = []
    for backend in [None, *backends]:
        torch.manual_seed(0)
        holders = nn.ModuleList(_Holder(torch.randn(4, 3, device=device)) for _ in specs)
        if backend is not None:
            for h in holders:
                spectral_norm(h, backend=backend)
        params = list(holders.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.SGD(params, lr=0.0, foreach=True)  # lr 0: the weights stay, only host work
        results = {}
        for mode in ("train", "eval"):  # eval: the hook only marks layers stale (no iteration)
            holders.train(mode == "train")
            for _ in range(20):
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # best of 10 blocks: the host time without the other processes' noise
            n, best = max(args.hook_reps // 10, 1), float("inf")
            for _ in range(10):
                t0 = time.perf_counter()
                for _ in range(n):
                    opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, (time.perf_counter() - t0) / n * 1e6)
            results[mode] = best
        rows.append((backend, results))
    base = rows[0][1]["train"]
    print(f"opt.step() of SGD(foreach) over {len(specs)} parameters (the SAGAN-128 G+D SN layers, as 4x3 "
          f"tensors), {device}: plain {base:.1f} us")
    print("| backend | step, train mode (hook + one update) us | hook adds, us | step, eval mode us | hook "
          "bookkeeping alone, us |")
    print("|---|---|---|---|---|")
    for backend, r in rows[1:]:
        print(f"| {backend} | {r['train']:.1f} | {r['train'] - base:.1f} | {r['eval']:.1f} | "
              f"{r['eval'] - rows[0][1]['eval']:.1f} |")
    return 0


# ------------------------------------------------------------------------------------------------
# Traffic: launches and bytes of the triton path, recorded on CPU tensors (no GPU, nothing runs)
# ------------------------------------------------------------------------------------------------

# Weight-sized data each kernel streams: W (the weight), O (W_sn or its gradient G, in the output
# dtype), D (dW, in the weight dtype); the rest (u, v, workspaces, tables) is small.
KERNEL_STREAMS = {
    "_matvec_kernel": "W", "_rmatvec_kernel": "W", "_finalize_kernel": "",
    "_uwv_partials_multi_kernel": "W", "_scale_multi_kernel": "WO",
    "_dot_partials_multi_kernel": "OW", "_normalize_backward_multi_kernel": "OD",
    "_uwv_partials_kernel": "W", "_scale_kernel": "WO", "_dot_partials_kernel": "OW",
    "_normalize_backward_kernel": "OD",
}


@contextlib.contextmanager
def recorded_triton_launches():
    """Every Triton launch in the block is recorded by kernel name, not run (JIT or interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    names: list[str] = []
    originals = JITFunction.run, InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        names.append(self.__name__)
    JITFunction.run = InterpretedFunction.run = record
    try:
        yield names
    finally:
        JITFunction.run, InterpretedFunction.run = originals


def traffic_main(args) -> int:
    """Launches, passes over weight-sized data and bytes per phase of the triton path for the SAGAN
    G+D weights (fp32, and fp32 master weights with W_sn in the autocast dtype)."""
    from sagan_fast.ops.triton import spectral_norm as tsn
    specs = sagan_sn_layers(args.resolution, args.ch or 64, args.n_classes)
    numel = sum(torch.Size(s).numel() for s, _ in specs)
    dims = [d for _, d in specs]
    report = Report("spectral_norm_traffic", {"name": "none (CPU, launches recorded)"},
                    dict(vars(args), layers=len(specs), weights=numel))
    for label, out_dtype in (("fp32", None), ("fp32 W, bf16 W_sn (autocast)", torch.bfloat16)):
        ws = [torch.empty(shape) for shape, _ in specs]
        us = [torch.empty(w.shape[d]) for w, d in zip(ws, dims)]
        vs = [torch.empty(w.numel() // w.shape[d]) for w, d in zip(ws, dims)]
        sizes = {"W": 4 * numel, "D": 4 * numel, "O": (2 if out_dtype else 4) * numel}
        phases = {}
        with recorded_triton_launches() as names:
            uploads = tsn._UPLOADS
            tsn.power_iteration_(ws, us, vs, dims, 1, 1e-12)
            phases["power iteration (once per weight update)"] = (list(names), tsn._UPLOADS - uploads)
            for fused in (True, False):
                params = [w.clone().requires_grad_() for w in ws]
                names.clear()
                uploads = tsn._UPLOADS
                outs = (tsn.normalize_multi(params, us, vs, dims, [out_dtype] * len(ws)) if fused else
                        [tsn.normalize(p, u, v, d, out_dtype) for p, u, v, d in zip(params, us, vs, dims)])
                kind = "model-level (fuse_spectral_norms)" if fused else "per layer (unfused, compiled)"
                phases[f"normalize forward, {kind}"] = (list(names), tsn._UPLOADS - uploads)
                grads = [torch.empty_like(o) for o in outs]
                for repeat in ("first", "same gradients again") if fused else ("",):
                    names.clear()
                    uploads = tsn._UPLOADS
                    torch.autograd.grad(outs, params, grads, retain_graph=True)
                    phases[f"normalize backward, {kind}" + (f", {repeat}" if repeat else "")] = (
                        list(names), tsn._UPLOADS - uploads)
        for phase, (launched, n_uploads) in phases.items():
            streams = "".join(KERNEL_STREAMS[n] for n in dict.fromkeys(launched))
            nbytes = sum(sizes[c] for c in streams)
            report.add(config=label, phase=phase, launches=len(launched), kernels=len(set(launched)),
                       W_passes=streams.count("W"), W_sn_or_G_passes=streams.count("O"),
                       dW_passes=streams.count("D"),
                       MB=nbytes / 1e6, ms_at_bandwidth=nbytes / (args.bandwidth_tbps * 1e12) * 1e3,
                       table_uploads=n_uploads)
        del ws, us, vs
    columns = ["config", "phase", "launches", "kernels", "W_passes", "W_sn_or_G_passes", "dW_passes", "MB",
               "ms_at_bandwidth", "table_uploads"]
    table = report.markdown(columns)
    notes = (f"\n\nSAGAN-{args.resolution} G+D (ch={args.ch or 64}, n_classes={args.n_classes}): "
             f"{len(specs)} SN weights, {numel / 1e6:.1f} M elements ({4 * numel / 1e6:.0f} MB in fp32). "
             "Launches recorded on CPU tensors, not run. Passes: weight-sized streams of the phase's kernels "
             "(each kernel type covers every weight once); MB: their bytes; ms_at_bandwidth: those bytes at "
             f"--bandwidth-tbps ({args.bandwidth_tbps} TB/s), an estimate, not a measurement. table_uploads: "
             "host-to-device table copies (the gradient table is cached on the gradients' addresses).")
    print(table + notes)
    path = report.save_json(args.json)
    path.with_suffix(".md").write_text(table + notes + "\n")
    say(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update-table", action="store_true",
                        help="optimizer form x backend: sigma of W_sn after --steps steps, updates per step")
    parser.add_argument("--hook-cost", action="store_true", help="host cost of the SN optimizer hook")
    parser.add_argument("--traffic", action="store_true",
                        help="launches and bytes per phase of the triton path (recorded on CPU, "
                        "nothing runs)")
    parser.add_argument("--bandwidth-tbps", type=float, default=3.35,
                        help="--traffic: bandwidth for the bytes-to-time estimate (H100 SXM HBM3: 3.35)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtypes", default=None, help="comma-separated from fp32,bf16,fp16,amp-bf16,"
                        "amp-fp16 "
                        "(default on GPU: fp32,amp-bf16,bf16, with --quick fp32,amp-bf16; on CPU: fp32)")
    parser.add_argument("--backends", default="reference,triton,cuda",
                        help="ours to compare with torch (the unavailable ones are skipped, with the reason)")
    parser.add_argument("--optimizers", default=None, help="--update-table: only these (comma-separated)")
    parser.add_argument("--steps", type=int, default=50, help="--update-table: optimizer steps")
    parser.add_argument("--hook-reps", type=int, default=2000, help="--hook-cost: timed steps")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--ch", type=int, default=None,
                        help="channel multiplier (default 64 on GPU, 8 on CPU)")
    parser.add_argument("--n-classes", type=int, default=1000)
    parser.add_argument("--json", default=None, help="output path (default: bench/results/...)")
    args = parser.parse_args(argv)
    if args.traffic:
        return traffic_main(args)
    device = torch.device(args.device) if args.device else default_device()
    if args.update_table:
        return update_table_main(args, device)
    if args.hook_cost:
        return hook_cost_main(args, device)
    return timing_main(args, device)


if __name__ == "__main__":
    raise SystemExit(main())
