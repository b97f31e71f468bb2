"""SAGAN generator: z (and class) -> image in [-1, 1], 32 to 256 px."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.spectral_norm import fuse_spectral_norms
from .blocks import GBlock, LayerFactory, check_condition, make_attention
from .config import (BOTTOM_RESOLUTION, G_CHANNEL_MULTIPLIERS, ModelConfig, call_arguments,
                     check_architecture, generator_block_resolutions)


class Generator(nn.Module):
    """SAGAN generator with residual up-sampling blocks (BigGAN-style SAGAN).

    z (B, z_dim) -> SN linear -> (16ch or 4ch) x 4 x 4 -> up-sampling blocks (attention after the
    block whose output is ``attn_resolution`` px) -> BN -> ReLU -> SN conv3 -> tanh.
    Class-conditional batch norm in every block when ``n_classes > 0``.

    ``sn_impl``: "sagan_fast" (ours, all SN weights updated together once per weight update),
    "torch" (``torch.nn.utils.parametrizations.spectral_norm``), "none". ``attention_impl``:
    "sagan_fast" (our op, ``attention_backend`` picks its kernels), "sdpa" or "naive" (plain
    PyTorch baselines with the same parameters). ``init``: "ortho" or "xavier". From a typed
    config: :meth:`from_config`. Bad arguments: one :class:`~sagan_fast.models.ConfigError`
    (a ValueError) naming the argument, from :func:`~sagan_fast.models.config.check_architecture`.
    """

    def __init__(self, resolution: int = 128, ch: int = 64, z_dim: int = 128, n_classes: int = 0,
                 attn_resolution: int | None = 32, image_channels: int = 3, sn_impl: str = "sagan_fast",
                 attention_backend: str | None = None, init: str = "ortho",
                 attention_impl: str = "sagan_fast", sn_backend: str | None = None) -> None:
        super().__init__()
        self.config = call_arguments(Generator.__init__, locals())
        check_architecture("G", **self.config)
        self.resolution, self.z_dim, self.n_classes = resolution, z_dim, n_classes
        layers = LayerFactory(sn_impl, init, sn_backend=sn_backend)
        channels = [m * ch for m in G_CHANNEL_MULTIPLIERS[resolution]]
        self.bottom_channels = channels[0]
        self.linear = layers.linear(z_dim, channels[0] * BOTTOM_RESOLUTION ** 2)
        self.blocks = nn.ModuleList()
        self.attention = None
        for i, res in enumerate(generator_block_resolutions(resolution)):
            self.blocks.append(GBlock(channels[i], channels[i + 1], layers, n_classes))
            if attn_resolution and res == attn_resolution:
                self.attention = make_attention(channels[i + 1], layers, attention_impl, attention_backend)
                self.attention_after = i
        self.output_bn = nn.BatchNorm2d(channels[-1])
        self.output_conv = layers.conv(channels[-1], image_channels, 3)
        if sn_impl == "sagan_fast":
            fuse_spectral_norms(self)

    @classmethod
    def from_config(cls, config: ModelConfig, image_channels: int | None = None) -> "Generator":
        """The generator ``config`` describes; ``image_channels``: the data's, where the config
        leaves it None (``ModelConfig(**saved["config"]["model"])`` of a checkpoint, say)."""
        return cls(**config.model_kwargs("G", image_channels))

    @staticmethod
    def image_channels_in(state_dict: dict[str, torch.Tensor]) -> int:
        """The image channels of the generator that wrote ``state_dict`` (its output conv's rows)."""
        for key in ("output_conv.parametrizations.weight.original", "output_conv.weight"):
            if key in state_dict:
                return int(state_dict[key].shape[0])
        raise KeyError("not a sagan_fast Generator state dict: no output_conv weight")

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim != 2
                or z.shape[1] != self.z_dim):
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"Generator: z must be a float tensor of shape (B, {self.z_dim}), got {shape}")
        check_condition(y, z.shape[0], self.n_classes, "Generator")
        h = self.linear(z).view(z.shape[0], self.bottom_channels, BOTTOM_RESOLUTION, BOTTOM_RESOLUTION)
        for i, block in enumerate(self.blocks):
            h = block(h, y)
            if self.attention is not None and i == self.attention_after:
                h = self.attention(h)
        h = self.output_conv(F.relu(self.output_bn(h)))
        return torch.tanh(h)
