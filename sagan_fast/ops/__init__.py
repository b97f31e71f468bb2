"""Functional ops with backend dispatch: ``reference`` (plain PyTorch), ``triton``, ``cuda``."""

from ._backend import BACKENDS, ENV_VAR, BackendUnavailableError, resolve_backend
from .attention import sagan_attention
from .spectral_norm import (spectral_norm_normalize, spectral_norm_power_iteration_,
                            spectral_norm_sigma)

__all__ = [
    "BACKENDS", "ENV_VAR", "BackendUnavailableError", "resolve_backend",
    "sagan_attention",
    "spectral_norm_normalize", "spectral_norm_power_iteration_", "spectral_norm_sigma",
]
