"""Backend choice for every op in :mod:`sagan_fast.ops`.

Each op takes ``backend=`` with one of ``auto``, ``reference``, ``triton``, ``cuda``; ``None`` means
"whatever the environment variable ``SAGAN_FAST_BACKEND`` says" (default ``auto``).

- ``reference``: plain PyTorch (:mod:`sagan_fast.ops.reference`), any device, the ground truth.
- ``triton``: our Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``cuda``: the compiled extension ``sagan_fast._C`` (CUDA kernels for CUDA tensors, its C++
  implementation for CPU tensors).
- ``auto``: the fastest available for the tensors at hand; CPU tensors use ``reference``.

Forcing a backend that cannot run raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV_VAR = "SAGAN_FAST_BACKEND"
BACKENDS = ("auto", "reference", "triton", "cuda")


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """What every backend accumulates in and returns statistics (sigma, logsumexp) as: float32 for
    16- and 32-bit inputs, float64 for float64 (complex stays complex, at least complex64). For
    several dtypes (the sigmas of a list of weights, returned as one tensor), the widest of theirs."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


class BackendUnavailableError(RuntimeError):
    """A backend was forced (argument or ``SAGAN_FAST_BACKEND``) that cannot run these inputs."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break the reference path
        return f"'import triton' failed: {exc!r}"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_extension_import_error() -> str | None:
    try:
        import sagan_fast._C  # noqa: F401
    except ImportError as exc:
        return (f"the compiled extension sagan_fast._C is not built ({exc}); "
                "build it with `pip install -e . --no-build-isolation`")
    return None


def cuda_extension_has_cuda() -> bool:
    """True when sagan_fast._C was built with its CUDA kernels (not only the C++ CPU ops)."""
    if _cuda_extension_import_error() is not None:
        return False
    import sagan_fast._C as C
    return bool(getattr(C, "built_with_cuda", lambda: False)())


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        source = "backend=" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"unknown backend {name!r} (from {source}); expected one of {BACKENDS}")
    return name


def _device_of(tensors) -> torch.device:
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def why_unavailable(backend: str, device: torch.device, op: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason in words."""
    if backend == "reference":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        return (f"Triton kernels need CUDA tensors (got {device.type}); on a CPU set "
                "TRITON_INTERPRET=1 before importing sagan_fast to run them in the interpreter")
    if backend == "cuda":
        err = _cuda_extension_import_error()
        if err:
            return err
        if device.type == "cuda" and not cuda_extension_has_cuda():
            return "sagan_fast._C was built without CUDA (CPU-only build); rebuild on a CUDA machine"
        if device.type not in ("cpu", "cuda"):
            return f"sagan_fast._C has no implementation for device {device.type}"
        import sagan_fast._C as C
        has_op = getattr(C, "has_op", None)
        if has_op is not None and not has_op(op):
            return f"sagan_fast._C does not implement {op}"
        return None
    raise ValueError(backend)


def resolve_backend(backend: str | None, *tensors, op: str) -> str:
    """The concrete backend ('reference' | 'triton' | 'cuda') that will run ``op`` on ``tensors``."""
    name = requested_backend(backend)
    device = _device_of(tensors)
    if name != "auto":
        reason = why_unavailable(name, device, op)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op}: {reason}")
        return name
    if device.type != "cuda":
        return "reference"
    # Ranked fastest first; the ranking per op is set from bench/ results on H100.
    for candidate in AUTO_ORDER.get(op, ("triton", "cuda")):
        if why_unavailable(candidate, device, op) is None:
            return candidate
    return "reference"


# Which compiled backend `auto` prefers for each op on CUDA tensors, fastest first, to be set from
# bench/ results. Not yet measured side by side on a GPU: Triton first for every op. The CUDA C++
# attention (per-warp WMMA, no wgmma) joins only when bench/attention.py measures it at or below the
# naive PyTorch path on a GPU; until then `auto` without Triton uses the reference (naive) path.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "spectral_norm_power_iteration": ("triton", "cuda"),
    "spectral_norm_normalize": ("triton", "cuda"),
    "sagan_attention": ("triton",),
}
