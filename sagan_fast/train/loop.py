"""The training loop, top to bottom: build, resume, then ``while step < steps``: batch, step, EMA,
log, sample, evaluate, checkpoint, stop on a signal.

Every piece it calls lives with its kind: the GAN step (:mod:`.step`), the data (:mod:`.data`),
what a checkpoint holds and which one to resume from (:mod:`.checkpoint`), sample grids and model
statistics (:mod:`.observe`), logging (:mod:`.logging`), DDP (:mod:`.distributed`), the run
folder's lock (:mod:`.runfolder`), signals (:mod:`.stop`), one-line errors (:mod:`.errors`).
``python train_ddp.py`` (or torchrun) calls :func:`train`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import build_models
from ..models.blocks import count_parameters
from ..nn.spectral_norm import SpectralNormError
from . import checkpoint as ckpt
from .checkpoint import Resumed, TrainState
from .config import ConfigError, RunConfig, TrainConfig
from .data import BatchSource
from .distributed import (DistInfo, all_gather_objects, barrier, broadcast_buffers_once, share_kernel_tuning,
                          wrap_ddp)
from .ema import EMA
from .errors import Diverged, together
from .evaluation import RunEvaluation
from .logging import RunLogger, ScalarMeter
from .observe import fixed_noise, model_scalars, newest_samples, save_samples
from .runfolder import RunFolder
from .step import PRESETS, STAT_NAMES, GANStep
from .stop import StopRequest


@dataclass
class TrainResult:
    """What a finished run leaves behind (paths on rank 0)."""

    step: int
    out: Path
    last_checkpoint: Path | None = None
    """The newest checkpoint (the resumed one if this call wrote none)."""
    last_samples: Path | None = None
    """The newest sample grid up to ``step`` (an earlier call's if this one wrote none)."""
    resumed_from: Path | None = None
    skipped_images: int = 0
    """Unreadable image files met so far, each counted once."""
    images_per_s: float | None = None
    """Training throughput (all processes) over the last log interval."""
    start_step: int = 0
    """The step this call started at (the checkpoint's, or 0)."""
    scores: dict[str, float] | None = None
    """The last evaluation's scores (rank 0), if the run evaluated."""
    stopped_by: int | None = None
    """The signal (SIGINT, SIGTERM) that ended the run before --steps, after a checkpoint of the
    step it was in; None: the run got to --steps."""


def train(cfg: TrainConfig, info: DistInfo | None = None) -> TrainResult:
    """Run (or continue) the training described by ``cfg`` in this process; see train_ddp.py."""
    info = info or DistInfo()
    out = Path(cfg.run.out)
    configure_torch(cfg.run, info.device)
    batches = together(info, BatchSource, cfg, info)  # before the run folder: a bad --data leaves no folder
    with RunFolder(out, info):  # created, writable, locked: refuses a folder another run trains in
        state = build_state(cfg, info, batches)
        # Wrap before loading a checkpoint: DDP's initial parameter broadcast writes the weights, and
        # SN's "u, v are up to date" marks (restored by the load) must come after every such write.
        G, D = wrap_ddp(state.G, info), wrap_ddp(state.D, info)
        resumed = ckpt.resume(cfg, state, info)
        if resumed is None or not resumed.rng_restored:
            seed_everything(per_rank_seed(cfg, info, state.step))
        gan_step = GANStep(G, D, state.opt_G, state.opt_D, precision=cfg.optim.precision,
                           d_steps=cfg.optim.d_steps, **PRESETS[cfg.optim.step_impl])
        logger = RunLogger(out, info.is_main, cfg.run.steps, state.step, progress=cfg.run.progress)
        result = TrainResult(step=state.step, out=out, start_step=state.step,
                             resumed_from=resumed.path if resumed else None,
                             last_checkpoint=resumed.path if resumed else None,
                             last_samples=newest_samples(out, state.step))
        if info.is_main:
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            for line in banner(cfg, info, state, resumed):
                logger.message(line)
        noise = fixed_noise(cfg, info.device)
        meter = ScalarMeter(STAT_NAMES, info.device, state.step)
        evaluation = RunEvaluation(cfg, info, state, logger)
        try:
            with StopRequest(info) as stop:
                while state.step < cfg.run.steps:
                    stats = gan_step(batches.take(cfg.optim.d_steps))
                    state.step += 1
                    step = state.step
                    if step == result.start_step + 1:
                        share_kernel_tuning(info)  # the first step tuned the kernels on each rank
                    state.ema.update(step)
                    meter.add(stats)
                    logger.advance()
                    last = step == cfg.run.steps

                    if last or step % cfg.run.log_every == 0:
                        result.images_per_s = log_step(cfg, state, meter, gan_step, logger, info)
                    if info.is_main and (last or step % cfg.run.sample_every == 0):
                        result.last_samples, grid = save_samples(state.ema.model, noise, out, step)
                        logger.image("samples/ema", grid, step)
                    if evaluation.due(step, last):
                        result.scores = evaluation(state, meter)
                    saved = last or step % cfg.run.ckpt_every == 0
                    if saved:
                        result.last_checkpoint = save_checked(cfg, state, meter, gan_step, info)
                    if not last and (signum := stop.agreed()):  # every rank: the same step
                        if not saved:
                            result.last_checkpoint = save_checked(cfg, state, meter, gan_step, info)
                        result.stopped_by = signum
                        break

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
    return max(1, min(torch.get_num_threads(), cores - busy_cores()))


def busy_cores(seconds: float = 0.25) -> int:
    """How many cores other processes keep busy now: measured over ``seconds`` from /proc/stat (the
    1-minute load average lags: just after a job ends it still counts it), else the load average."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    busy_fraction = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
    return round(busy_fraction * (os.cpu_count() or 1))


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


def banner(cfg: TrainConfig, info: DistInfo, state: TrainState, resumed: Resumed | None) -> list[str]:
    """The start lines: where it runs, the models, the data, the run folder, where it starts."""
    device = str(info.device)
    if info.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(info.device)})"
    def size(model: nn.Module) -> str:
        n = count_parameters(model)
        return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
    lines = [f"train: {device}, {torch.get_num_threads()} CPU thread(s), {info.world_size} process(es); "
             f"G {size(state.G)} parameters, D {size(state.D)}; data: {state.batches.describe()}; "
             f"run folder {cfg.run.out}"]
    steps = cfg.run.steps
    if resumed is None:
        lines.append(f"train: starting at step 0 of {steps}")
    elif resumed.step >= steps:
        lines.append(f"train: resumed from {resumed.path} at step {resumed.step}: --steps {steps} is reached "
                     "already, nothing to train (raise --steps to go on)")
    else:
        lines.append(f"train: resumed from {resumed.path} at step {resumed.step} of {steps}")
    every = cfg.eval.every(cfg.data.data)
    judge = "the digits judge" if cfg.data.data == "digits" else "Inception"
    if cfg.eval.inception_weights and cfg.data.data == "digits":
        judge += " and Inception"
    lines.append(f"train: scoring the EMA generator every {every} steps ({cfg.eval.eval_samples} samples, "
                 f"{judge})" if every else "train: no scores during training (--eval-every 0, or an image "
                 "folder without --inception-weights)")
    lines += [f"warning: skipped folder {path}: cannot be listed ({why}); its images are not used"
              for path, why in getattr(state.batches.dataset, "unreadable_folders", ())]
    return lines + (resumed.notes if resumed else [])


# --- what a step shows ---------------------------------------------------------------------------------

def log_step(cfg: TrainConfig, state: TrainState, meter: ScalarMeter, gan_step: GANStep, logger: RunLogger,
             info: DistInfo) -> float:
    """Read the step statistics back (the log step's sync), log them and the unreadable images met
    since the last log step (each file once, over all ranks), then check the run has not diverged
    (raises Diverged on every rank if it has); returns images/s."""
    scalars = meter.read(state.step, cfg.data.batch_size * info.world_size)
    new_files = []
    for rank_files in all_gather_objects(state.batches.pop_unreadable(), info):
        for path, why in rank_files:
            if path not in state.unreadable_images:
                state.unreadable_images.add(path)
                new_files.append((path, why))
    for n, (path, why) in enumerate(new_files, start=state.skipped_images + 1):
        logger.message(f"warning: skipped unreadable image {path} ({why}); {n} skipped so far", warning=True)
    state.skipped_images += len(new_files)
    scalars["skipped_images"] = float(state.skipped_images)
    if info.is_main:
        scalars.update(model_scalars(state.G, state.D))
    logger.log(state.step, scalars)
    check_health(cfg, state, scalars, gan_step, info)
    return scalars["images_per_s"]


def check_health(cfg: TrainConfig, state: TrainState, scalars: dict[str, float], gan_step: GANStep,
                 info: DistInfo) -> None:
    """Raise :class:`Diverged` on every rank if any rank's mean losses (``scalars``) are non-finite
    or beyond --max-loss, or a spectral norm degenerated (one sync, one collective)."""
    together(info, _raise_if_diverged, cfg, state.step, scalars, gan_step, state)


def _raise_if_diverged(cfg: TrainConfig, step: int, scalars: dict[str, float], gan_step: GANStep,
                       state: TrainState | None = None) -> None:
    _raise_if_losses_diverged(cfg, step, scalars, gan_step)
    if state is not None:  # SN keeps the losses small while G's weights explode (--lr-g 1e8)
        ckpt.check_weights(cfg, state)


def _raise_if_losses_diverged(cfg: TrainConfig, step: int, scalars: dict[str, float], gan_step: GANStep
                              ) -> None:
    problem = None
    for name in STAT_NAMES:
        value = scalars[name]
        if not math.isfinite(value):
            problem = f"{name} is {value}"
        elif name.startswith("loss") and abs(value) > cfg.run.max_loss:
            problem = f"{name} = {value:.3g}, beyond --max-loss {cfg.run.max_loss:g}"
        if problem:
            break
    if problem is None:
        try:
            gan_step.check_spectral_norms()  # the check the step skips (a sync is paid here anyway)
        except SpectralNormError as err:
            problem = str(err).split(" (the weight")[0]
    if problem is not None:
        newest = ckpt.newest_checkpoint(cfg.run.out)
        then = (f"the last checkpoint, {newest}, is kept: lower --lr-g / --lr-d (or raise --max-loss) and "
                "run again to continue from it" if newest else
                "no checkpoint was written: lower --lr-g / --lr-d (or raise --max-loss) and start again")
        raise Diverged(f"step {step}: the run diverged: {problem}; {then}")


def save_checked(cfg: TrainConfig, state: TrainState, meter: ScalarMeter, gan_step: GANStep,
                 info: DistInfo) -> Path | None:
    """The checkpoint of this step, unless the run diverged since the last check: the last good
    checkpoint must not be pruned for a bad one."""
    check_health(cfg, state, meter.peek(), gan_step, info)
    return ckpt.save_training_state(cfg, state, info)
