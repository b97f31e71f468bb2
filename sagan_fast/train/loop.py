"""The training loop: build, resume, step, log, sample, checkpoint.

The step itself is :class:`sagan_fast.train.step.GANStep` (``d_steps`` discriminator updates then
one generator update), a unit with no I/O; ``--step-impl`` picks its options.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..models import build_models
from ..nn.spectral_norm import spectral_norm_sigmas
from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .data import ShardedBatchSampler, build_dataset, infinite_batches, random_flip
from .distributed import (DistInfo, all_gather_objects, barrier, broadcast_buffers_once,
                          wrap_ddp)
from .ema import EMA
from .step import PRESETS, STAT_NAMES, GANStep
from .logging import RunLogger

CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
# Test-only hook: "STEP:PATH" makes rank 0 kill itself (SIGKILL) right after STEP, once: only if
# PATH does not exist yet, and it creates PATH first. Used to check torchrun --max-restarts resumes.
CRASH_HOOK_ENV = "SAGAN_FAST_TEST_CRASH_AFTER_STEP"


# --- building ----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizers(G: nn.Module, D: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    o = cfg.optim
    opt_G = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2), eps=o.adam_eps)
    opt_D = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2), eps=o.adam_eps)
    return opt_G, opt_D


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, per --resume (see RunConfig.resume), or None."""
    mode = cfg.run.resume
    found = ckpt.list_checkpoints(Path(cfg.run.out) / CHECKPOINT_DIR)
    if mode == "never":
        if found:  # a fresh run would interleave its checkpoints with (and prune) the old ones
            raise FileExistsError(f"--no-resume: {Path(cfg.run.out) / CHECKPOINT_DIR} already holds "
                                  f"checkpoints (up to {found[-1].name}); choose another --out or delete them")
        return None
    if mode == "auto":
        return found[-1] if found else None
    if mode == "latest":
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {Path(cfg.run.out) / CHECKPOINT_DIR}")
        return found[-1]
    return Path(mode)


# --- observation -------------------------------------------------------------------------------------

def attention_gammas(prefix: str, model: nn.Module) -> dict[str, float]:
    """The scalar gamma of every self-attention layer (ours or a baseline: any module with one)."""
    return {f"gamma/{prefix}.{name}": float(m.gamma.detach()) for name, m in model.named_modules()
            if isinstance(getattr(m, "gamma", None), nn.Parameter) and m.gamma.ndim == 0}


def sigma_stats(prefix: str, model: nn.Module) -> dict[str, float]:
    s = spectral_norm_sigmas(model)
    if s.numel() == 0:
        return {}
    return {f"sn_sigma/{prefix}_min": s.min().item(), f"sn_sigma/{prefix}_mean": s.mean().item(),
            f"sn_sigma/{prefix}_max": s.max().item()}


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) uint8, black padding."""
    b, c, h, w = images.shape
    rows = math.ceil(b / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).to(torch.uint8).numpy()


def save_image_grid(images: torch.Tensor, path: Path) -> None:
    """PNG written atomically (a viewer never sees half a file)."""
    from PIL import Image

    arr = image_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])))
    img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _crash_hook(step: int, info: DistInfo) -> None:
    spec = os.environ.get(CRASH_HOOK_ENV)
    if not spec or not info.is_main:
        return
    at, marker = spec.split(":", 1)
    if step == int(at) and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


# --- the loop ----------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a finished run leaves behind (paths on rank 0)."""

    step: int
    out: Path
    last_checkpoint: Path | None
    last_samples: Path | None
    resumed_from: Path | None
    skipped_images: int
    images_per_s: float | None = None
    """Training throughput (all processes) over the last log interval."""


@dataclass
class TrainState:
    """Everything a checkpoint holds (with the config and the RNG states)."""

    G: nn.Module
    D: nn.Module
    ema: EMA
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sampler: ShardedBatchSampler
    step: int = 0
    skipped_images: int = 0


@dataclass
class DataSource:
    loader: torch.utils.data.DataLoader
    sampler: ShardedBatchSampler
    channels: int
    flip: bool
    prepared: bool = False
    """Batches are uint8 NHWC (PreparedDataset): scaled and flipped on the device."""


