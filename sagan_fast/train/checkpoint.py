"""Checkpoints: what a run saves and restores (:func:`save_training_state`,
:func:`load_training_state`), which file a run resumes from (:func:`resume`), atomic writes, last-K
retention, safe loading, RNG state.

A checkpoint is a dict of tensors and plain Python values only, loaded with
``torch.load(weights_only=True)``: a file from elsewhere cannot run code. RNG states are stored as
tensors and ints (numpy's and Python's included) for the same reason. Keys (format 1): ``format``,
``step``, ``config`` (:meth:`TrainConfig.to_dict`), ``world_size``, ``G``, ``D``, ``G_ema``,
``opt_G``, ``opt_D`` (state dicts), ``sn`` (``{"G": ..., "D": ...}``: what
:func:`~sagan_fast.nn.spectral_norm.spectral_norm_state` returns), ``sampler`` (the data position),
``rng`` (one entry per rank), ``skipped_images`` (how many unreadable image files the run passed
over) and ``unreadable_images`` (their paths; added later, absent in older files).

Resuming from the newest checkpoint of a run folder skips a file that cannot be read (truncated by
a crash during a copy, empty, not a checkpoint): it is renamed aside (``.corrupt``, never deleted)
with a warning, and the one before it is tried. A file named by ``--resume PATH`` is never skipped:
any problem with it is an error.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..models import Generator
# SN state that the module state dict does not hold: owned by sagan_fast.nn.spectral_norm.
from ..nn.spectral_norm import load_spectral_norm_state, spectral_norm_state
from .config import ConfigError, RunConfig, TrainConfig
from .distributed import DistInfo, all_gather_objects
from .errors import Diverged, OutputError, together
from .logging import note

if TYPE_CHECKING:
    from .data import BatchSource
    from .ema import EMA

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
# Temporary files of atomic writes (checkpoints, sample grids): "." + final name + ".tmp" + writer's PID.
_TEMP = re.compile(r"^\.(?:step_\d{8,}\.(?:pt|png)|best\.pt)\.tmp(\d+)$")
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
"""OSErrors of writing the run folder that are the disk's or the permissions' fault, not a bug."""
_KEYS = ("step", "config", "G", "D", "G_ema", "opt_G", "opt_D", "sn", "sampler", "rng", "skipped_images")


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``folder``, oldest first (temporary files of interrupted writes are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint of the run folder ``out``, or None."""
    found = list_checkpoints(Path(out) / CHECKPOINT_DIR)
    return found[-1] if found else None


