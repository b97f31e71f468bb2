"""Spectrally normalized layers and class-conditional batch norm, drop-in for any GAN.

``SNConv2d(...)`` is ``nn.Conv2d(...)`` followed by :func:`sagan_fast.nn.spectral_norm`: same
constructor arguments, plus keyword-only SN arguments (``n_power_iterations``, ``eps``,
``sn_dim``, ``sn_backend``). The weight lives where torch's parametrization puts it
(``parametrizations.weight.original``, ``..._u``, ``..._v``), so state dicts are interchangeable
with ``torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(...))``.
"""

from __future__ import annotations

import torch
from torch import nn

from .spectral_norm import spectral_norm


def _apply_sn(module: nn.Module, n_power_iterations: int, eps: float, sn_dim: int | None,
              sn_backend: str | None) -> None:
    spectral_norm(module, n_power_iterations=n_power_iterations, eps=eps, dim=sn_dim,
                  backend=sn_backend)


class SNConv2d(nn.Conv2d):
    """``nn.Conv2d`` with spectral norm on its weight."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12,
                 sn_dim: int | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, sn_backend)


class SNConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with spectral norm on its weight (dim 1, as torch, by default)."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12,
                 sn_dim: int | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, sn_backend)


class SNLinear(nn.Linear):
    """``nn.Linear`` with spectral norm on its weight."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12,
                 sn_dim: int | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, sn_backend)


class SNEmbedding(nn.Embedding):
    """``nn.Embedding`` with spectral norm on its (num_embeddings, embedding_dim) table."""

    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12,
                 sn_dim: int | None = None, sn_backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _apply_sn(self, n_power_iterations, eps, sn_dim, sn_backend)


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm without affine, then a per-class gain and bias: ``y = gain[c] * BN(x) + bias[c]``.

    The class-embedding form of SAGAN / SNGAN (Miyato's ``CategoricalConditionalBatchNorm``),
    chosen over BigGAN's projection of a shared conditioning vector because SAGAN conditions on
    the class alone. ``gain`` (n_classes, C) starts at 1 and ``bias`` at 0, so at initialization
    this is plain batch norm. The tables are *not* spectrally normalized, on purpose: SN of an
    all-ones gain table would divide every gain by sqrt(n_classes * C), and SN of a zero bias table
    is undefined (sigma = 0). Running statistics are shared by all classes, as in SAGAN.

    forward(x (B, C, H, W), y LongTensor (B,)) -> (B, C, H, W). Class indices are range-checked
    for CPU tensors; on CUDA (where a check would cost a device sync) the indexing kernel's own
    device-side assert catches them.
    """

    def __init__(self, num_features: int, n_classes: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if num_features < 1 or n_classes < 1:
            raise ValueError(f"ConditionalBatchNorm2d needs num_features >= 1 and n_classes >= 1, "
                             f"got {num_features} and {n_classes}")
        self.num_features, self.n_classes = num_features, n_classes
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.gain = nn.Parameter(torch.ones(n_classes, num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(n_classes, num_features, **factory))

    def extra_repr(self) -> str:
        return f"{self.num_features}, n_classes={self.n_classes}"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"ConditionalBatchNorm2d({self.num_features}) expects (B, {self.num_features}, H, W), "
                             f"got {tuple(x.shape)}")
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
        raise ValueError(f"{where}: y must have shape ({batch},) (one class per sample), got {tuple(y.shape)}")
    # Only on CPU: on CUDA this would be a device sync per forward.
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{where}: class indices must be in [0, {n_classes}), got values in [{lo}, {hi}]")
