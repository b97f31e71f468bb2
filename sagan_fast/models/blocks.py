"""Building blocks of the SAGAN models: layer factory (init + SN), residual blocks, attention.

The architecture is BigGAN's residual SAGAN (Brock et al. 2018, the "SAGAN" configuration of
BigGAN-PyTorch) without hierarchical z or shared class embedding: G blocks are
BN-ReLU-up-conv3-BN-ReLU-conv3 with a 1x1 shortcut; D blocks are (ReLU)-conv3-ReLU-conv3-pool with a
1x1 shortcut. Every conv / linear / embedding weight goes through :class:`LayerFactory`, which
initializes it and then applies the chosen spectral norm, so one switch (``sn_impl``) changes SN
everywhere, attention convs included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import SelfAttention2d
from ..nn.layers import ConditionalBatchNorm2d, check_class_labels
from ..nn.spectral_norm import spectral_norm as sagan_fast_spectral_norm
from .config import ATTENTION_IMPLS, INITS, PLAIN_ATTENTION_IMPLS, SN_IMPLS, check_choice


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (SN's u, v are buffers, so not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_condition(y: torch.Tensor | None, batch: int, n_classes: int, where: str) -> None:
    """Class labels ``y`` are given exactly when the model is class-conditional, and valid."""
    if n_classes > 0:
        if y is None:
            raise ValueError(f"{where}: this model is class-conditional (n_classes={n_classes}); "
                             "pass y, a LongTensor (B,) of class indices")
        check_class_labels(y, batch, n_classes, where)
    elif y is not None:
        raise ValueError(f"{where}: y was given but this model is unconditional (n_classes=0)")


class LayerFactory:
    """Makes conv / linear / embedding layers: initialized first, then spectrally normalized.

    Initializing before SN is registered matters: SN's u, v are warmed up (15 power iterations, as
    torch) on the weight it sees at registration, so they start matched to the final init.
    """

    def __init__(self, sn_impl: str = "sagan_fast", init: str = "ortho", sn_eps: float = 1e-12,
                 sn_backend: str | None = None) -> None:
        check_choice("sn_impl", sn_impl, SN_IMPLS)
        check_choice("init", init, INITS)
        self.sn_impl, self.init, self.sn_eps, self.sn_backend = sn_impl, init, sn_eps, sn_backend

    def finish(self, module: nn.Module) -> nn.Module:
        """Initialize ``module.weight`` (bias to 0) and apply the spectral norm."""
        with torch.no_grad():
            if self.init == "ortho":
                nn.init.orthogonal_(module.weight)
            else:
                nn.init.xavier_uniform_(module.weight)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        if self.sn_impl == "sagan_fast":
            sagan_fast_spectral_norm(module, eps=self.sn_eps, backend=self.sn_backend)
        elif self.sn_impl == "torch":
            nn.utils.parametrizations.spectral_norm(module, eps=self.sn_eps)
        return module

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Module:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        return self.finish(conv)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return self.finish(nn.Linear(in_features, out_features, bias=bias))

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return self.finish(nn.Embedding(num_embeddings, embedding_dim))


def make_batch_norm(channels: int, n_classes: int) -> nn.Module:
    return ConditionalBatchNorm2d(channels, n_classes) if n_classes > 0 else nn.BatchNorm2d(channels)


class GBlock(nn.Module):
    """Up-sampling residual block: x -> BN-ReLU-up2-conv3-BN-ReLU-conv3 + conv1(up2(x))."""

    def __init__(self, in_channels: int, out_channels: int, layers: LayerFactory, n_classes: int = 0) -> None:
        super().__init__()
        self.conditional = n_classes > 0
        self.bn1 = make_batch_norm(in_channels, n_classes)
        self.conv1 = layers.conv(in_channels, out_channels, 3)
        self.bn2 = make_batch_norm(out_channels, n_classes)
        self.conv2 = layers.conv(out_channels, out_channels, 3)
        self.shortcut = layers.conv(in_channels, out_channels, 1)

    def _bn(self, bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return bn(x, y) if self.conditional else bn(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self._bn(self.bn1, x, y))
        h = self.conv1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.conv2(F.relu(self._bn(self.bn2, h, y)))
        # 1x1 conv then nearest up-sampling equals the reverse order, at a quarter of the cost.
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


class DBlock(nn.Module):
    """Residual block: (ReLU)-conv3-ReLU-conv3-(avgpool2) + shortcut (1x1 conv when shapes change).

    The first block of D sees the image, so it has no leading ReLU and pools before its shortcut
    conv (BigGAN's "optimized" first block); the others pre-activate and convolve before pooling.
    """

    def __init__(self, in_channels: int, out_channels: int, layers: LayerFactory, *,
                 preactivation: bool, downsample: bool) -> None:
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1 = layers.conv(in_channels, out_channels, 3)
        self.conv2 = layers.conv(out_channels, out_channels, 3)
        learnable_shortcut = in_channels != out_channels or downsample
        self.shortcut = layers.conv(in_channels, out_channels, 1) if learnable_shortcut else None

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        if self.shortcut is None:
            return h + x
        if self.preactivation:
            return h + self._pool(self.shortcut(x))
        return h + self.shortcut(self._pool(x))


class PlainSelfAttention2d(SelfAttention2d):
    """:class:`SelfAttention2d` (same parameters and state dict) on plain PyTorch attention.

    For baselines: ``impl="sdpa"`` uses ``F.scaled_dot_product_attention`` (scale 1, as SAGAN),
    ``impl="naive"`` materializes the (N, Nk) matrix with bmm + softmax.
    """

    def __init__(self, channels: int, impl: str = "sdpa", **kwargs) -> None:
        check_choice("impl", impl, PLAIN_ATTENTION_IMPLS)
        super().__init__(channels, **kwargs)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SelfAttention2d({self.channels}) expects (B, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        B, C, H, W = x.shape
        g, h = self.key(x), self.value(x)
        if self.pool_keys:
            g, h = F.max_pool2d(g, 2), F.max_pool2d(h, 2)
        q = self.query(x).flatten(2).transpose(1, 2)
        k, v = g.flatten(2).transpose(1, 2), h.flatten(2).transpose(1, 2)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            o = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)
        o = o.transpose(1, 2).reshape(B, self.value_channels, H, W)
        if self.out is not None:
            o = self.out(o)
        return x + self.gamma * o


def make_attention(channels: int, layers: LayerFactory, impl: str = "sagan_fast",
                   backend: str | None = None) -> SelfAttention2d:
    """SAGAN paper form (E = C/8, values C, no pooling, no output conv), SN as the factory says."""
    check_choice("attention_impl", impl, ATTENTION_IMPLS)
    if impl == "sagan_fast":
        attention = SelfAttention2d(channels, sn=False, backend=backend)
    else:
        attention = PlainSelfAttention2d(channels, impl=impl, sn=False)
    for conv in (attention.query, attention.key, attention.value, attention.out):
        if conv is not None:
            layers.finish(conv)
    return attention
