"""SAGAN models: :class:`Generator` and :class:`Discriminator` for 32, 64, 128 and 256 px."""

from .blocks import ATTENTION_IMPLS, INITS, SN_IMPLS, count_parameters
from .discriminator import D_ARCH, Discriminator
from .generator import G_CHANNEL_MULTIPLIERS, Generator

SUPPORTED_RESOLUTIONS = tuple(sorted(G_CHANNEL_MULTIPLIERS))

__all__ = [
    "ATTENTION_IMPLS", "D_ARCH", "Discriminator", "G_CHANNEL_MULTIPLIERS", "Generator", "INITS",
    "SN_IMPLS", "SUPPORTED_RESOLUTIONS", "count_parameters",
]
