"""A SAGAN architecture as data: the choices, the per-resolution block tables, :class:`ModelConfig`,
and the one check of them all (:func:`check_architecture`).

``ModelConfig`` checks a configuration for both models (training builds both from it);
:class:`~sagan_fast.models.Generator` and :class:`~sagan_fast.models.Discriminator` run the same
check for themselves when built from keywords. A bad value is one :class:`ConfigError` naming the
field, before any layer is built; the command line reports it under the field's flag.

No torch import here beyond what :mod:`sagan_fast.ops` needs, so the training config can import it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ..ops._backend import BACKENDS

SN_IMPLS = ("sagan_fast", "torch", "none")
"""Spectral norm: ours (fused), torch's parametrization, or none."""
PLAIN_ATTENTION_IMPLS = ("sdpa", "naive")
"""Plain-PyTorch self-attention baselines: SDPA, or bmm + softmax."""
ATTENTION_IMPLS = ("sagan_fast",) + PLAIN_ATTENTION_IMPLS
"""Self-attention: our op, or a plain-PyTorch baseline."""
INITS = ("ortho", "xavier")

# Channel multipliers of ch: entry 0 is the 4x4 input of the first G block, entry i+1 the output of
# block i, which doubles the resolution (BigGAN-PyTorch's G_arch; 128 px: 16,16,8,4,2,1).
G_CHANNEL_MULTIPLIERS = {
    32: (4, 4, 4, 4),
    64: (16, 16, 8, 4, 2),
    128: (16, 16, 8, 4, 2, 1),
    256: (16, 16, 8, 8, 4, 2, 1),
}
BOTTOM_RESOLUTION = 4
# (channel multiplier of ch, down-sample?) per D block, mirroring G (BigGAN-PyTorch's D_arch). One
# deliberate change at 32 px: BigGAN down-samples in the first block (no 32x32 feature map), so
# attention at 32 would have nowhere to go; here the first block keeps 32x32.
D_ARCH = {
    32: ((4, False), (4, True), (4, True), (4, False)),
    64: ((1, True), (2, True), (4, True), (8, True), (16, False)),
    128: ((1, True), (2, True), (4, True), (8, True), (16, True), (16, False)),
    256: ((1, True), (2, True), (4, True), (8, True), (8, True), (16, True), (16, False)),
}
RESOLUTIONS = tuple(sorted(G_CHANNEL_MULTIPLIERS))
assert RESOLUTIONS == tuple(sorted(D_ARCH))


def generator_block_resolutions(resolution: int) -> list[int]:
    """Output resolution of each G block: 8, 16, ..., resolution."""
    n_blocks = len(G_CHANNEL_MULTIPLIERS[resolution]) - 1
    return [BOTTOM_RESOLUTION * 2 ** (i + 1) for i in range(n_blocks)]


def discriminator_block_resolutions(resolution: int) -> list[int]:
    """Output resolution of each D block."""
    out, res = [], resolution
    for _, down in D_ARCH[resolution]:
        res = res // 2 if down else res
        out.append(res)
    return out


