"""SelfAttention2d: SAGAN's self-attention block over a feature map, on our attention op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import sagan_attention
from .spectral_norm import spectral_norm


class SelfAttention2d(nn.Module):
    """y = x + gamma * o, o = attention of f = Wq x (queries) over g = Wk x (keys), h = Wv x (values).

    Paper form by default (Zhang et al. 2018): E = C/8 query/key channels, ``value_channels``
    (default C) value channels, no pooling, no output conv (then ``value_channels`` must equal C).
    BigGAN form: ``pool_keys=True`` (2x2 max-pool of keys and values, Nk = N/4),
    ``value_channels=C//2``, ``out_conv=True`` (1x1 conv back to C). Every 1x1 conv is spectrally
    normalized (``sn=False`` to turn it off) and bias-free; ``gamma`` starts at 0 so the block is the
    identity at initialization. ``backend`` picks the attention kernels (None: SAGAN_FAST_BACKEND).
    """

    def __init__(self, channels: int, value_channels: int | None = None, pool_keys: bool = False,
                 out_conv: bool = False, key_channels: int | None = None, sn: bool = True,
                 backend: str | None = None, eps: float = 1e-12) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        key_channels = key_channels or max(channels // 8, 1)
        value_channels = value_channels or channels
        if not out_conv and value_channels != channels:
            raise ValueError(f"value_channels ({value_channels}) must equal channels ({channels}) "
                             "without out_conv=True (nothing maps the values back to C channels)")
        self.channels, self.key_channels, self.value_channels = channels, key_channels, value_channels
        self.pool_keys, self.backend = pool_keys, backend
        wrap = (lambda m: spectral_norm(m, eps=eps)) if sn else (lambda m: m)
        self.query = wrap(nn.Conv2d(channels, key_channels, 1, bias=False))
        self.key = wrap(nn.Conv2d(channels, key_channels, 1, bias=False))
        self.value = wrap(nn.Conv2d(channels, value_channels, 1, bias=False))
        self.out = wrap(nn.Conv2d(value_channels, channels, 1, bias=False)) if out_conv else None
        self.gamma = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, key_channels={self.key_channels}, "
                f"value_channels={self.value_channels}, pool_keys={self.pool_keys}, "
                f"out_conv={self.out is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SelfAttention2d({self.channels}) expects (B, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        B, C, H, W = x.shape
        if self.pool_keys and (H < 2 or W < 2):
            raise ValueError(f"pool_keys needs maps of at least 2x2, got {H}x{W}")
        f = self.query(x)
        g = self.key(x)
        h = self.value(x)
        if self.pool_keys:
            g = F.max_pool2d(g, 2)
            h = F.max_pool2d(h, 2)
        # (B, E, N) -> (B, N, E) as strided views: the kernels read the channel-major layout.
        q = f.flatten(2).transpose(1, 2)
        k = g.flatten(2).transpose(1, 2)
        v = h.flatten(2).transpose(1, 2)
        o = sagan_attention(q, k, v, backend=self.backend)          # (B, N, Ev)
        o = o.transpose(1, 2).reshape(B, self.value_channels, H, W)
        if self.out is not None:
            o = self.out(o)
        return x + self.gamma * o
