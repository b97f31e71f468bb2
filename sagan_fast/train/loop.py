"""The training loop, top to bottom: build, resume, then ``while step < steps``: batch, step, EMA,
log, sample, evaluate, checkpoint.

Every piece it calls lives with its kind: the GAN step (:mod:`.step`), the data (:mod:`.data`),
what a checkpoint holds and which one to resume from (:mod:`.checkpoint`), sample grids and model
statistics (:mod:`.observe`), logging (:mod:`.logging`), DDP (:mod:`.distributed`).
``python train_ddp.py`` (or torchrun) calls :func:`train`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import build_models
from . import checkpoint as ckpt
from .checkpoint import TrainState
from .config import ConfigError, RunConfig, TrainConfig
from .data import BatchSource
from .distributed import DistInfo, all_gather_objects, barrier, broadcast_buffers_once, wrap_ddp
from .ema import EMA
from .logging import RunLogger, ScalarMeter
from .observe import fixed_noise, model_scalars, save_samples
from .step import PRESETS, STAT_NAMES, GANStep


@dataclass
class TrainResult:
    """What a finished run leaves behind (paths on rank 0)."""

    step: int
    out: Path
    last_checkpoint: Path | None = None
    last_samples: Path | None = None
    resumed_from: Path | None = None
    skipped_images: int = 0
    images_per_s: float | None = None
    """Training throughput (all processes) over the last log interval."""


def train(cfg: TrainConfig, info: DistInfo | None = None) -> TrainResult:
    """Run (or continue) the training described by ``cfg`` in this process; see train_ddp.py."""
    info = info or DistInfo()
    out = Path(cfg.run.out)
    configure_torch(cfg.run, info.device)
    batches = BatchSource(cfg, info)
    state = build_state(cfg, info, batches)
    # Wrap before loading a checkpoint: DDP's initial parameter broadcast writes the weights, and
    # SN's "u, v are up to date" marks (restored by the load) must come after every such write.
    G, D = wrap_ddp(state.G, info), wrap_ddp(state.D, info)
    resumed_from = ckpt.resolve_resume(cfg.run)
    if resumed_from is None or not ckpt.load_training_state(resumed_from, cfg, state, info):
        seed_everything(per_rank_seed(cfg, info, state.step))
    gan_step = GANStep(G, D, state.opt_G, state.opt_D, precision=cfg.optim.precision,
                       d_steps=cfg.optim.d_steps, **PRESETS[cfg.optim.step_impl])
    logger = RunLogger(out, info.is_main, cfg.run.steps, state.step, progress=cfg.run.progress)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if resumed_from is not None:
            logger.message(f"resumed from {resumed_from} at step {state.step}")
    noise = fixed_noise(cfg, info.device)
    meter = ScalarMeter(STAT_NAMES, info.device, state.step)
    result = TrainResult(step=state.step, out=out, resumed_from=resumed_from)
    try:
        while state.step < cfg.run.steps:
            stats = gan_step(batches.take(cfg.optim.d_steps))
            state.step += 1
            step = state.step
            state.ema.update(step)
            meter.add(stats)
            logger.advance()
            last = step == cfg.run.steps

            if last or step % cfg.run.log_every == 0:
                result.images_per_s = log_step(cfg, state, meter, gan_step, logger, info)
            if info.is_main and (last or step % cfg.run.sample_every == 0):
                result.last_samples = save_samples(state.ema.model, noise, out, step)
            metrics = evaluate(cfg, state, info)
            if metrics:
                logger.log(step, metrics)
            if last or step % cfg.run.ckpt_every == 0:
                result.last_checkpoint = ckpt.save_training_state(cfg, state, info)

        if cfg.run.dump_rank_state:
            ckpt.dump_rank_state(state, out, info.rank)
        barrier(info)
    finally:
        logger.close()
    result.step, result.skipped_images = state.step, state.skipped_images
    return result


# --- building ----------------------------------------------------------------------------------------

def configure_torch(run: RunConfig, device: torch.device) -> None:
    """Deterministic algorithms or cuDNN autotuning, TF32 for float32 GPU runs, a CPU run's threads."""
    if run.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for float32 runs (bf16 runs are unaffected)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(run.cpu_threads))


def cpu_threads(requested: int) -> int:
    """``requested`` if > 0, else $OMP_NUM_THREADS if set, else the idle cores (at least 1)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(torch.get_num_threads(), cores - busy))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def per_rank_seed(cfg: TrainConfig, info: DistInfo, step: int = 0) -> int:
    """Noise and flips differ per rank (model init, before, was shared)."""
    return cfg.run.seed + 1_000_003 * (info.rank + 1) + step


def build_state(cfg: TrainConfig, info: DistInfo, batches: BatchSource) -> TrainState:
    """Models (the same seed on every rank: equal weights and SN buffers), EMA, TTUR Adam."""
    seed_everything(cfg.run.seed)
    G, D = build_models(cfg.model, batches.channels)
    G, D = G.to(info.device), D.to(info.device)
    if cfg.run.sync_bn and info.distributed:
        if info.device.type != "cuda":
            raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm works on GPUs only (this run is on the "
                              "CPU)")
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
    broadcast_buffers_once(G, info)
    broadcast_buffers_once(D, info)
    o = cfg.optim
    opt_G = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2), eps=o.adam_eps)
    opt_D = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2), eps=o.adam_eps)
    return TrainState(G, D, EMA(G, o.ema_decay, o.ema_start), opt_G, opt_D, batches)


# --- what a step shows ---------------------------------------------------------------------------------

def log_step(cfg: TrainConfig, state: TrainState, meter: ScalarMeter, gan_step: GANStep, logger: RunLogger,
             info: DistInfo) -> float:
    """Read the step statistics back (the log step's sync), check SN, log; returns images/s."""
    skipped_now = sum(all_gather_objects(state.batches.pop_skipped(), info))
    state.skipped_images += skipped_now
    scalars = meter.read(state.step, cfg.data.batch_size * info.world_size)
    gan_step.check_spectral_norms()  # the check the step skips (a sync is paid here anyway)
    scalars["skipped_images"] = float(state.skipped_images)
    if info.is_main:
        scalars.update(model_scalars(state.G, state.D))
    logger.log(state.step, scalars)
    if skipped_now:
        logger.message(f"step {state.step}: {state.skipped_images} unreadable image(s) skipped so far")
    return scalars["images_per_s"]


def evaluate(cfg: TrainConfig, state: TrainState, info: DistInfo) -> dict[str, float]:
    """Quality metrics of the EMA generator (``state.ema.model``) due at ``state.step``, logged with
    the step: the one place the loop evaluates. None are due yet: issue 11 adds FID and
    digit-classifier scores here, every N steps."""
    return {}
