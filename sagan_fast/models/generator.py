"""SAGAN generator: z (and class) -> image in [-1, 1], 32 to 256 px."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import check_class_labels
from ..nn.spectral_norm import fuse_spectral_norms
from .blocks import ATTENTION_IMPLS, GBlock, LayerFactory, check_choice, make_attention

# Channel multipliers of ch: entry 0 is the 4x4 input of the first block, entry i+1 the output of
# block i, which doubles the resolution (BigGAN-PyTorch's G_arch; 128 px: 16,16,8,4,2,1).
G_CHANNEL_MULTIPLIERS = {
    32: (4, 4, 4, 4),
    64: (16, 16, 8, 4, 2),
    128: (16, 16, 8, 4, 2, 1),
    256: (16, 16, 8, 8, 4, 2, 1),
}
BOTTOM_RESOLUTION = 4


def generator_block_resolutions(resolution: int) -> list[int]:
    """Output resolution of each G block: 8, 16, ..., resolution."""
    n_blocks = len(G_CHANNEL_MULTIPLIERS[resolution]) - 1
    return [BOTTOM_RESOLUTION * 2 ** (i + 1) for i in range(n_blocks)]


def check_resolution(resolution: int, table: dict) -> None:
    if resolution not in table:
        raise ValueError(f"unsupported resolution {resolution}; supported: {sorted(table)}")


def check_attention_resolution(attn_resolution: int | None, available: list[int], model: str) -> None:
    if attn_resolution and attn_resolution not in available:
        raise ValueError(f"{model}: attn_resolution={attn_resolution} is not the output resolution of "
                         f"any block; choose one of {sorted(set(available))} or None/0 to disable attention")


class Generator(nn.Module):
    """SAGAN generator with residual up-sampling blocks (BigGAN-style SAGAN).

    z (B, z_dim) -> SN linear -> (16ch or 4ch) x 4 x 4 -> up-sampling blocks (attention after the
    block whose output is ``attn_resolution`` px) -> BN -> ReLU -> SN conv3 -> tanh.
    Class-conditional batch norm in every block when ``n_classes > 0``.

    ``sn_impl``: "sagan_fast" (ours, all SN weights updated together once per weight update),
    "torch" (``torch.nn.utils.parametrizations.spectral_norm``), "none". ``attention_impl``:
    "sagan_fast" (our op, ``attention_backend`` picks its kernels), "sdpa" or "naive" (plain
    PyTorch baselines with the same parameters). ``init``: "ortho" or "xavier".
    """

    def __init__(self, resolution: int = 128, ch: int = 64, z_dim: int = 128, n_classes: int = 0,
                 attn_resolution: int | None = 32, image_channels: int = 3, sn_impl: str = "sagan_fast",
                 attention_backend: str | None = None, init: str = "ortho",
                 attention_impl: str = "sagan_fast", sn_backend: str | None = None) -> None:
        super().__init__()
        check_resolution(resolution, G_CHANNEL_MULTIPLIERS)
        check_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
        for name, value in (("ch", ch), ("z_dim", z_dim), ("image_channels", image_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(n_classes, int) or n_classes < 0:
            raise ValueError(f"n_classes must be an int >= 0 (0: unconditional), got {n_classes!r}")
        resolutions = generator_block_resolutions(resolution)
        check_attention_resolution(attn_resolution, resolutions, "Generator")
        self.config = dict(resolution=resolution, ch=ch, z_dim=z_dim, n_classes=n_classes,
                           attn_resolution=attn_resolution, image_channels=image_channels, sn_impl=sn_impl,
                           attention_backend=attention_backend, init=init, attention_impl=attention_impl,
                           sn_backend=sn_backend)
        self.resolution, self.z_dim, self.n_classes = resolution, z_dim, n_classes
        layers = LayerFactory(sn_impl, init, sn_backend=sn_backend)
        channels = [m * ch for m in G_CHANNEL_MULTIPLIERS[resolution]]
        self.bottom_channels = channels[0]
        self.linear = layers.linear(z_dim, channels[0] * BOTTOM_RESOLUTION ** 2)
        self.blocks = nn.ModuleList()
        self.attention = None
        for i, res in enumerate(resolutions):
            self.blocks.append(GBlock(channels[i], channels[i + 1], layers, n_classes))
            if attn_resolution and res == attn_resolution:
                self.attention = make_attention(channels[i + 1], layers, attention_impl, attention_backend)
                self.attention_after = i
        self.output_bn = nn.BatchNorm2d(channels[-1])
        self.output_conv = layers.conv(channels[-1], image_channels, 3)
        if sn_impl == "sagan_fast":
            fuse_spectral_norms(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim != 2 or z.shape[1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"Generator: z must be a float tensor of shape (B, {self.z_dim}), got {shape}")
        if self.n_classes > 0:
            if y is None:
                raise ValueError(f"Generator: this model is class-conditional (n_classes={self.n_classes}); "
                                 "pass y, a LongTensor (B,) of class indices")
            check_class_labels(y, z.shape[0], self.n_classes, "Generator")
        elif y is not None:
            raise ValueError("Generator: y was given but this model is unconditional (n_classes=0)")
        h = self.linear(z).view(z.shape[0], self.bottom_channels, BOTTOM_RESOLUTION, BOTTOM_RESOLUTION)
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if self.attention is not None and i == self.attention_after:
                h = self.attention(h)
        h = self.output_conv(F.relu(self.output_bn(h)))
        return torch.tanh(h)