class ConfigError(ValueError):
    """An invalid configuration value. From a field check, ``field`` names the field and ``problem``
    says what is wrong (the message is ``"field: problem"``); other messages name what they need."""

    def __init__(self, message: str, field: str | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.field, self.problem = field, problem


def fail(field: str, problem: str):
    raise ConfigError(f"{field}: {problem}", field, problem)


def check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(field, f"must be an int, got {value!r}")
    if value < minimum:
        fail(field, f"must be >= {minimum}, got {value}")


def check_choice(field: str, value: Any, choices: tuple, *, optional: bool = False) -> None:
    if not (value in choices or (optional and value is None)):
        fail(field, f"must be one of {choices}, got {value!r}")


def call_arguments(function: Callable, values: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``function`` was called with, by the names of its parameters (``self`` left
    out); ``values``: its ``locals()``, taken before any parameter is reassigned. What a model's
    ``config`` holds, so its keyword arguments are spelled once (in the signature)."""
    return {name: values[name] for name in inspect.signature(function).parameters if name != "self"}


_MODEL_NAMES = {"G": "the generator", "D": "the discriminator",
                "GD": "both the generator and the discriminator"}


def check_architecture(models: str, *, resolution: Any, ch: Any, n_classes: Any, attn_resolution: Any,
                       image_channels: Any, sn_impl: Any, attention_impl: Any, init: Any,
                       sn_backend: Any = None, attention_backend: Any = None, z_dim: Any = None) -> None:
    """Raise :class:`ConfigError` for the first bad value of an architecture built as ``models``
    ("G", "D" or "GD"). ``z_dim`` is checked when G is built; ``image_channels`` and ``n_classes``
    may be None only for "GD" (a config: the data decides); ``attn_resolution`` 0 or None means no
    attention."""
    check_choice("resolution", resolution, RESOLUTIONS)
    check_int("ch", ch, 1)
    if "G" in models:
        check_int("z_dim", z_dim, 1)
    if not (models == "GD" and n_classes is None):
        check_int("n_classes", n_classes, 0)
    if attn_resolution:
        sides = set(generator_block_resolutions(resolution)) if "G" in models else None
        if "D" in models:
            d_sides = set(discriminator_block_resolutions(resolution))
            sides = d_sides if sides is None else sides & d_sides
        if attn_resolution not in sides:
            fail("attn_resolution", f"must be 0 or a power of two where {_MODEL_NAMES[models]} "
                 f"{'have' if models == 'GD' else 'has'} a feature map at {resolution} px: one of "
                 f"{sorted(sides)} (0 or None: no attention), got {attn_resolution!r}")
    if not (models == "GD" and image_channels is None):
        check_int("image_channels", image_channels, 1)
    check_choice("sn_impl", sn_impl, SN_IMPLS)
    check_choice("sn_backend", sn_backend, BACKENDS, optional=True)
    check_choice("attention_impl", attention_impl, ATTENTION_IMPLS)
    check_choice("attention_backend", attention_backend, BACKENDS, optional=True)
    check_choice("init", init, INITS)


@dataclass
class ModelConfig:
    """Generator and discriminator architecture (both share it)."""

    resolution: int = 32
    """Image side in pixels: 32, 64, 128 or 256."""
    ch: int = 8
    """Width multiplier: channels of every block are multiples of it (SAGAN-128 uses 64; the
    default is sized for digits on a CPU)."""
    z_dim: int = 128
    """Size of the latent noise vector z."""
    n_classes: int | None = None
    """0: unconditional. >0: class-conditional (conditional BN in G, projection D); the data's
    labels must be in [0, n_classes). Default: the data's classes, 10 for digits (class-conditional),
    0 for an image folder (it has no labels); 0 for models built from the config without data."""
    attn_resolution: int = 16
    """Side of the feature map where G and D apply self-attention (a power of two <= resolution
    where both have a feature map; 0: no attention). The paper uses 32 at 128 px; 16 keeps the
    default digits run cheap on a CPU."""
    image_channels: int | None = None
    """Image channels; default: from the data (1 for digits, 3 for an image folder)."""
    sn_impl: str = "sagan_fast"
    """Spectral norm: 'sagan_fast' (ours, fused), 'torch' (torch's parametrization) or 'none'."""
    sn_backend: str | None = None
    """Kernels of our spectral norm: auto, reference, triton or cuda (default: $SAGAN_FAST_BACKEND,
    else auto)."""
    attention_impl: str = "sagan_fast"
    """Self-attention: 'sagan_fast' (our op), 'sdpa' or 'naive' (plain PyTorch baselines)."""
    attention_backend: str | None = None
    """Kernels of our attention op: auto, reference, triton or cuda (default: $SAGAN_FAST_BACKEND,
    else auto)."""
    init: str = "ortho"
    """Weight initialization: 'ortho' (orthogonal) or 'xavier'."""

    def __post_init__(self) -> None:
        check_architecture("GD", **self.__dict__)

    def model_kwargs(self, models: str, image_channels: int | None = None) -> dict[str, Any]:
        """The keyword arguments of ``Generator`` ("G") or ``Discriminator`` ("D") for this config.

        ``image_channels`` (the data's) is used when the config leaves it None; when both are
        set they must agree.
        """
        if image_channels is not None and self.image_channels not in (None, image_channels):
            fail("image_channels", f"the config says {self.image_channels}, the caller {image_channels}")
        channels = self.image_channels if self.image_channels is not None else image_channels
        if channels is None:
            fail("image_channels", "the config leaves it to the data: pass image_channels=")
        kwargs = dict(self.__dict__, image_channels=channels, attn_resolution=self.attn_resolution or None,
                      n_classes=self.n_classes or 0)
        if models == "D":
            del kwargs["z_dim"]
        return kwargs


__all__ = [
    "ATTENTION_IMPLS", "BACKENDS", "BOTTOM_RESOLUTION", "ConfigError", "D_ARCH", "G_CHANNEL_MULTIPLIERS",
    "INITS", "ModelConfig", "PLAIN_ATTENTION_IMPLS", "RESOLUTIONS", "SN_IMPLS", "call_arguments",
    "check_architecture",
    "discriminator_block_resolutions", "generator_block_resolutions",
]