def make_data(cfg: TrainConfig, info: DistInfo) -> DataSource:
    """Dataset (a folder is only listed here, not read), this rank's sampler and the loader."""
    # Imported here, not at the top: `python -m sagan_fast.train.prepared_data` must be its first import.
    from .prepared_data import PreparedDataset, collate_prepared, is_prepared

    prepared = is_prepared(cfg.data.data)  # a folder written by sagan_fast.train.prepared_data
    dataset = PreparedDataset(cfg.data.data, cfg.model.resolution) if prepared else build_dataset(
        cfg.data.data, cfg.model.resolution)
    n_classes = cfg.model.n_classes
    if n_classes > 0 and dataset.n_classes == 0:
        raise ConfigError(f"--n-classes {n_classes}: the data {cfg.data.data!r} has no class labels")
    if 0 < n_classes < dataset.n_classes:
        raise ConfigError(f"--n-classes {n_classes}: the data has {dataset.n_classes} classes")
    if cfg.model.image_channels is not None and cfg.model.image_channels != dataset.channels:
        raise ConfigError(f"--image-channels {cfg.model.image_channels}: the data {cfg.data.data!r} has "
                          f"{dataset.channels}-channel images")
    is_digits = cfg.data.data == "digits"
    workers = cfg.data.workers if cfg.data.workers is not None else (0 if is_digits else 4)
    sampler = ShardedBatchSampler(len(dataset), cfg.data.batch_size, info.rank, info.world_size, seed=cfg.run.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=info.device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=collate_prepared if prepared else None,  # PreparedDataset gathers whole batches
        # Its own generator: creating a loader iterator must not draw from the global one, or a
        # resumed run (which creates one mid-epoch) would diverge from an uninterrupted run.
        generator=torch.Generator().manual_seed(cfg.run.seed + info.rank))
    flip = cfg.data.flip if cfg.data.flip is not None else not is_digits
    return DataSource(loader, sampler, dataset.channels, flip, prepared)


def make_state(cfg: TrainConfig, info: DistInfo, data: DataSource) -> TrainState:
    """Models (the same seed on every rank: equal weights and SN buffers), EMA, optimizers."""
    seed_everything(cfg.run.seed)
    G, D = build_models(cfg.model, data.channels)
    G, D = G.to(info.device), D.to(info.device)
    if cfg.run.sync_bn and info.distributed:
        if info.device.type != "cuda":
            raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm works on GPUs only (this run is on the CPU)")
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
    broadcast_buffers_once(G, info)
    broadcast_buffers_once(D, info)
    opt_G, opt_D = build_optimizers(G, D, cfg)
    return TrainState(G, D, EMA(G, cfg.optim.ema_decay, cfg.optim.ema_start), opt_G, opt_D, data.sampler)


def cpu_threads(requested: int) -> int:
    """``requested`` if > 0, else $OMP_NUM_THREADS if set, else the idle cores (at least 1)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(torch.get_num_threads(), cores - busy))


def per_rank_seed(cfg: TrainConfig, info: DistInfo, step: int = 0) -> int:
    """Noise and flips differ per rank (model init, before, was shared)."""
    return cfg.run.seed + 1_000_003 * (info.rank + 1) + step


def save_state(cfg: TrainConfig, state: TrainState, info: DistInfo) -> Path | None:
    """Every rank contributes its RNG state (a collective); rank 0 writes."""
    rng = all_gather_objects(ckpt.capture_rng_state(info.device), info)
    if not info.is_main:
        return None
    s = state
    payload = {"config": cfg.to_dict(), "world_size": info.world_size, "G": s.G.state_dict(),
               "D": s.D.state_dict(), "G_ema": s.ema.state_dict(), "opt_G": s.opt_G.state_dict(),
               "opt_D": s.opt_D.state_dict(),
               "sn": {"G": ckpt.spectral_norm_state(s.G), "D": ckpt.spectral_norm_state(s.D)},
               "sampler": s.sampler.state_dict(), "rng": rng, "skipped_images": s.skipped_images}
    return ckpt.save_checkpoint(Path(cfg.run.out) / CHECKPOINT_DIR, s.step, payload, keep=cfg.run.keep_ckpts)


def load_state(cfg: TrainConfig, state: TrainState, path: Path, info: DistInfo) -> None:
    """Restore everything :func:`save_state` wrote; this rank's RNG state if the world size matches."""
    saved = ckpt.load_checkpoint(path)
    diff = {k: (saved["config"]["model"].get(k), v) for k, v in cfg.to_dict()["model"].items()
            if saved["config"]["model"].get(k) != v}
    if diff:
        raise ConfigError(f"cannot resume from {path}: model settings differ (checkpoint, now): {diff}")
    state.G.load_state_dict(saved["G"])
    state.D.load_state_dict(saved["D"])
    state.ema.load_state_dict(saved["G_ema"])
    state.opt_G.load_state_dict(saved["opt_G"])
    state.opt_D.load_state_dict(saved["opt_D"])
    ckpt.load_spectral_norm_state(state.G, saved["sn"]["G"])
    ckpt.load_spectral_norm_state(state.D, saved["sn"]["D"])
    state.sampler.load_state_dict(saved["sampler"])
    state.step, state.skipped_images = int(saved["step"]), int(saved["skipped_images"])
    if len(saved["rng"]) == info.world_size:
        ckpt.restore_rng_state(saved["rng"][info.rank], info.device)
    else:  # another number of processes: continues, but not bit-exactly
        seed_everything(per_rank_seed(cfg, info, state.step))


