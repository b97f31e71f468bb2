"""SAGAN discriminator: image (and class) -> one logit per image, 32 to 256 px, projection D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.spectral_norm import fuse_spectral_norms
from .blocks import DBlock, LayerFactory, check_condition, make_attention
from .config import (D_ARCH, ModelConfig, call_arguments, check_architecture,
                     discriminator_block_resolutions)


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
        self.config = call_arguments(Discriminator.__init__, locals())
        check_architecture("D", **self.config)
        self.resolution, self.n_classes, self.image_channels = resolution, n_classes, image_channels
        layers = LayerFactory(sn_impl, init, sn_backend=sn_backend)
        self.blocks = nn.ModuleList()
        self.attention = None
        in_channels = image_channels
        resolutions = discriminator_block_resolutions(resolution)
        for i, ((mult, down), res) in enumerate(zip(D_ARCH[resolution], resolutions)):
            out_channels = mult * ch
            self.blocks.append(DBlock(in_channels, out_channels, layers, preactivation=i > 0,
                                      downsample=down))
            if attn_resolution and res == attn_resolution and self.attention is None:
                self.attention = make_attention(out_channels, layers, attention_impl, attention_backend)
                self.attention_after = i
            in_channels = out_channels
        self.linear = layers.linear(in_channels, 1)
        self.embedding = layers.embedding(n_classes, in_channels) if n_classes > 0 else None
        if sn_impl == "sagan_fast":
            fuse_spectral_norms(self)

    @classmethod
    def from_config(cls, config: ModelConfig, image_channels: int | None = None) -> "Discriminator":
        """The discriminator ``config`` describes; ``image_channels`` as in ``Generator.from_config``."""
        return cls(**config.model_kwargs("D", image_channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        R, C = self.resolution, self.image_channels
        if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4
                or x.shape[1:] != (C, R, R)):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Discriminator: x must be a float tensor of shape (B, {C}, {R}, {R}), "
                             f"got {shape}")
        check_condition(y, x.shape[0], self.n_classes, "Discriminator")
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
