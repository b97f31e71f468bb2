"""Training: typed config, the GAN step, hinge loss, TTUR Adam, EMA of G, data, checkpoints, DDP,
logging, the loop.

Entry point: ``train_ddp.py`` (``python train_ddp.py ...`` or ``torchrun ... train_ddp.py ...``).
In Python::

    from sagan_fast.train import parse_config, train
    result = train(parse_config(["--steps", "100", "--out", "runs/try"]))

Modules: ``config`` (flags from typed fields), ``step`` (:class:`GANStep`: one D/G iteration, fast
or plain), ``data`` (:class:`~sagan_fast.train.data.BatchSource`: digits, an image folder or a
prepared one), ``checkpoint`` (save, resume, unreadable files set aside, RNG state), ``observe``
(sample grids, gammas, SN sigmas), ``logging``, ``distributed``, ``ema``, ``losses``, ``loop``
(:func:`train`), ``runfolder`` (the run folder's lock), ``stop`` (SIGINT/SIGTERM: save and stop),
``errors`` (the one-line user errors, agreed across ranks), and ``prepared_data``
(``python -m sagan_fast.train.prepared_data``: prepare an image folder once).
"""

from .config import (ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig,
                     build_parser, parse_config)
from .data import DataError
from .distributed import DistInfo, destroy_distributed, init_distributed
from .ema import EMA
from .loop import TrainResult, train
from .losses import hinge_loss_d, hinge_loss_g
from .step import GANStep, sample_latents

__all__ = [
    "ConfigError", "DataConfig", "DataError", "DistInfo", "EMA", "GANStep", "ModelConfig", "OptimConfig",
    "RunConfig", "TrainConfig", "TrainResult", "build_parser", "destroy_distributed", "hinge_loss_d",
    "hinge_loss_g", "init_distributed", "parse_config", "sample_latents", "train",
]