class _RecordingWriter:
    """A file's write() that keeps what it raised: torch.save reports a failed write (a full disk, or a
    second Ctrl-C's KeyboardInterrupt raised by a signal handler during a write) as "[enforce fail at
    inline_container.cc] unexpected pos", without the cause."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except BaseException as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over ``path``:
    a reader (or a restarted run) sees the old file or the complete new one, never half of one.
    A failed write (full disk, quota, file size limit) raises its OSError, naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                if not isinstance(writer.error, OSError):
                    raise writer.error from None
                raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename in (None, str(tmp)):  # name the file the user knows, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temp_files(out: str | os.PathLike, all_stale: bool) -> list[tuple[Path, int]]:
    """Delete the temporary files that killed writers left in ``out``'s checkpoint and sample folders
    (each up to a checkpoint's size); returns (path, bytes) of each. ``all_stale``: the caller holds
    the run folder's lock, so no live process writes there and every such file is stale; else only
    files of processes no longer alive on this machine are."""
    removed = []
    for folder in (Path(out) / CHECKPOINT_DIR, Path(out) / "samples", Path(out)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TEMP.match(p.name)
            if not m or int(m.group(1)) == os.getpid() or not (all_stale or not _alive(int(m.group(1)))):
                continue
            try:
                size = p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append((p, size))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


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
        raise ValueError(f"{str(path)!r} is not a sagan_fast training checkpoint (format "
                         f"{CHECKPOINT_FORMAT})")
    return state


class UnreadableCheckpoint(ConfigError):
    """A checkpoint file that cannot be read: truncated, empty, unsafe to unpickle, or not ours.
    ``reason`` says which, in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_checkpoint(path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, any problem with the file's contents an :class:`UnreadableCheckpoint`
    (an OSError opening it stays one: that is the file system's problem, not the file's)."""
    with open(path, "rb"):
        pass
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint(path, "an empty file (0 bytes)")
    try:
        saved = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001 (foreign input: whatever its parser raises, even EINVAL)
        raise UnreadableCheckpoint(path, _why_unreadable(path, err)) from None
    missing = [k for k in _KEYS if k not in saved]
    if missing:
        raise UnreadableCheckpoint(path, f"not a complete sagan_fast training checkpoint (no {missing})")
    return saved


def _why_unreadable(path: Path, err: Exception) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:  # torch.save writes a zip archive: its end record closes the file
        head = f.read(12)
        f.seek(max(0, size - 65_558))
        tail = f.read()
    if head[:4] == b"PK\x03\x04" and b"PK\x05\x06" not in tail:
        return f"truncated ({size} bytes: the zip archive torch.save writes has no end record)"
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save: a zip archive (or, before 1.6, a pickle)
        return f"not a checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
    text = str(err)
    if "Weights only load failed" in text:
        return "holds objects other than tensors and plain values (refused by torch.load(weights_only=True))"
    if "not a sagan_fast training checkpoint" in text:
        return f"not a sagan_fast training checkpoint (format {CHECKPOINT_FORMAT})"
    first = (text.split(". This is an internal")[0].splitlines() or [""])[0][:160]
    damaged = isinstance(err, (RuntimeError, EOFError, OSError))
    kind = "truncated or damaged" if damaged else "not a checkpoint"
    return f"{kind} ({type(err).__name__}{': ' + first if first else ''})"


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to ``<name>.corrupt`` (``.corrupt1``, ... if taken): kept for
    a look, out of the way of resuming."""
    for n in range(1000):
        aside = path.with_name(path.name + CORRUPT_SUFFIX + (str(n) if n else ""))
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise ConfigError(f"{path}: too many {CORRUPT_SUFFIX} files next to it")


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
    unreadable_images: set[str] = field(default_factory=set)
    best: dict[str, Any] | None = None
    """The lowest FID so far (``{"step", "key", "value"}``), or None: what best.pt holds."""


@dataclass
class Resumed:
    """Where a run continued from, and what it said about it."""

    path: Path
    step: int
    rng_restored: bool
    """False: the checkpoint has another number of RNG states than this run has processes."""
    notes: list[str] = field(default_factory=list)
    """Lines for the user: settings that changed since the checkpoint, why it is not bit-exact."""


def choose_checkpoint(run: RunConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue from per --resume (see RunConfig.resume), loaded; (None, None) for a
    fresh start. Unreadable checkpoints of the run folder are set aside (see the module doc)."""
    folder = Path(run.out) / CHECKPOINT_DIR
    found = list_checkpoints(folder)
    if run.resume == "never":
        if found:  # a fresh run would interleave its checkpoints with (and prune) the old ones
            raise ConfigError(f"--no-resume: {folder} already holds checkpoints (up to {found[-1].name}); "
                              "choose another --out or delete them")
        return None, None
    if run.resume not in ("auto", "latest"):
        return Path(run.resume), read_named_checkpoint(Path(run.resume))
    for path in reversed(found):
        try:
            return path, read_checkpoint(path)
        except UnreadableCheckpoint as err:
            aside = set_aside(path)
            note(f"warning: checkpoint {path} is unreadable: {err.reason}; renamed to {aside.name}, "
                 "trying the one before", warning=True)
    if found:
        raise ConfigError(f"none of the {len(found)} checkpoint(s) in {folder} can be read (each kept as "
                          f"*.pt{CORRUPT_SUFFIX}); --no-resume starts this run folder afresh")
    if run.resume == "latest":
        raise ConfigError(f"--resume: no checkpoint in {folder}")
    return None, None


def read_named_checkpoint(path: Path) -> dict[str, Any]:
    """The file of --resume PATH: every problem with it is a one-line ConfigError."""
    if not path.exists():
        raise ConfigError(f"--resume {path}: no such file")
    if path.is_dir():
        newest = newest_checkpoint(path) or (list_checkpoints(path) or [None])[-1]
        run_folder = newest is not None and newest.parent == path / CHECKPOINT_DIR
        hint = (f"; its newest checkpoint is {newest}, and --out {path} continues that run from it"
                if run_folder else f"; e.g. {newest}" if newest is not None else "")
        raise ConfigError(f"--resume {path}: a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise ConfigError(f"--resume {path}: not a regular file")
    try:
        return read_checkpoint(path)
    except UnreadableCheckpoint as err:
        raise ConfigError(f"--resume {path}: {err.reason}") from None
    except OSError as err:
        raise ConfigError(f"--resume {path}: cannot be read ({err.strerror})") from None


def resume(cfg: TrainConfig, state: TrainState, info: DistInfo) -> Resumed | None:
    """Continue ``state`` from the checkpoint --resume asks for (rank 0 picks it, every rank loads that
    one), or None for a fresh start. Problems are ConfigErrors on every rank (see errors.together)."""
    path, saved = together(info, choose_checkpoint if info.is_main else lambda run: (None, None), cfg.run)
    shared = all_gather_objects(None if path is None else str(path), info)[0]
    if shared is None:
        return None
    path = Path(shared)
    saved = together(info, lambda: saved if info.is_main else read_named_checkpoint(path))
    return together(info, load_training_state, path, cfg, state, info, saved)


def save_training_state(cfg: TrainConfig, state: TrainState, info: DistInfo, path: Path | None = None,
                        extra: dict[str, Any] | None = None) -> Path | None:
    """Write the checkpoint of ``state.step`` (rank 0; returns its path, None elsewhere). Every rank
    must call it: each contributes its RNG state (a collective), and a failed write (a full disk) is
    an :class:`~sagan_fast.train.errors.OutputError` on every rank. Usable at any step.

    ``path``: write there (e.g. best.pt) instead of the run's next ``checkpoints/step_N.pt`` (which
    prunes the oldest); ``extra``: more plain values to store (e.g. the scores that made it best)."""
    together(info, check_weights, cfg, state)  # every rank: BN statistics are per rank
    rng = all_gather_objects(capture_rng_state(info.device), info)
    return together(info, _write_training_state if info.is_main else lambda *a: None, cfg, state, info, rng,
                    path, extra or {})


WEIGHT_LIMIT = 1e8
"""No weight or statistic of a healthy run comes near this (Adam moves a weight by about the learning
rate per step; measured: ~1 in the digits run); ``--lr-g 1e8`` passes it at step 1 or 2 and puts G's
batch-norm variances at ~1e32 by step 2, while SN keeps the losses finite and small."""


def check_weights(cfg: TrainConfig, state: TrainState) -> None:
    """Raise :class:`~sagan_fast.train.errors.Diverged` if a parameter or buffer of G, D or the EMA G
    is not finite or (unless ``--max-loss inf``: finiteness only) beyond :data:`WEIGHT_LIMIT` in
    magnitude: such a state must not be written, let alone replace a good checkpoint. One sync."""
    named = [(f"{prefix}.{name}", t) for prefix, model in (("G", state.G), ("D", state.D),
                                                            ("G_ema", state.ema.model))
             for name, t in model.state_dict().items() if t.is_floating_point() and t.numel()]
    if not named:
        return
    peaks = torch.stack([t.detach().abs().amax().float() for _, t in named]).cpu()
    finite = torch.isfinite(peaks)
    bad = ~finite | (peaks > WEIGHT_LIMIT) if math.isfinite(cfg.run.max_loss) else ~finite
    if not bool(bad.any()):
        return
    i = int(torch.where(finite, peaks, math.inf).masked_fill(~bad, -1.0).argmax())  # the worst one
    name, peak = named[i][0], float(peaks[i])
    problem = (f"{name} holds {peak}" if not math.isfinite(peak) else
               f"{name} reached {peak:.3g} (no weight or statistic of a healthy run gets near "
               f"{WEIGHT_LIMIT:g})")
    newest = newest_checkpoint(cfg.run.out)
    then = (f"the last checkpoint, {newest}, is kept: lower --lr-g / --lr-d and run again to continue from it"
            if newest else "no checkpoint was written: lower --lr-g / --lr-d and start again")
    raise Diverged(f"step {state.step}: the run diverged: {problem}; {then}")


def _write_training_state(cfg: TrainConfig, state: TrainState, info: DistInfo, rng: list, path: Path | None,
                          extra: dict[str, Any]) -> Path:
    s = state
    payload = {"config": cfg.to_dict(), "world_size": info.world_size, "G": s.G.state_dict(),
               "D": s.D.state_dict(), "G_ema": s.ema.state_dict(), "opt_G": s.opt_G.state_dict(),
               "opt_D": s.opt_D.state_dict(),
               "sn": {"G": spectral_norm_state(s.G), "D": spectral_norm_state(s.D)},
               "sampler": s.batches.state_dict(), "rng": rng, "skipped_images": s.skipped_images,
               "unreadable_images": sorted(s.unreadable_images), "best": s.best, **extra}
    folder = Path(cfg.run.out) / CHECKPOINT_DIR
    try:
        if path is not None:
            atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": s.step, **payload}, path)
            return path
        return save_checkpoint(folder, s.step, payload, keep=cfg.run.keep_ckpts)
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        newest = newest_checkpoint(cfg.run.out)
        fix = "make room" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "fix that"
        then = (f"the newest complete one, {newest}, is kept: {fix} and run the same command to continue "
                f"from it" if newest else f"there is no earlier one: {fix} and run the same command again")
        raise OutputError(f"cannot write the checkpoint of step {s.step} to {err.filename or folder} "
                          f"({err.strerror}); {then}") from None



def load_training_state(path: Path, cfg: TrainConfig, state: TrainState, info: DistInfo,
                        saved: dict[str, Any] | None = None) -> Resumed:
    """Restore everything :func:`save_training_state` wrote (``saved``: the file, if read already) into
    ``state``; this rank's RNG state too if the checkpoint has one per rank of this run.

    The model must be the one the checkpoint holds (else a ConfigError). Other settings may change:
    the new values are used (the optimizers' learning rates, betas and eps are set to this config's,
    not the checkpoint's) and the returned notes list them; a changed batch size, data or number of
    processes also gets a note that the continuation is not bit-exact.
    """
    saved = read_checkpoint(path) if saved is None else saved
    # Other data first: its defaults (n_classes, ...) differ too, but the data is what to say.
    try:
        channels = Generator.image_channels_in(saved["G"])
    except KeyError:
        raise ConfigError(f"cannot resume from {path}: its G is not a sagan_fast Generator") from None
    if channels != state.batches.channels:
        raise ConfigError(f"cannot resume from {path}: it was trained on {channels}-channel images, the "
                          f"data {cfg.data.data!r} has {state.batches.channels}-channel images (use another "
                          "--out)")
    # The kernels that run (sn_backend, attention_backend) may change: same math, another speed.
    diff = {k: (saved["config"]["model"].get(k), v) for k, v in cfg.to_dict()["model"].items()
            if saved["config"]["model"].get(k) != v and k not in _KERNEL_CHOICES}
    if diff:
        raise ConfigError(f"cannot resume from {path}: model settings differ (checkpoint, now): {diff}")
    try:
        before = TrainConfig.from_dict(saved["config"])
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"cannot resume from {path}: its config does not fit this version ({err})") \
            from None
    try:
        state.G.load_state_dict(saved["G"])
        state.D.load_state_dict(saved["D"])
        state.ema.load_state_dict(saved["G_ema"])
        state.opt_G.load_state_dict(saved["opt_G"])
        state.opt_D.load_state_dict(saved["opt_D"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = (str(err).splitlines() or [""])[0]
        raise ConfigError(f"cannot resume from {path}: its weights do not fit this model ({first})") from None
    o = cfg.optim  # the settings of this run, not the checkpoint's (load_state_dict brought those back)
    for opt, lr in ((state.opt_G, o.lr_g), (state.opt_D, o.lr_d)):
        for group in opt.param_groups:
            group.update(lr=lr, betas=(o.beta1, o.beta2), eps=o.adam_eps)
    # After load_state_dict, which wrote the weights: restores "u, v are up to date" marks too.
    load_spectral_norm_state(state.G, saved["sn"]["G"])
    load_spectral_norm_state(state.D, saved["sn"]["D"])
    saved_world = int(saved.get("world_size", len(saved["rng"])))
    state.batches.load_state_dict(saved["sampler"], batch_size=before.data.batch_size, world_size=saved_world)
    state.step, state.skipped_images = int(saved["step"]), int(saved["skipped_images"])
    state.unreadable_images = set(saved.get("unreadable_images", []))
    state.best = saved.get("best")  # absent in files written before evaluation existed
    rng_restored = len(saved["rng"]) == info.world_size
    if rng_restored:
        restore_rng_state(saved["rng"][info.rank], info.device)
    return Resumed(path, state.step, rng_restored, _resume_notes(before, cfg, saved_world, info.world_size))


# Settings that change what a run computes (the others: how long, where, how often it logs or saves).
_RESULT_SETTINGS = {"data": ("data", "batch_size", "flip"), "optim": None, "run": ("seed", "sync_bn"),
                    "model": ("sn_backend", "attention_backend")}
_KERNEL_CHOICES = _RESULT_SETTINGS["model"]


def _resume_notes(before: TrainConfig, now: TrainConfig, world_before: int, world_now: int) -> list[str]:
    changed = []
    for section, names in _RESULT_SETTINGS.items():
        old, new = getattr(before, section), getattr(now, section)
        for f in dataclasses.fields(new):
            if (names is None or f.name in names) and getattr(old, f.name) != getattr(new, f.name):
                changed.append((f.name, getattr(old, f.name), getattr(new, f.name)))
    notes = []
    if changed:
        notes.append("resume: settings changed since the checkpoint, the new values apply: " + ", ".join(
            f"--{name.replace('_', '-')} {old} -> {new}" for name, old, new in changed))
    inexact = [f"--{name.replace('_', '-')} changed" for name, _, _ in changed
               if name in ("data", "batch_size")]
    if world_before != world_now:
        inexact.append(f"{world_before} process(es) then, {world_now} now (RNG states reseeded)")
    if inexact:
        notes.append("resume: not bit-exact with an uninterrupted run: " + "; ".join(inexact)
                     + " (the data position carries over as the same fraction of the epoch)")
    return notes


def dump_rank_state(state: TrainState, out: str | os.PathLike, rank: int) -> None:
    """Debug (--dump-rank-state): this rank's G and D state dicts, to compare ranks."""
    atomic_torch_save({"G": state.G.state_dict(), "D": state.D.state_dict(), "step": state.step},
                      Path(out) / "rank_state" / f"rank{rank}.pt")
