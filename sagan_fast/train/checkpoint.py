"""Checkpoints: atomic writes, last-K retention, safe loading, RNG and spectral-norm state.

A checkpoint is a dict of tensors and plain Python values only, loaded with
``torch.load(weights_only=True)``: a file from elsewhere cannot run code. RNG states are stored as
tensors and ints (numpy's and Python's included) for the same reason.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn.spectral_norm import SpectralNorm

CHECKPOINT_FORMAT = 1
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


# --- spectral norm state that the module state dict does not hold ----------------------------------

def spectral_norm_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per SN layer of ours: its current sigma (a non-persistent buffer) and whether u, v are up to
    date for the current weight. Restoring both makes a resumed run do exactly the power iterations
    the uninterrupted run does (no extra one after loading), so resuming is bit-exact."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SpectralNorm) and hasattr(module, "_u"):
            weight = _sn_weight(model, name)
            out[name] = {"sigma": module._sigma.detach().clone(), "fresh": not module.is_stale(weight)}
    return out


def load_spectral_norm_state(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Call after ``model.load_state_dict`` (which changed the weights, so every layer looks stale)."""
    for name, module in model.named_modules():
        if isinstance(module, SpectralNorm) and hasattr(module, "_u"):
            if name not in state:
                raise KeyError(f"checkpoint has no spectral norm state for {name!r}")
            with torch.no_grad():
                module._sigma.copy_(state[name]["sigma"])
            if state[name]["fresh"]:
                module.mark_fresh(_sn_weight(model, name))
            else:
                module._seen_version = -1


def _sn_weight(model: nn.Module, sn_name: str) -> torch.Tensor:
    """'a.parametrizations.weight.0' -> the raw parameter 'a.parametrizations.weight.original'."""
    plist = model.get_submodule(sn_name.rsplit(".", 1)[0])
    assert isinstance(plist, parametrize.ParametrizationList)
    return plist.original
