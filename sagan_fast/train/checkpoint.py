"""Checkpoints: what a run saves and restores (:func:`save_training_state`,
:func:`load_training_state`), which file a run resumes from (:func:`resolve_resume`), atomic writes,
last-K retention, safe loading, RNG state.

A checkpoint is a dict of tensors and plain Python values only, loaded with
``torch.load(weights_only=True)``: a file from elsewhere cannot run code. RNG states are stored as
tensors and ints (numpy's and Python's included) for the same reason. Keys (format 1): ``format``,
``step``, ``config`` (:meth:`TrainConfig.to_dict`), ``world_size``, ``G``, ``D``, ``G_ema``,
``opt_G``, ``opt_D`` (state dicts), ``sn`` (``{"G": ..., "D": ...}``: what
:func:`~sagan_fast.nn.spectral_norm.spectral_norm_state` returns), ``sampler`` (the data position),
``rng`` (one entry per rank), ``skipped_images``.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

# SN state that the module state dict does not hold: owned by sagan_fast.nn.spectral_norm.
from ..nn.spectral_norm import load_spectral_norm_state, spectral_norm_state
from .config import ConfigError, RunConfig, TrainConfig
from .distributed import DistInfo, all_gather_objects

if TYPE_CHECKING:
    from .data import BatchSource
    from .ema import EMA

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``folder``, oldest first (temporary files of interrupted writes are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over ``path``:
    a reader (or a restarted run) sees the old file or the complete new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(folder: str | os.PathLike, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the ``keep`` latest."""
    path = checkpoint_path(folder, step)
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": step, **state}, path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load on the CPU with ``weights_only=True``; clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a sagan_fast training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


# --- RNG state as tensors and plain values ---------------------------------------------------------

def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """torch (CPU and ``device`` if CUDA), numpy and Python generators, as weights_only-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- a training run's state --------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything a checkpoint holds besides the config and the RNG states."""

    G: nn.Module
    D: nn.Module
    ema: EMA
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    batches: BatchSource
    step: int = 0
    skipped_images: int = 0


def resolve_resume(run: RunConfig) -> Path | None:
    """The checkpoint to continue from, per --resume (see RunConfig.resume), or None."""
    folder = Path(run.out) / CHECKPOINT_DIR
    found = list_checkpoints(folder)
    if run.resume == "never":
        if found:  # a fresh run would interleave its checkpoints with (and prune) the old ones
            raise FileExistsError(f"--no-resume: {folder} already holds checkpoints (up to "
                                  f"{found[-1].name}); choose another --out or delete them")
        return None
    if run.resume == "auto":
        return found[-1] if found else None
    if run.resume == "latest":
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {folder}")
        return found[-1]
    return Path(run.resume)


def save_training_state(cfg: TrainConfig, state: TrainState, info: DistInfo) -> Path | None:
    """Write the checkpoint of ``state.step`` (rank 0; returns its path, None elsewhere). Every rank
    must call it: each contributes its RNG state (a collective). Usable at any step."""
    rng = all_gather_objects(capture_rng_state(info.device), info)
    if not info.is_main:
        return None
    s = state
    payload = {"config": cfg.to_dict(), "world_size": info.world_size, "G": s.G.state_dict(),
               "D": s.D.state_dict(), "G_ema": s.ema.state_dict(), "opt_G": s.opt_G.state_dict(),
               "opt_D": s.opt_D.state_dict(),
               "sn": {"G": spectral_norm_state(s.G), "D": spectral_norm_state(s.D)},
               "sampler": s.batches.state_dict(), "rng": rng, "skipped_images": s.skipped_images}
    return save_checkpoint(Path(cfg.run.out) / CHECKPOINT_DIR, s.step, payload, keep=cfg.run.keep_ckpts)


def load_training_state(path: Path, cfg: TrainConfig, state: TrainState, info: DistInfo) -> bool:
    """Restore everything :func:`save_training_state` wrote into ``state``; this rank's RNG state too
    if the checkpoint has one per rank of this run. Returns whether it did (False: another number of
    processes; the run continues, not bit-exactly, and the caller seeds the RNGs)."""
    saved = load_checkpoint(path)
    diff = {k: (saved["config"]["model"].get(k), v) for k, v in cfg.to_dict()["model"].items()
            if saved["config"]["model"].get(k) != v}
    if diff:
        raise ConfigError(f"cannot resume from {path}: model settings differ (checkpoint, now): {diff}")
    state.G.load_state_dict(saved["G"])
    state.D.load_state_dict(saved["D"])
    state.ema.load_state_dict(saved["G_ema"])
    state.opt_G.load_state_dict(saved["opt_G"])
    state.opt_D.load_state_dict(saved["opt_D"])
    # After load_state_dict, which wrote the weights: restores "u, v are up to date" marks too.
    load_spectral_norm_state(state.G, saved["sn"]["G"])
    load_spectral_norm_state(state.D, saved["sn"]["D"])
    state.batches.load_state_dict(saved["sampler"])
    state.step, state.skipped_images = int(saved["step"]), int(saved["skipped_images"])
    if len(saved["rng"]) != info.world_size:
        return False
    restore_rng_state(saved["rng"][info.rank], info.device)
    return True


def dump_rank_state(state: TrainState, out: str | os.PathLike, rank: int) -> None:
    """Debug (--dump-rank-state): this rank's G and D state dicts, to compare ranks."""
    atomic_torch_save({"G": state.G.state_dict(), "D": state.D.state_dict(), "step": state.step},
                      Path(out) / "rank_state" / f"rank{rank}.pt")
