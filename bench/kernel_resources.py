"""What the compiler says about every kernel on Hopper (sm_90), with no GPU: registers, spills,
shared memory, warp-group MMA (wgmma) and the widest global load of each variant.

    python bench/kernel_resources.py                    # every variant (~490, ~10 min cold on 2 cores)
    python bench/kernel_resources.py --ci               # what CI checks (tests/test_kernel_resources.py)
    python bench/kernel_resources.py --json out.json --jobs 4 --no-cuda

The report is that of the installed Triton (its ptxas and flags). To see what another version
compiles, e.g. the GPU machine's triton 3.6 (whose ptxas 12.8 spills on tiles 3.8's does not):
``pip install --no-deps --target DIR triton==3.6.0`` and run with ``PYTHONPATH=DIR`` (the compile
cache is keyed by the Triton version). The CUDA rows come from the nvcc on PATH.

Triton kernels are compiled with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` exactly
as the JIT specializes them at launch: the arguments come from the host wrappers' own launch plans
(``sagan_fast.ops.triton.attention.forward_plan`` / ``backward_plan``; the spectral-norm host code
run with its launches recorded instead of executed) at the production shapes and strides, and the
JIT's binder (``create_function_from_signature``) turns them into the signature, the constexprs
(ints equal to 1) and the 16-byte divisibility attributes of pointers and ints, as a launch would.
Attention: SAGAN G at 32x32 (B=64, N=Nk=1024, E=32, Ev=256, DESIGN.md's anchor) and at 64x64
(B=32, N=4096, E=16, Ev=128), bf16 / fp16 / fp32, q / k / v sliced from one fused 1x1-conv output
in channel-major (NCHW) and channels_last layouts, every launch candidate the tuner may pick, both
backward paths (fused dk + dv or split dv, dk; dq by atomics or by its own kernel in deterministic
mode). Spectral norm: every SN weight of SAGAN-128 G + D (ch=64, from the models on the meta
device), fp32 weights, and fp32 master weights under bf16 autocast (W_sn written in bf16).

CUDA C++ kernels (``kernels/*.cu``): ``nvcc -Xptxas -v`` with setup_extension.py's gencode flags
for sm_90 (+ compute_90 PTX), registers / spills / static shared memory per function from ptxas,
SASS from ``cuobjdump`` for the instruction counts (HMMA, cp.async = LDGSTS, widest LDG).

Columns: ``registers`` per thread, ``spill_bytes`` (ptxas spill stores + loads), ``shared_bytes``
(Triton: the kernel's shared memory, all of it dynamic; CUDA: static only, the dynamic part is
sized at launch), ``wgmma`` (wgmma.mma_async in the PTX), ``mma`` (mma.sync / wmma in the PTX, or
HMMA in the SASS for CUDA), ``max_load_bytes`` (widest global load: ld.global vectors and cp.async
sizes), ``cp_async`` and ``atomics`` counts, ``int_div`` (integer div / rem instructions in the
PTX; rows compiled before the column existed lack it). Compiled results are cached in
``build/kernel_resources/cache.json`` keyed by the kernel's source hash, its specialization and the
compiler version, so a rerun only compiles what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The JIT, not the interpreter: kernels must be JITFunctions here (tests set TRITON_INTERPRET=1).
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SMEM_BYTES = 227 * 1024   # H100 / H200: max dynamic shared memory per block (opt-in)
CACHE_DIR = REPO / "build" / "kernel_resources"
COLUMNS = ["kernel", "candidate", "shape", "dtype", "layout", "registers", "spill_bytes", "shared_bytes",
           "wgmma", "mma", "max_load_bytes", "cp_async", "atomics", "int_div"]

# name -> (B, N, Nk, E, Ev): DESIGN.md's SAGAN G attention at 32x32 (C=256) and at 64x64 (C=128).
ATTENTION_SHAPES = {
    "G32x32 B64 N1024 E32 Ev256": (64, 1024, 1024, 32, 256),
    "G64x64 B32 N4096 E16 Ev128": (32, 4096, 4096, 16, 128),
}
ATTENTION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                    "fp64": torch.float64}
LAYOUTS = ("channel-major", "channels_last")


# ------------------------------------------------------------------------------------------------
# One compiled variant
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Variant:
    """One kernel launch as the JIT would see it: the JITFunction, its arguments and options."""
    kernel: Any
    args: tuple
    kwargs: dict
    labels: dict   # kernel, candidate, shape, dtype, layout (report columns)


class _Pointer:
    """Stands for a tensor argument: its dtype and an address with the tensor's alignment (the
    caching allocator gives >= 512-byte aligned blocks; a view adds its storage offset)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self._address = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


