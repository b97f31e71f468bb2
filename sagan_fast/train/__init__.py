"""Training: typed config, hinge loss, TTUR Adam, EMA of G, data, checkpoints, DDP, logging, loop.

Entry point: ``train_ddp.py`` (``python train_ddp.py ...`` or ``torchrun ... train_ddp.py ...``).
In Python::

    from sagan_fast.train import parse_config, train
    result = train(parse_config(["--steps", "100", "--out", "runs/try"]))
"""

from .config import (ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig,
                     build_parser, parse_config)
from .data import DataError
from .distributed import DistInfo, destroy_distributed, init_distributed
from .ema import EMA
from .loop import StepStats, TrainResult, d_step, g_step, train, train_step
from .losses import hinge_loss_d, hinge_loss_g

__all__ = [
    "ConfigError", "DataConfig", "DataError", "DistInfo", "EMA", "ModelConfig", "OptimConfig",
    "RunConfig", "StepStats", "TrainConfig", "TrainResult", "build_parser", "d_step",
    "destroy_distributed", "g_step", "hinge_loss_d", "hinge_loss_g", "init_distributed",
    "parse_config", "train", "train_step",
]
