"""SAGAN models: :class:`Generator` and :class:`Discriminator` for 32, 64, 128 and 256 px.

Built from keywords (``Generator(resolution=128, ch=64, ...)``) or from a typed
:class:`ModelConfig` (``Generator.from_config(cfg, image_channels)``, or both at once with
:func:`build_models`).
"""

from __future__ import annotations

from .blocks import count_parameters
from .config import (ATTENTION_IMPLS, D_ARCH, G_CHANNEL_MULTIPLIERS, INITS, RESOLUTIONS, SN_IMPLS,
                     ConfigError, ModelConfig)
from .discriminator import Discriminator
from .generator import Generator

SUPPORTED_RESOLUTIONS = RESOLUTIONS


def build_models(config: ModelConfig, image_channels: int | None = None) -> tuple[Generator, Discriminator]:
    """G and D as ``config`` describes them (``image_channels``: the data's, where the config leaves
    it None). Seed torch first for a reproducible init: G is built, then D, from the global generator."""
    return Generator.from_config(config, image_channels), Discriminator.from_config(config, image_channels)


__all__ = [
    "ATTENTION_IMPLS", "ConfigError", "D_ARCH", "Discriminator", "G_CHANNEL_MULTIPLIERS", "Generator",
    "INITS", "ModelConfig", "RESOLUTIONS", "SN_IMPLS", "SUPPORTED_RESOLUTIONS", "build_models",
    "count_parameters",
]
