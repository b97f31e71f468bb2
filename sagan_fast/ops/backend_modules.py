"""Which module implements each backend of each op family (the one backend lookup).

Kept apart from :mod:`sagan_fast.ops._backend` (availability and choice), which the backend
modules themselves import: this module imports them, so it must not be imported by them.
"""

from __future__ import annotations


def backend_module(name: str, family: str):
    """The module of backend ``name`` ('reference' | 'triton' | 'cuda') for the op ``family``
    ('attention' | 'spectral_norm'). Each offers the same functions - attention:
    ``sagan_attention(q, k, v, scale)``; spectral_norm: ``power_iteration_(weights, us, vs, dims,
    n_power_iterations, eps)`` and ``normalize(weight, u, v, dim)`` (sigma = u . W v computed from
    the weight itself), the triton module also ``normalize(..., out_dtype)`` and
    ``normalize_multi(weights, us, vs, dims, out_dtypes)``. Import statements, not importlib:
    torch.compile traces them (once the module is loaded) without a graph break."""
    if name == "reference":
        from . import reference_backend as module
    elif name == "cuda":
        from . import cuda as module
    elif name == "triton" and family == "attention":
        from .triton import attention as module
    elif name == "triton" and family == "spectral_norm":
        from .triton import spectral_norm as module
    else:
        raise ValueError(f"no backend module for ({name!r}, {family!r})")
    return module