def _specialize(kernel, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run computes them."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(HOPPER)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args = tuple(_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args)
    # The options JITFunction.run adds to every launch (triton 3.6 and 3.8 alike).
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, specialization,
                                                              options)
    return signature, constexprs, attrs, options


_ROW_SCHEMA = 2   # bump when compile_variant's row fields change (old cache entries then miss)


def _cache_key(src, options) -> str:
    opts = json.dumps({k: str(v) for k, v in sorted(options.__dict__.items())})
    return hashlib.sha256(f"{_ROW_SCHEMA}|{triton.__version__}|{src.hash()}|{opts}".encode()).hexdigest()


_PTX_LOAD = re.compile(r"\bld\.global((?:\.[\w:]+)+)")
_PTX_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global(?:\.[\w:]+)*"
                           r"\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(\d+)")


def ptx_counts(ptx: str) -> dict:
    """wgmma / mma / cp.async / atomics / integer division (div, rem) counts, the widest global load
    (bytes) of a PTX text, and how many global loads of each width it has (``load_widths``, e.g.
    "4:12 8:3": 8-byte loads in the multi-tensor kernels are their pointer tables)."""
    widths: dict[int, int] = {}
    for m in _PTX_LOAD.finditer(ptx):
        quals = m.group(1).split(".")
        vec = next((int(q[1:]) for q in quals if re.fullmatch(r"v[248]", q)), 1)
        bits = next((int(q[1:]) for q in reversed(quals) if re.fullmatch(r"[bfsu](8|16|32|64|128)", q)), 0)
        widths[vec * bits // 8] = widths.get(vec * bits // 8, 0) + 1
    cp_sizes = [int(s) for s in _PTX_CP_ASYNC.findall(ptx)]
    for size in cp_sizes:
        widths[size] = widths.get(size, 0) + 1
    widest = max(widths, default=0)
    return dict(load_widths=" ".join(f"{w}:{n}" for w, n in sorted(widths.items())),
                wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma=len(re.findall(r"\b(?:mma\.sync|wmma\.mma)", ptx)),
                max_load_bytes=widest, cp_async=len(cp_sizes),
                atomics=len(re.findall(r"\b(?:red|atom)\.global", ptx)),
                int_div=len(re.findall(r"\b(?:div|rem)\.[su](?:16|32|64)\b", ptx)),
                tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)))


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """Per entry function: registers, spill stores + loads, stack frame, static smem (ptxas -v)."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            current = out.setdefault(m.group(1), dict(registers=None, spill_bytes=0, stack_bytes=0,
                                                      static_smem_bytes=0))
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current["stack_bytes"] = int(m.group(1))
            current["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := _PTXAS_REGS.search(line)):
            current["registers"] = int(m.group(1))
            current["static_smem_bytes"] = int(m.group(2) or 0)
    return out


def compile_variant(v: Variant, cache: dict) -> dict:
    """Compile one variant for sm_90 (or take it from ``cache``) and return its report row."""
    from triton import knobs
    from triton.compiler import ASTSource
    signature, constexprs, attrs, options = _specialize(v.kernel, v.args, v.kwargs)
    src = ASTSource(v.kernel, signature, constexprs, attrs)
    key = _cache_key(src, options)
    row = dict(v.labels)
    if key in cache:
        return dict(row, **cache[key], cached=True)
    log = io.StringIO()
    t0 = time.perf_counter()
    # Always compile (never Triton's on-disk cache), so ptxas runs here, as the installed Triton
    # calls it (its own ptxas and flags: 3.8 adds --regAllocOptLevel=2, 3.6 does not), and
    # prints its resource usage.
    old = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=HOPPER, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    ptx = compiled.asm["ptx"]
    parsed = parse_ptxas_log(log.getvalue())
    if not parsed:
        raise RuntimeError("triton.compile printed no ptxas resource usage (TRITON_DUMP_PTXAS_LOG)")
    info = next(iter(parsed.values()))
    declared = {p.name for p in v.kernel.params if p.is_constexpr}
    result = dict(constexpr_args=[n for n, t in signature.items() if t == "constexpr" and n not in declared],
                  aligned_args=sum(1 for a in attrs.values() if ["tt.divisibility", 16] in a),
                  registers=info["registers"], spill_bytes=info["spill_bytes"],
                  shared_bytes=int(compiled.metadata.shared), num_warps=options.num_warps,
                  num_stages=options.num_stages, **ptx_counts(ptx),
                  compile_s=round(time.perf_counter() - t0, 2))
    cache[key] = result
    return dict(row, **result, cached=False)


# ------------------------------------------------------------------------------------------------
# Attention variants: the host wrapper's launch plans at production shapes and strides
# ------------------------------------------------------------------------------------------------

def attention_inputs(shape, dtype, layout: str):
    """q, k, v, out, dout as SelfAttention2d passes them: views of one fused 1x1-conv output
    (B, 2E + Ev, H, W) split along channels (meta tensors: strides and offsets, no memory)."""
    from sagan_fast.ops.triton import attention as tri
    B, N, Nk, E, Ev = shape
    if N != Nk:
        raise ValueError("attention_inputs: the fused-projection layout needs N == Nk")
    side = int(round(N ** 0.5))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(B, 2 * E + Ev, side, side, device="meta", dtype=dtype).contiguous(memory_format=fmt)
    f, g, h = x.split([E, E, Ev], dim=1)
    q, k, v = (t.flatten(2).transpose(1, 2) for t in (f, g, h))
    out = tri._empty_out(q, v)
    # The gradient of out arrives in out's layout (its (B, Ev, H, W) view is NCHW / channels_last).
    dout = torch.empty_like(out)
    return q, k, v, out, dout


def attention_variants(shapes=None, dtypes=None, layouts=LAYOUTS, candidates: str = "all",
                       precisions=None) -> list[Variant]:
    """Every launch the host wrappers may issue, per candidate setting (``candidates``: "all" or
    "default", the first candidate only): the forward and every backward path, fp32 with each
    dot precision (``fp32_precision`` changes the kernels)."""
    from sagan_fast.ops.triton import attention as tri
    shapes = ATTENTION_SHAPES if shapes is None else shapes
    dtypes = ATTENTION_DTYPES if dtypes is None else dtypes
    variants = []
    for shape_name, shape in shapes.items():
        for dtype_name, dtype in dtypes.items():
            for precision in (precisions or tri.FP32_PRECISIONS) if dtype == torch.float32 else ("ieee",):
                label = dtype_name if precision == "ieee" else f"{dtype_name} {precision}"
                for layout in layouts:
                    variants += _attention_layout_variants(tri, shape_name, shape, dtype, label, precision,
                                                           layout, candidates)
    return variants


def _attention_layout_variants(tri, shape_name, shape, dtype, dtype_label, precision, layout, candidates):
    q, k, v, out, dout = attention_inputs(shape, dtype, layout)
    _, lse, forward = tri.forward_plan(q, k, v, 1.0, precision)
    plans = [("forward", forward)]
    for path in tri.backward_paths(q, k, v):
        plans.append((path, tri.backward_plan(dout, q, k, v, out, lse, 1.0, precision, path).launches))
    variants, seen = [], set()
    for path, launches in plans:
        for launch in launches:
            configs = launch.candidates()
            for i, config in enumerate(configs if candidates == "all" else configs[:1]):
                name = launch.kernel.__name__ + launch.variant_suffix()
                label = launch.label(config)
                if (name, label) in seen:   # the delta kernel and dv are in several paths
                    continue
                seen.add((name, label))
                variants.append(Variant(
                    launch.kernel, launch.args, dict(launch.constexprs, **config),
                    dict(kernel=name, candidate=("default " if i == 0 else "") + label, shape=shape_name,
                         dtype=dtype_label, layout=layout, path=path)))
    return variants


# ------------------------------------------------------------------------------------------------
# Spectral-norm variants: the host code run with its launches recorded
# ------------------------------------------------------------------------------------------------

def sagan_sn_specs(resolution: int = 128, ch: int = 64) -> list[tuple[tuple[int, ...], int]]:
    """(shape, SN dim) of every SN weight of SAGAN G + D, from the models on the meta device."""
    from sagan_fast.models import Discriminator, Generator
    from sagan_fast.nn.spectral_norm import spectral_norm_layers
    with torch.device("meta"):
        g = Generator(resolution=resolution, ch=ch, sn_backend="reference")
        d = Discriminator(resolution=resolution, ch=ch, sn_backend="reference")
    return [(tuple(w.shape), sn.dim) for model in (g, d) for sn, w in spectral_norm_layers(model)]


@contextlib.contextmanager
def recorded_launches():
    """Within the block, every JITFunction launch is recorded (kernel, args, kwargs), not run."""
    from triton.runtime.jit import JITFunction
    calls: list[tuple] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))
    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = original


# (label, weight dtype, W_sn dtype): fp32 weights as is, and fp32 master weights under bf16 autocast
# (W_sn written in bf16, gradients arriving in bf16): what SAGAN-128 training launches.
SN_CONFIGS = (("fp32", torch.float32, None), ("fp32 W, bf16 W_sn (autocast)", torch.float32, torch.bfloat16))


def spectral_norm_variants(resolution: int = 128, ch: int = 64, specs=None, configs=SN_CONFIGS,
                           label: str | None = None) -> list[Variant]:
    """The Triton SN kernels as the SAGAN-128 weights (or ``specs``: (shape, dim) pairs) launch
    them, per config of ``configs``: the multi-tensor power iteration, the model-level normalize and
    its backward, and the per-layer normalize and backward of every weight (what torch.compile
    runs). CPU tensors whose launches are recorded, never executed (the tables hold CPU addresses,
    which is fine for a compile). Identical specializations are kept once."""
    from sagan_fast.ops.triton import spectral_norm as sn
    specs = sagan_sn_specs(resolution, ch) if specs is None else specs
    label = label or f"SAGAN-{resolution} G+D ch={ch} ({len(specs)} weights)"
    dims = [d for _, d in specs]
    variants, seen = [], set()
    for dtype_label, w_dtype, out_dtype in configs:
        weights = [torch.empty(shape, dtype=w_dtype) for shape, _ in specs]
        us = [torch.empty(w.shape[d], dtype=w_dtype) for w, d in zip(weights, dims)]
        vs = [torch.empty(w.numel() // w.shape[d], dtype=w_dtype) for w, d in zip(weights, dims)]
        with recorded_launches() as calls:
            sn.power_iteration_(weights, us, vs, dims, 1, 1e-12)
            ws = [w.clone().requires_grad_() for w in weights]
            outs = sn.normalize_multi(ws, us, vs, dims, [out_dtype] * len(ws))
            torch.autograd.grad(outs, ws, [torch.empty_like(o) for o in outs])
            for w, u, v, d in zip(weights, us, vs, dims):
                w1 = w.clone().requires_grad_()
                out1 = sn.normalize(w1, u, v, d, out_dtype)
                torch.autograd.grad(out1, w1, torch.empty_like(out1))
        for kernel, args, kwargs in calls:
            signature, constexprs, attrs, _ = _specialize(kernel, args, kwargs)
            key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items())), repr(attrs))
            if key in seen:
                continue
            seen.add(key)
            variants.append(Variant(kernel, args, kwargs, dict(kernel=kernel.__name__, candidate="fixed",
                                                               shape=label, dtype=dtype_label, layout="",
                                                               path="")))
    return variants


# ------------------------------------------------------------------------------------------------
# CUDA C++ kernels: nvcc -Xptxas -v and the SASS
# ------------------------------------------------------------------------------------------------

def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, proc.stdout.splitlines()))


def _short_cuda_name(demangled: str) -> tuple[str, str]:
    """('attention_forward_kernel', '__half') from 'void ...::attention_forward_kernel<__half>(...)'."""
    m = re.search(r"(\w+)<(.*?)>\(", demangled)
    if not m:
        return re.sub(r"\(.*", "", demangled).split("::")[-1], ""
    return m.group(1), m.group(2)


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)", re.M)


def sass_counts(sass: str) -> dict[str, dict]:
    """Per function of a cuobjdump -sass listing: HMMA, LDGSTS (cp.async), widest LDG / LDGSTS."""
    out = {}
    parts = _SASS_FUNC.split(sass)
    for name, body in zip(parts[1::2], parts[2::2]):
        widest = 0
        for m in re.finditer(r"\b(LDG|LDGSTS)(\.[\w.]+)?\s", body):
            quals = (m.group(2) or "").split(".")
            size = 4
            for q in quals:
                if q in ("128", "64", "U16", "S16", "U8", "S8"):
                    size = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[q]
            widest = max(widest, size)
        out[name] = dict(mma=len(re.findall(r"\bHMMA\b", body)),
                         cp_async=len(re.findall(r"\bLDGSTS\b", body)),
                         max_load_bytes=widest, wgmma=len(re.findall(r"\bHGMMA\b", body)),
                         atomics=len(re.findall(r"\b(?:RED|ATOM)G?\b", body)))
    return out


def cuda_rows(cache: dict, nvcc: str | None = None) -> tuple[list[dict], str | None]:
    """One row per CUDA kernel instantiation; (rows, None) or ([], the reason there are none)."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return [], "nvcc not found"
    cuobjdump = shutil.which("cuobjdump") or str(Path(nvcc).resolve().with_name("cuobjdump"))
    if not Path(cuobjdump).exists():   # a minimal toolkit: Triton ships one
        from triton.backends.nvidia.compiler import get_ptxas
        cuobjdump = str(Path(get_ptxas(90).path).with_name("cuobjdump"))
    import setup_extension
    flags = ["-O3", "--expt-relaxed-constexpr", "-std=c++17", "-DSAGAN_FAST_WITH_CUDA",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             *setup_extension.nvcc_gencode_flags(["90"]), "-Xptxas", "-v", "-I", str(REPO / "kernels")]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
    rows = []
    for source in sorted((REPO / "kernels").glob("*.cu")):
        text = source.read_text() + (REPO / "kernels" / "common.cuh").read_text()
        key = hashlib.sha256(f"{version}|{flags}|{text}".encode()).hexdigest()
        if key not in cache:
            with tempfile.TemporaryDirectory() as tmp:
                obj = Path(tmp) / "k.o"
                proc = subprocess.run([nvcc, *flags, "-c", str(source), "-o", str(obj)], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {source.name}:\n{proc.stderr[-3000:]}")
                sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True).stdout
                ptx_listed = subprocess.run([cuobjdump, "-lptx", str(obj)], capture_output=True,
                                            text=True).stdout
            info = parse_ptxas_log(proc.stdout + proc.stderr)
            counts = sass_counts(sass)
            names = _demangle(list(info))
            entries = []
            for mangled, res in info.items():
                kernel, targs = _short_cuda_name(names.get(mangled, mangled))
                entries.append(dict(kernel=kernel, dtype=targs, registers=res["registers"],
                                    spill_bytes=res["spill_bytes"], shared_bytes=res["static_smem_bytes"],
                                    **counts.get(mangled, {})))
            cache[key] = dict(entries=entries, ptx_embedded="PTX file" in ptx_listed)
        for entry in cache[key]["entries"]:
            rows.append(dict(entry, candidate=f"nvcc {source.name}", shape="any", layout="any",
                             path="cuda", ptx_embedded=cache[key]["ptx_embedded"]))
    return rows, None


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def ci_variants() -> list[Variant]:
    """What CI checks (tests/test_kernel_resources.py), ~200 variants, ~4 min cold on 2 cores:
    every candidate at the DESIGN anchor shape in bf16 and IEEE fp32 (both layouts); the default
    candidates of fp16, the TF32 precisions and fp64 there, and of bf16 / IEEE fp32 at the 64x64
    shape; the spectral-norm kernels. (fp16 compiles to bf16's code with another element type.)"""
    anchor, other = (dict([item]) for item in ATTENTION_SHAPES.items())
    bf16_fp32 = {k: ATTENTION_DTYPES[k] for k in ("bf16", "fp32")}
    variants = attention_variants(anchor, bf16_fp32, candidates="all", precisions=("ieee",))
    variants += attention_variants(anchor, {k: ATTENTION_DTYPES[k] for k in ("fp16", "fp64")},
                                   candidates="default")
    variants += attention_variants(anchor, {"fp32": torch.float32}, candidates="default",
                                   precisions=("tf32", "tf32x3"))
    variants += attention_variants(other, bf16_fp32, candidates="default", precisions=("ieee",))
    return variants + spectral_norm_variants()


