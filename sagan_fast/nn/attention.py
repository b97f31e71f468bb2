"""SelfAttention2d: SAGAN's self-attention block over a feature map, on our attention op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import reference
from ..ops.attention import sagan_attention
from .spectral_norm import spectral_norm


class SelfAttention2d(nn.Module):
    """y = x + gamma * o, o = attention of f = Wq x (queries) over g = Wk x (keys), h = Wv x (values).

    Paper form by default (Zhang et al. 2018): E = C/8 query/key channels, ``value_channels``
    (default C) value channels, no pooling, no output conv (then ``value_channels`` must equal C).
    BigGAN form: ``pool_keys=True`` (2x2 max-pool of keys and values, Nk = N/4),
    ``value_channels=C//2``, ``out_conv=True`` (1x1 conv back to C). Every 1x1 conv is spectrally
    normalized (``sn=False`` to turn it off) and bias-free; ``gamma`` starts at 0 so the block is the
    identity at initialization. ``backend`` picks the attention kernels (None: SAGAN_FAST_BACKEND)
    and, unless ``sn_backend`` says otherwise, the spectral-norm kernels of the convs.

    ``forward(x, return_attention=True)`` returns ``(y, attention)`` with the (B, N, Nk) softmax map
    (row i: query position i over the key positions), as SAGAN code that plots attention expects.
    That call runs the plain-PyTorch reference attention, which materializes the map; the fused
    kernels never do, so ask for it only where you look at it.
    """

    def __init__(self, channels: int, value_channels: int | None = None, pool_keys: bool = False,
                 out_conv: bool = False, key_channels: int | None = None, sn: bool = True,
                 backend: str | None = None, eps: float = 1e-12, *, sn_backend: str | None = None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        key_channels = key_channels or max(channels // 8, 1)
        value_channels = value_channels or channels
        if key_channels < 1 or value_channels < 1:
            raise ValueError(f"SelfAttention2d: key_channels and value_channels must be positive, got "
                             f"{key_channels} and {value_channels}")
        if not out_conv and value_channels != channels:
            raise ValueError(
                f"SelfAttention2d({channels}): value_channels={value_channels} needs out_conv=True (a 1x1 "
                f"conv that maps the {value_channels} value channels back to {channels}); pass "
                f"value_channels={channels} (or leave it out) for the paper's block, or out_conv=True for "
                f"BigGAN's (usually with value_channels={max(channels // 2, 1)} and pool_keys=True)")
        self.channels, self.key_channels, self.value_channels = channels, key_channels, value_channels
        self.pool_keys, self.backend = pool_keys, backend
        sn_backend = backend if sn_backend is None else sn_backend
        wrap = (lambda m: spectral_norm(m, eps=eps, backend=sn_backend)) if sn else (lambda m: m)
        self.query = wrap(nn.Conv2d(channels, key_channels, 1, bias=False))
        self.key = wrap(nn.Conv2d(channels, key_channels, 1, bias=False))
        self.value = wrap(nn.Conv2d(channels, value_channels, 1, bias=False))
        self.out = wrap(nn.Conv2d(value_channels, channels, 1, bias=False)) if out_conv else None
        self.gamma = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, key_channels={self.key_channels}, "
                f"value_channels={self.value_channels}, pool_keys={self.pool_keys}, "
                f"out_conv={self.out is not None}")

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SelfAttention2d({self.channels}) expects (B, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        B, C, H, W = x.shape
        if self.pool_keys and (H < 2 or W < 2):
            raise ValueError(f"pool_keys needs maps of at least 2x2, got {H}x{W}")
        f, g, h = self._project(x)
        # (B, E, N) -> (B, N, E) as strided views: the kernels read the channel-major layout
        # (and channel slices of the fused projection) in place.
        q = f.flatten(2).transpose(1, 2)
        k = g.flatten(2).transpose(1, 2)
        v = h.flatten(2).transpose(1, 2)
        attention = None
        if return_attention:
            attention = reference.sagan_attention_weights(q, k)  # (B, N, Nk); SAGAN: no scale
            o = torch.bmm(attention, v)
        else:
            o = sagan_attention(q, k, v, backend=self.backend)          # (B, N, Ev)
        # Free for the Triton backend: its output is channel-major when v is.
        o = o.transpose(1, 2).reshape(B, self.value_channels, H, W)
        if self.out is not None:
            o = self.out(o)
        if x.dtype == o.dtype == self.gamma.dtype:
            # x + gamma * o in one elementwise pass (one kernel instead of a multiply and an add).
            y = torch.addcmul(x, self.gamma, o)
        else:
            # Mixed dtypes (autocast): CUDA autocast "promotes" addcmul to the widest input, gamma's
            # fp32, where x + gamma * o keeps the activations' dtype (gamma is 0-dim).
            y = x + self.gamma * o
        return (y, attention) if return_attention else y

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f, g, h (g and h pooled in the BigGAN form) with as few passes over x as possible.

        Plain bias-free 1x1 convs (spectrally normalized or not) are fused: one conv with the
        concatenated (normalized) weights for f, g, h, or one for f and one for [g, h] when keys
        and values are pooled (so the pool runs once, on a dense tensor). ``split`` keeps the
        backward to one concatenation. Any other projection module is called as it is.
        """
        convs = (self.query, self.key, self.value)
        if not all(_is_plain_1x1_conv(c) for c in convs):
            f, g, h = (c(x) for c in convs)
            if self.pool_keys:
                g, h = F.max_pool2d(g, 2), F.max_pool2d(h, 2)
            return f, g, h
        E, Ev = self.key_channels, self.value_channels
        w_query, w_key, w_value = (c.weight for c in convs)   # SN parametrizations run here
        if self.pool_keys:
            f = F.conv2d(x, w_query)
            g, h = F.max_pool2d(F.conv2d(x, torch.cat([w_key, w_value])), 2).split([E, Ev], dim=1)
            return f, g, h
        f, g, h = F.conv2d(x, torch.cat([w_query, w_key, w_value])).split([E, E, Ev], dim=1)
        return f, g, h


def _is_plain_1x1_conv(module: nn.Module) -> bool:
    """An nn.Conv2d (not a subclass with its own forward) computing exactly F.conv2d(x, weight)."""
    return (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and module.bias is None and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1
            and not module._forward_hooks and not module._forward_pre_hooks)
