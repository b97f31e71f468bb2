"""Spectrally normalized layers and conditional batch norm, drop-in for any GAN.

``SNConv2d(...)`` is ``nn.Conv2d(...)`` followed by :func:`sagan_fast.nn.spectral_norm`: same
constructor arguments, plus keyword-only SN arguments (``n_power_iterations``, ``eps``,
``sn_dim``, and ``backend`` - also accepted as ``sn_backend`` - for the SN kernels). The weight
lives where torch's parametrization puts it (``parametrizations.weight.original``, ``..._u``,
``..._v``), so state dicts are interchangeable with
``torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(...))``.
"""

from __future__ import annotations

import torch
from torch import nn

from .spectral_norm import spectral_norm


def resolve_sn_backend(backend: str | None, sn_backend: str | None, where: str) -> str | None:
    """``backend=`` and its older spelling ``sn_backend=`` name the same thing; both given and
    different is an error, not a silent choice."""
    if backend is not None and sn_backend is not None and backend != sn_backend:
        raise ValueError(f"{where}: backend={backend!r} and sn_backend={sn_backend!r} disagree; "
                         "pass one of them (they are the same argument)")
    return backend if backend is not None else sn_backend


def _apply_sn(module: nn.Module, n_power_iterations: int, eps: float, sn_dim: int | None,
              backend: str | None, sn_backend: str | None) -> None:
    spectral_norm(module, n_power_iterations=n_power_iterations, eps=eps, dim=sn_dim,
                  backend=resolve_sn_backend(backend, sn_backend, type(module).__name__))


class SNConv2d(nn.Conv2d):
    """``nn.Conv2d`` with spectral norm on its weight."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12, sn_dim: int | None = None,
                 backend: str | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, backend, sn_backend)


class SNConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with spectral norm on its weight (dim 1, as torch, by default)."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12, sn_dim: int | None = None,
                 backend: str | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, backend, sn_backend)


class SNLinear(nn.Linear):
    """``nn.Linear`` with spectral norm on its weight."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12, sn_dim: int | None = None,
                 backend: str | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, backend, sn_backend)


class SNEmbedding(nn.Embedding):
    """``nn.Embedding`` with spectral norm on its (num_embeddings, embedding_dim) table."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12, sn_dim: int | None = None,
                 backend: str | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, backend, sn_backend)


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm without affine, then a per-sample gain and bias: ``y = gain * BN(x) + bias``.

    Two conditioning forms, chosen by what ``forward`` gets (either or both may be set up):

    - class indices (``n_classes``): a gain and a bias row per class, SAGAN / SNGAN's form
      (Miyato's ``CategoricalConditionalBatchNorm``). ``gain`` (n_classes, C) starts at 1 and
      ``bias`` at 0, so at initialization this is plain batch norm. The tables are *not* spectrally
      normalized, on purpose: SN of an all-ones gain table would divide every gain by
      sqrt(n_classes * C), and SN of a zero bias table is undefined (sigma = 0).
    - a float conditioning vector (``cond_dim``): BigGAN's form, ``gain = 1 + cond_gain(c)``,
      ``bias = cond_bias(c)``, both :class:`SNLinear` (cond_dim -> C, no bias) maps of the vector
      c (B, cond_dim) (e.g. a shared class embedding concatenated with a chunk of z).
      ``backend`` (or ``sn_backend``) picks their SN kernels.

    Running statistics are shared by all samples, as in SAGAN and BigGAN.

    forward(x (B, C, H, W), y) -> (B, C, H, W), y a LongTensor (B,) of class indices or a float
    (B, cond_dim) vector. Class indices are range-checked for CPU tensors; on CUDA (where a check
    would cost a device sync) the indexing kernel's own device-side assert catches them.
    """

    def __init__(self, num_features: int, n_classes: int = 0, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True, device=None, dtype=None, *, cond_dim: int | None = None,
                 backend: str | None = None, sn_backend: str | None = None) -> None:
        super().__init__()
        if num_features < 1 or (n_classes or 0) < 0 or (cond_dim is not None and cond_dim < 1) \
                or not ((n_classes or 0) >= 1 or cond_dim):
            raise ValueError(f"ConditionalBatchNorm2d needs num_features >= 1 and n_classes >= 1 (class "
                             f"indices) and/or cond_dim >= 1 (a float conditioning vector), got "
                             f"num_features={num_features}, n_classes={n_classes}, cond_dim={cond_dim}")
        self.num_features, self.n_classes, self.cond_dim = num_features, int(n_classes or 0), cond_dim
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        if self.n_classes:
            self.gain = nn.Parameter(torch.ones(self.n_classes, num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(self.n_classes, num_features, **factory))
        if cond_dim:
            sn_backend = resolve_sn_backend(backend, sn_backend, "ConditionalBatchNorm2d")
            self.cond_gain = SNLinear(cond_dim, num_features, bias=False, backend=sn_backend, **factory)
            self.cond_bias = SNLinear(cond_dim, num_features, bias=False, backend=sn_backend, **factory)

    def extra_repr(self) -> str:
        return f"{self.num_features}, n_classes={self.n_classes}, cond_dim={self.cond_dim}"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"ConditionalBatchNorm2d({self.num_features}) expects "
                             f"(B, {self.num_features}, H, W), "
                             f"got {tuple(x.shape)}")
        if isinstance(y, torch.Tensor) and y.is_floating_point():
            if not self.cond_dim:
                raise TypeError("ConditionalBatchNorm2d: y must hold integer class indices (int64 or int32), "
                                f"got dtype {y.dtype}; for a float conditioning vector (BigGAN's form) "
                                "construct it with cond_dim=<vector size>")
            if y.ndim != 2 or y.shape != (x.shape[0], self.cond_dim):
                raise ValueError(f"ConditionalBatchNorm2d: a conditioning vector must have shape "
                                 f"({x.shape[0]}, {self.cond_dim}) (B, cond_dim), got {tuple(y.shape)}")
            out = self.bn(x)
            gain = (1 + self.cond_gain(y)).to(out.dtype)[:, :, None, None]
            bias = self.cond_bias(y).to(out.dtype)[:, :, None, None]
            return out * gain + bias
        if not self.n_classes:
            got = f"dtype {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"ConditionalBatchNorm2d: y must be a float (B, {self.cond_dim}) conditioning "
                            f"vector, got {got}; for class indices construct it with n_classes=<number>")
        check_class_labels(y, x.shape[0], self.n_classes, "ConditionalBatchNorm2d")
        out = self.bn(x)
        gain = self.gain[y].to(out.dtype)[:, :, None, None]
        bias = self.bias[y].to(out.dtype)[:, :, None, None]
        return out * gain + bias


def check_class_labels(y: torch.Tensor, batch: int, n_classes: int, where: str) -> None:
    """Clear errors for class labels: an integer (B,) tensor, in range (checked on CPU only)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{where}: y must be a LongTensor of class indices, got {type(y).__name__}")
    # int64 / int32 only: torch would read a uint8 or bool tensor as a mask, not as indices.
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where}: y must hold integer class indices (int64 or int32), got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != batch:
        raise ValueError(f"{where}: y must have shape ({batch},) (one class per sample), "
                         f"got {tuple(y.shape)}")
    # Only on CPU: on CUDA this would be a device sync per forward.
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{where}: class indices must be in [0, {n_classes}), "
                             f"got values in [{lo}, {hi}]")
