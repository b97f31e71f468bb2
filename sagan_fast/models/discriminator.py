"""SAGAN discriminator: image (and class) -> one logit per image, 32 to 256 px, projection D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import check_class_labels
from ..nn.spectral_norm import fuse_spectral_norms
from .blocks import ATTENTION_IMPLS, DBlock, LayerFactory, check_choice, make_attention
from .generator import check_attention_resolution, check_resolution

# (channel multiplier of ch, down-sample?) per block, mirroring G (BigGAN-PyTorch's D_arch). One
# deliberate change at 32 px: BigGAN down-samples in the first block (no 32x32 feature map), so the
# default attn_resolution=32 would have nowhere to go; here the first block keeps 32x32.
D_ARCH = {
    32: ((4, False), (4, True), (4, True), (4, False)),
    64: ((1, True), (2, True), (4, True), (8, True), (16, False)),
    128: ((1, True), (2, True), (4, True), (8, True), (16, True), (16, False)),
    256: ((1, True), (2, True), (4, True), (8, True), (8, True), (16, True), (16, False)),
}


def discriminator_block_resolutions(resolution: int) -> list[int]:
    """Output resolution of each D block."""
    out, res = [], resolution
    for _, down in D_ARCH[resolution]:
        res = res // 2 if down else res
        out.append(res)
    return out


class Discriminator(nn.Module):
    """SAGAN discriminator with residual down-sampling blocks and a projection head.

    x (B, C, R, R) -> blocks (attention after the block whose output is ``attn_resolution`` px) ->
    ReLU -> sum over space -> SN linear, plus ``<embed(y), h>`` (projection discriminator, Miyato &
    Koyama 2018) when ``n_classes > 0``. Returns float32 logits (B,), also under autocast, so the
    hinge loss is computed in float32. Arguments as :class:`~sagan_fast.models.Generator`.
    """

    def __init__(self, resolution: int = 128, ch: int = 64, n_classes: int = 0,
                 attn_resolution: int | None = 32, image_channels: int = 3, sn_impl: str = "sagan_fast",
                 attention_backend: str | None = None, init: str = "ortho",
                 attention_impl: str = "sagan_fast", sn_backend: str | None = None) -> None:
        super().__init__()
        check_resolution(resolution, D_ARCH)
        check_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
        for name, value in (("ch", ch), ("image_channels", image_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(n_classes, int) or n_classes < 0:
            raise ValueError(f"n_classes must be an int >= 0 (0: unconditional), got {n_classes!r}")
        resolutions = discriminator_block_resolutions(resolution)
        check_attention_resolution(attn_resolution, resolutions, "Discriminator")
        self.config = dict(resolution=resolution, ch=ch, n_classes=n_classes, attn_resolution=attn_resolution,
                           image_channels=image_channels, sn_impl=sn_impl, attention_backend=attention_backend,
                           init=init, attention_impl=attention_impl, sn_backend=sn_backend)
        self.resolution, self.n_classes, self.image_channels = resolution, n_classes, image_channels
        layers = LayerFactory(sn_impl, init, sn_backend=sn_backend)
        self.blocks = nn.ModuleList()
        self.attention = None
        in_channels = image_channels
        for i, ((mult, down), res) in enumerate(zip(D_ARCH[resolution], resolutions)):
            out_channels = mult * ch
            self.blocks.append(DBlock(in_channels, out_channels, layers, preactivation=i > 0, downsample=down))
            if attn_resolution and res == attn_resolution and self.attention is None:
                self.attention = make_attention(out_channels, layers, attention_impl, attention_backend)
                self.attention_after = i
            in_channels = out_channels
        self.linear = layers.linear(in_channels, 1)
        self.embedding = layers.embedding(n_classes, in_channels) if n_classes > 0 else None
        if sn_impl == "sagan_fast":
            fuse_spectral_norms(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        R, C = self.resolution, self.image_channels
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[1:] != (C, R, R):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Discriminator: x must be a float tensor of shape (B, {C}, {R}, {R}), got {shape}")
        if self.n_classes > 0:
            if y is None:
                raise ValueError(f"Discriminator: this model is class-conditional (n_classes={self.n_classes}); "
                                 "pass y, a LongTensor (B,) of class indices")
            check_class_labels(y, x.shape[0], self.n_classes, "Discriminator")
        elif y is not None:
            raise ValueError("Discriminator: y was given but this model is unconditional (n_classes=0)")
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if self.attention is not None and i == self.attention_after:
                h = self.attention(h)
        h = F.relu(h).sum(dim=(2, 3))
        out = self.linear(h).squeeze(1)
        if self.embedding is not None:
            out = out + (self.embedding(y) * h).sum(dim=1)
        return out.float()