class ScalarMeter:
    """Sums step scalars on the device; reads them back (one sync) only when logging."""

    names = STAT_NAMES

    def __init__(self, device: torch.device, step: int) -> None:
        self.sums = torch.zeros(len(self.names), device=device)
        self.count, self.t0, self.step0 = 0, time.perf_counter(), step

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        self.sums += torch.stack([stats[name] for name in self.names])
        self.count += 1

    def read(self, step: int, images_per_step: int) -> dict[str, float]:
        means = (self.sums / max(self.count, 1)).tolist()
        now = time.perf_counter()
        out = dict(zip(self.names, means))
        out["images_per_s"] = (step - self.step0) * images_per_step / max(now - self.t0, 1e-9)
        self.sums.zero_()
        self.count, self.t0, self.step0 = 0, now, step
        return out


def train(cfg: TrainConfig, info: DistInfo | None = None) -> TrainResult:
    """Run (or continue) the training described by ``cfg`` in this process; see train_ddp.py."""
    info = info or DistInfo()
    device, out = info.device, Path(cfg.run.out)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for float32 runs (bf16 runs are unaffected)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.run.cpu_threads))

    data = make_data(cfg, info)
    state = make_state(cfg, info, data)
    # Wrap before loading a checkpoint: DDP's initial parameter broadcast writes the weights, and
    # SN's "u, v are up to date" marks (restored by load_state) must come after every such write.
    G_ddp, D_ddp = wrap_ddp(state.G, info), wrap_ddp(state.D, info)
    resumed_from = resolve_resume(cfg)
    if resumed_from is not None:
        load_state(cfg, state, resumed_from, info)
    else:
        seed_everything(per_rank_seed(cfg, info))
    fixed_z, fixed_y = _fixed_noise(cfg, device)
    step_fn = GANStep(G_ddp, D_ddp, state.opt_G, state.opt_D, precision=cfg.optim.precision,
                      d_steps=cfg.optim.d_steps, **PRESETS[cfg.optim.step_impl])

    logger = RunLogger(out, info.is_main, cfg.run.steps, state.step, progress=cfg.run.progress)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if resumed_from is not None:
            logger.message(f"resumed from {resumed_from} at step {state.step}")

    data_iter: Iterator = infinite_batches(data.loader, data.sampler)
    skipped_pending: list[torch.Tensor] = []  # per batch, summed at log steps (no sync per step)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels, skipped = next(data_iter)
        skipped_pending.append(skipped.sum())
        if data.prepared:
            from .prepared_data import to_training_batch
            images = to_training_batch(images, device, flip=data.flip)
        else:
            images = images.to(device, non_blocking=True)
            if data.flip:
                images = random_flip(images)
        labels = labels.to(device, non_blocking=True) if cfg.model.n_classes > 0 else None
        return images, labels

    meter = ScalarMeter(device, state.step)
    images_per_s = None
    last_ckpt = last_samples = None
    try:
        while state.step < cfg.run.steps:
            stats = step_fn([next_batch() for _ in range(cfg.optim.d_steps)])
            state.step += 1
            step = state.step
            state.ema.update(step)
            meter.add(stats)
            logger.advance()
            final = step == cfg.run.steps

            if step % cfg.run.log_every == 0 or final:
                skipped_now = _sum_over_ranks(int(sum(int(t) for t in skipped_pending)), info)
                skipped_pending.clear()
                state.skipped_images += skipped_now
                scalars = meter.read(step, cfg.data.batch_size * info.world_size)
                images_per_s = scalars["images_per_s"]
                step_fn.check_spectral_norms()  # the SN check the step skips (a sync is paid here anyway)
                scalars["skipped_images"] = float(state.skipped_images)
                if info.is_main:
                    for name, model in (("G", state.G), ("D", state.D)):
                        scalars.update(attention_gammas(name, model))
                        scalars.update(sigma_stats(name, model))
                logger.log(step, scalars)
                if skipped_now:
                    logger.message(f"step {step}: {state.skipped_images} unreadable image(s) skipped so far")

            if info.is_main and (step % cfg.run.sample_every == 0 or final):
                last_samples = out / SAMPLES_DIR / f"step_{step:08d}.png"
                with torch.no_grad():
                    save_image_grid(state.ema.model(fixed_z, fixed_y), last_samples)

            if step % cfg.run.ckpt_every == 0 or final:
                last_ckpt = save_state(cfg, state, info)
            _crash_hook(step, info)

        if cfg.run.dump_rank_state:
            ckpt.atomic_torch_save({"G": state.G.state_dict(), "D": state.D.state_dict(), "step": state.step},
                                   out / "rank_state" / f"rank{info.rank}.pt")
        barrier(info)
    finally:
        logger.close()
    return TrainResult(step=state.step, out=out, last_checkpoint=last_ckpt, last_samples=last_samples,
                       resumed_from=resumed_from, skipped_images=state.skipped_images, images_per_s=images_per_s)


def _fixed_noise(cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sample grid's noise: the same for every step of a run (its own generator)."""
    g = torch.Generator().manual_seed(cfg.run.seed)
    z = torch.randn(cfg.run.n_samples, cfg.model.z_dim, generator=g).to(device)
    y = (torch.arange(cfg.run.n_samples) % cfg.model.n_classes).to(device) if cfg.model.n_classes > 0 else None
    return z, y


def _sum_over_ranks(value: int, info: DistInfo) -> int:
    return sum(all_gather_objects(value, info))
