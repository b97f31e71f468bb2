"""Load a trained generator from a run folder or a checkpoint, and draw samples from it.

    from sagan_fast import load_generator
    G = load_generator("runs/digits")                 # the EMA generator of the newest checkpoint
    z = sample_z(G, 64, seed=0)
    images = generate(G, z)                           # (64, C, R, R) in [-1, 1]

Checkpoints are read with ``torch.load(weights_only=True)``: a file from elsewhere cannot run code.
Anything that is not a sagan_fast checkpoint is one ValueError / FileNotFoundError naming the path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = 1  # sagan_fast.train.checkpoint.CHECKPOINT_FORMAT (not imported: that pulls in train/)
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})\.pt$")


@dataclass
class GeneratorCheckpoint:
    """Where a loaded generator came from."""

    path: Path
    step: int
    config: dict[str, Any]  # TrainConfig.to_dict() of the run: sections model, data, optim, run
    image_channels: int


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch.load's run to a page): its first line, and the
    next one too when the first only introduces it ("Error(s) in loading state_dict for X:")."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(err).__name__}: {text[:limit]}"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as is; a run folder -> its newest ``checkpoints/step_*.pt`` (a folder of
    checkpoints works too). FileNotFoundError naming the path when there is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist (expected a run folder or a checkpoint "
                                ".pt file)")
    if path.is_file():
        return path
    for folder in (path / CHECKPOINT_DIR, path):
        found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt")
                       if (m := _CHECKPOINT_NAME.match(p.name)) and p.is_file())
        if found:
            return found[-1][1]
    raise FileNotFoundError(f"{str(path)!r} holds no checkpoint (a run folder has "
                            f"{CHECKPOINT_DIR}/step_XXXXXXXX.pt)")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict, on the CPU, checked to be a sagan_fast training checkpoint."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt file, another format, a pickle with code: all "not ours"
        raise ValueError(f"{str(path)!r} is not a readable sagan_fast checkpoint "
                         f"({first_line(err)})") from None
    if (not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT
            or not isinstance(state.get("G_ema"), dict) or not isinstance(state.get("config"), dict)
            or not isinstance(state["config"].get("model"), dict)):
        raise ValueError(f"{str(path)!r} is not a sagan_fast training checkpoint "
                         f"(format {CHECKPOINT_FORMAT} with 'config' and 'G_ema')")
    return state


def _image_channels(g_state: dict[str, torch.Tensor], path: Path) -> int:
    """Output channels of G's last conv (the config leaves them to the data: 1 digits, 3 folders)."""
    for key in ("output_conv.parametrizations.weight.original", "output_conv.weight"):
        if key in g_state:
            return int(g_state[key].shape[0])
    raise ValueError(f"{str(path)!r}: the EMA generator's state has no output_conv weight")


def _build_generator(model_cfg: dict[str, Any], image_channels: int) -> nn.Module:
    """The generator a saved model config describes. Kernel backends are left to 'auto': the saved
    choice (cuda, say) is about speed on the training machine, not the math."""
    import dataclasses

    from .models import Generator, ModelConfig

    cfg = dataclasses.replace(ModelConfig(**model_cfg), sn_backend=None, attention_backend=None)
    return Generator.from_config(cfg, image_channels=image_channels)


def load_generator_with_info(path: str | os.PathLike, device: str | torch.device = "cpu"
                             ) -> tuple[nn.Module, GeneratorCheckpoint]:
    """:func:`load_generator` plus where it came from (checkpoint path, step, the run's config)."""
    ckpt_path = find_checkpoint(path)
    state = read_checkpoint(ckpt_path)
    g_state = state["G_ema"]
    channels = _image_channels(g_state, ckpt_path)
    try:
        G = _build_generator(state["config"]["model"], channels)
        G.load_state_dict(g_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{str(ckpt_path)!r}: cannot build its generator from the saved config "
                         f"({first_line(err)})") from None
    G = G.to(device).eval().requires_grad_(False)
    info = GeneratorCheckpoint(path=ckpt_path, step=int(state.get("step", 0)), config=state["config"],
                               image_channels=channels)
    return G, info


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The EMA generator of a run folder (its newest checkpoint) or of a checkpoint file.

    Built from the config saved in the checkpoint, in eval mode, without gradients, on ``device``;
    ``G.z_dim`` and ``G.n_classes`` say what to feed it: ``G(z)`` or ``G(z, y)`` with z (B, z_dim)
    and y (B,) class indices when ``n_classes > 0``.
    """
    return load_generator_with_info(path, device)[0]


def generator_device(G: nn.Module) -> torch.device:
    return next(G.parameters()).device


def sample_z(G: nn.Module, n: int, seed: int = 0, truncation: float | None = None) -> torch.Tensor:
    """(n, G.z_dim) standard normal noise from its own seeded generator (the global RNG is not
    touched); with ``truncation`` T, a normal truncated to [-T, T] (BigGAN's truncation trick:
    smaller T, more typical and less varied samples). Drawn on the CPU: one seed, one z everywhere."""
    if n < 1:
        raise ValueError(f"need at least one sample, got n={n}")
    g = torch.Generator().manual_seed(seed)
    z = torch.empty(n, G.z_dim)
    if truncation is None:
        z.normal_(generator=g)
    else:
        if not truncation > 0:
            raise ValueError(f"truncation must be > 0, got {truncation}")
        torch.nn.init.trunc_normal_(z, 0.0, 1.0, -truncation, truncation, generator=g)
    return z


def balanced_labels(n: int, n_classes: int) -> torch.Tensor:
    """(n,) class labels 0, 1, ..., n_classes - 1, 0, 1, ...: every class equally often (+-1)."""
    return torch.arange(n) % n_classes


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None,
             batch_size: int = 256) -> torch.Tensor:
    """G(z, y) in batches, in eval mode (restored after), on G's device; the images on the CPU."""
    if G.n_classes > 0 and y is None:
        raise ValueError(f"this generator is class-conditional (n_classes={G.n_classes}): give labels y")
    if G.n_classes == 0 and y is not None:
        raise ValueError("this generator is unconditional (n_classes=0): labels cannot be given")
    device, was_training = generator_device(G), G.training
    G.eval()
    try:
        out = []
        for start in range(0, z.shape[0], batch_size):
            zb = z[start:start + batch_size].to(device)
            yb = None if y is None else y[start:start + batch_size].to(device)
            out.append(G(zb, yb).float().cpu())
        return torch.cat(out)
    finally:
        G.train(was_training)