def all_variants() -> list[Variant]:
    return attention_variants(candidates="all") + spectral_norm_variants()


_WORK: list[Variant] = []


def _compile_index(i: int) -> dict:
    try:
        return compile_variant(_WORK[i], {})
    except Exception as exc:  # noqa: BLE001 (a variant that fails to compile is a row saying so)
        return dict(_WORK[i].labels, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")


def load_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def compile_all(variants: list[Variant], jobs: int = 1, cache_path: Path | None = CACHE_DIR / "cache.json",
                progress: Callable[[str], None] | None = None) -> list[dict]:
    """Rows for ``variants``: cached ones at once, the rest compiled over ``jobs`` processes."""
    cache = load_cache(cache_path) if cache_path else {}
    rows: list[dict | None] = [None] * len(variants)
    todo = []
    for i, v in enumerate(variants):
        signature, constexprs, attrs, options = _specialize(v.kernel, v.args, v.kwargs)
        from triton.compiler import ASTSource
        key = _cache_key(ASTSource(v.kernel, signature, constexprs, attrs), options)
        if key in cache:
            rows[i] = dict(v.labels, **cache[key], cached=True)
        else:
            todo.append((i, key))
    if todo:
        global _WORK
        _WORK = variants
        if jobs > 1 and len(todo) > 1:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(todo))) as pool:
                results = pool.imap(_compile_index, [i for i, _ in todo])
                for n, ((i, key), row) in enumerate(zip(todo, results)):
                    rows[i] = row
                    if progress:
                        progress(f"[{n + 1}/{len(todo)}] {row['kernel']} {row['candidate']}")
        else:
            for n, (i, key) in enumerate(todo):
                rows[i] = _compile_index(i)
                if progress:
                    progress(f"[{n + 1}/{len(todo)}] {rows[i]['kernel']} {rows[i]['candidate']}")
        for (i, key) in todo:
            if "error" not in rows[i]:
                cache[key] = {k: v for k, v in rows[i].items()
                              if k not in variants[i].labels and k != "cached"}
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return rows  # type: ignore[return-value]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS)
                     + (f" ERROR {r['error']}" if "error" in r else "") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ci", action="store_true", help="only the variants CI checks (see ci_variants)")
    parser.add_argument("--json", default=None, help="write the rows here (default: bench/results/...)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--no-cuda", dest="cuda", action="store_false", help="skip the nvcc kernels")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="compile everything again")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    variants = ci_variants() if args.ci else all_variants()
    cache_path = CACHE_DIR / "cache.json" if args.cache else None
    print(f"{len(variants)} Triton variants for sm_90", file=sys.stderr, flush=True)
    rows = compile_all(variants, jobs=args.jobs, cache_path=cache_path,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
    cuda_note = None
    if args.cuda:
        cuda_cache = load_cache(CACHE_DIR / "cuda_cache.json") if args.cache else {}
        cuda, cuda_note = cuda_rows(cuda_cache)
        rows += cuda
        if args.cache and cuda:
            (CACHE_DIR / "cuda_cache.json").parent.mkdir(parents=True, exist_ok=True)
            (CACHE_DIR / "cuda_cache.json").write_text(json.dumps(cuda_cache, indent=1) + "\n")
    elapsed = time.perf_counter() - t0
    report = dict(target="sm_90 (Hopper)", triton=triton.__version__, torch=torch.__version__,
                  smem_limit_bytes=HOPPER_SMEM_BYTES, seconds=round(elapsed, 1), cuda_note=cuda_note,
                  compiled=sum(1 for r in rows if r.get("cached") is False), rows=rows)
    path = Path(args.json) if args.json else REPO / "bench" / "results" / (
        "kernel_resources-sm90" + ("-ci" if args.ci else "") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(rows))
    print(f"\n{len(rows)} rows in {elapsed:.0f} s ({report['compiled']} compiled, the rest cached); "
          f"wrote {path}",
          file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
