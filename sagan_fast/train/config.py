"""Typed training configuration: nested dataclasses, one docstring per field, validated on creation.

The command-line flags are generated from the fields (``ModelConfig.z_dim`` -> ``--z-dim``) and
their help text from the field docstrings, so a flag and its field cannot drift apart. Each section
is built from the parsed namespace by its own field names: no ``**kwargs`` from strings, a misspelt
flag is an argparse error, a bad value a :class:`ConfigError` naming the flag.

The model section, :class:`~sagan_fast.models.ModelConfig`, lives with the models (which are built
from it and must not depend on training); it is re-exported here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..models.config import ConfigError, ModelConfig, fail
from .step import PRECISIONS, PRESETS


def _check(cond: bool, field: str, problem: str) -> None:
    if not cond:
        fail(field, problem)


@dataclass
class DataConfig:
    """Where images come from and how they are batched."""

    data: str = "digits"
    """'digits' (scikit-learn's 8x8 handwritten digits, upsampled; no download) or a folder of
    jpg/png/webp images, searched recursively (CelebA's img_align_celeba works as is)."""
    batch_size: int | None = None
    """Images per process per step (the global batch is this times the number of processes).
    Default: 16 for digits, 32 for an image folder."""
    workers: int | None = None
    """DataLoader worker processes per rank; default: 0 for digits (in memory), 4 for a folder (at
    most the CPU cores this process may use)."""
    flip: bool | None = None
    """Random horizontal flips; default: on for an image folder, off for digits (a mirrored digit
    is not a digit)."""

    def __post_init__(self) -> None:
        _check(bool(self.data), "data", "must be 'digits' or a folder path")
        _check(self.batch_size is None or self.batch_size >= 1, "batch_size",
               f"must be >= 1, got {self.batch_size}")
        _check(self.workers is None or self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")


@dataclass
class OptimConfig:
    """Losses, optimizers (TTUR), EMA and precision."""

    lr_g: float | None = None
    """Generator learning rate. Default: 8e-4 for digits (the default run's recipe, measured: see
    docs/DESIGN.md), 1e-4 for an image folder (SAGAN's TTUR: G slower than D)."""
    lr_d: float | None = None
    """Discriminator learning rate. Default: 8e-4 for digits, 4e-4 for an image folder (SAGAN)."""
    beta1: float | None = None
    """Adam beta1. Default: 0.5 for digits, 0 for an image folder (SAGAN)."""
    beta2: float | None = None
    """Adam beta2. Default: 0.999 for digits, 0.9 for an image folder (SAGAN)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    d_steps: int = 1
    """Discriminator steps per generator step (each on a fresh real batch)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of G's weights (the EMA G makes the samples);
    warmed up as min(decay, (1 + n) / (10 + n)), n the steps since --ema-start."""
    ema_start: int = 0
    """Step from which the EMA averages; up to it the EMA copies G."""
    precision: str = "fp32"
    """'fp32', or 'bf16': forward passes under bfloat16 autocast (weights, optimizer and losses stay
    float32). --bf16 / --no-bf16 say the same."""
    step_impl: str = "fast"
    """Training step (sagan_fast.train.step.GANStep either way, the same math): 'fast' (channels_last,
    D once on real+fake, no D weight gradients in the G step, torch.compile on CUDA) or 'plain'
    (every speed option off: eager, D on real then on fake)."""

    def __post_init__(self) -> None:
        for name in ("lr_g", "lr_d", "adam_eps"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, f"must be > 0, got {value}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(value is None or 0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
        _check(self.d_steps >= 1, "d_steps", f"must be >= 1, got {self.d_steps}")
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.ema_start >= 0, "ema_start", f"must be >= 0, got {self.ema_start}")
        _check(self.precision in PRECISIONS, "precision",
               f"must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.step_impl in PRESETS, "step_impl",
               f"must be one of {tuple(PRESETS)}, got {self.step_impl!r}")


@dataclass
class RunConfig:
    """Length of the run, outputs, checkpoints, devices and distributed settings."""

    steps: int = 2000
    """Total generator steps (a resumed run continues up to this count). The default digits run
    shows recognizable digits from about step 1000 and clear ones at 2000 (~0.5 s/step on one free
    CPU core)."""
    out: str = "runs/sagan"
    """Run folder: checkpoints/, samples/, metrics.jsonl, TensorBoard events, config.json."""
    seed: int = 0
    """Seed of everything: model init (same on all ranks), noise (offset per rank), data order."""
    log_every: int = 50
    """Log scalars (TensorBoard + JSONL) every this many steps; losses are read back only then."""
    ckpt_every: int = 500
    """Write a checkpoint every this many steps (and at the last step)."""
    keep_ckpts: int = 3
    """How many of the latest checkpoints to keep."""
    sample_every: int = 250
    """Write a sample grid (EMA G, fixed noise) every this many steps (and at the last step)."""
    n_samples: int = 64
    """Images in the sample grid."""
    resume: str = "auto"
    """'auto': continue from the latest checkpoint in --out if there is one; 'latest': the same but
    it must exist; 'never': start fresh (an error if --out holds checkpoints); or a checkpoint file
    path. --resume alone means 'latest'."""
    device: str = "auto"
    """'auto' (cuda:LOCAL_RANK if CUDA is available, else cpu), 'cpu' or 'cuda'."""
    cpu_threads: int = 0
    """Intra-op threads of a CPU run; 0: $OMP_NUM_THREADS if set, else the cores left idle by other
    processes (from the load average), at least 1 (busy-waiting OpenMP threads on busy cores made
    a step 5x slower on a shared 2-core machine)."""
    sync_bn: bool = False
    """Synchronize G's batch-norm statistics across processes (SyncBatchNorm)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) and no cuDNN autotuning (slower; bit-reproducible
    on GPU too)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    dump_rank_state: bool = False
    """Debug: every rank writes its final G/D state dicts to rank_state/rank<R>.pt (to compare ranks)."""
    max_loss: float = 1e4
    """Divergence guard: stop the run (exit 2, keeping the last checkpoint, which was written before)
    when loss_d or loss_g, averaged since the last check, exceeds this in magnitude or is not
    finite, a spectral norm degenerates, or a weight or batch-norm statistic of G or D is not finite
    or beyond 1e8 (SN keeps the losses small while a far too high --lr-g blows up G). Checked at log
    and checkpoint steps. 'inf' checks finiteness only."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(bool(self.out), "out", "must be a folder path")
        _check(self.cpu_threads >= 0, "cpu_threads", f"must be >= 0, got {self.cpu_threads}")
        for name in ("log_every", "ckpt_every", "keep_ckpts", "sample_every", "n_samples"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _check(self.device in ("auto", "cpu", "cuda"), "device",
               f"must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        _check(bool(self.resume), "resume", "must be 'auto', 'latest', 'never' or a checkpoint path")
        _check(self.max_loss > 0, "max_loss", f"must be > 0, got {self.max_loss}")


@dataclass
class EvalConfig:
    """Sample quality during training: the EMA generator scored against the real data."""

    eval_every: int | None = None
    """Score the EMA generator every this many steps (and at the last step, if the run is that long):
    FID and KID, IS and for digits the built-in judge's scores, logged (TensorBoard, metrics.jsonl, a
    line), plotted in metrics.png, and best.pt kept by FID. 0: never. Default: 250 for digits; for an
    image folder 5000 with --inception-weights, else never (its FID needs Inception)."""
    eval_samples: int = 1000
    """Generated images per evaluation (FID from 1,000 samples is biased upwards: compare values of
    one run, or use python -m sagan_fast.evaluate --n 10000 for a final number)."""
    inception_weights: str | None = None
    """Inception-v3 weights file for Inception FID/KID/IS (torch-fidelity's
    weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-...pth; never
    downloaded; needs torch-fidelity). Needed to evaluate an image-folder run."""

    def __post_init__(self) -> None:
        _check(self.eval_every is None or self.eval_every >= 0, "eval_every",
               f"must be >= 0, got {self.eval_every}")
        _check(self.eval_samples >= 2, "eval_samples", f"must be >= 2 (FID needs a covariance), got "
               f"{self.eval_samples}")
        _check(self.inception_weights is None or bool(self.inception_weights), "inception_weights",
               "must be a file path")

    def every(self, data: str) -> int:
        """The evaluation interval for ``data`` (``eval_every``, or its default for that data)."""
        if self.eval_every is not None:
            return self.eval_every
        if data == "digits":
            return DIGITS_EVAL_EVERY
        return FOLDER_EVAL_EVERY if self.inception_weights else 0


DIGITS_EVAL_EVERY = 250
FOLDER_EVAL_EVERY = 5000


@dataclass
class TrainConfig:
    """Everything a training run needs; ``dataclasses.asdict`` of it goes into every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # Fields left None take the default of the data (see DATA_DEFAULTS); what a run records and
        # checkpoints is the resolved value.
        column = 0 if self.data.data == "digits" else 1
        for (section, name), values in DATA_DEFAULTS.items():
            part = getattr(self, section)
            if getattr(part, name) is None:
                setattr(self, section, dataclasses.replace(part, **{name: values[column]}))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` (also of an earlier version: see ``_RENAMED``); unknown keys
        are an error, not ignored."""
        sections = {}
        for f in dataclasses.fields(cls):
            section_cls = _SECTIONS[f.name]
            values = dict(d.get(f.name, {}))
            for old, (new, convert) in _RENAMED.get(f.name, {}).items():
                if old in values and new not in values:
                    values[new] = convert(values.pop(old))
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            unknown = set(values) - known
            if unknown:
                raise ConfigError(f"unknown {f.name} config key(s): {sorted(unknown)}")
            sections[f.name] = section_cls(**values)
        return cls(**sections)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig,
                              "eval": EvalConfig}
# Defaults that depend on the data: (digits, an image folder). The digits column is the default run's
# recipe, chosen by measurement (docs/DESIGN.md, "The default digits run"): all ten digits, clearly
# recognizable, in minutes on a 2-core CPU; class-conditional (the digits have labels). The folder
# column is SAGAN's (Zhang et al. 2018): TTUR with Adam(0, 0.9), unconditional (no labels).
DATA_DEFAULTS: dict[tuple[str, str], tuple[Any, Any]] = {
    ("model", "n_classes"): (10, 0),
    ("data", "batch_size"): (16, 32),
    ("optim", "lr_g"): (8e-4, 1e-4),
    ("optim", "lr_d"): (8e-4, 4e-4),
    ("optim", "beta1"): (0.5, 0.0),
    ("optim", "beta2"): (0.999, 0.9),
}
# Fields of earlier versions (in configs that checkpoints hold): old name -> (field, conversion).
_RENAMED: dict[str, dict[str, tuple[str, Any]]] = {
    "optim": {"bf16": ("precision", lambda bf16: "bf16" if bf16 else "fp32")},
}
# Flags that set a field to a fixed value: (section, field) -> [(flag, value, help)].
_ALIASES: dict[tuple[str, str], list[tuple[str, str, str]]] = {
    ("optim", "precision"): [("--bf16", "bf16", "Same as --precision bf16."),
                             ("--no-bf16", "fp32", "Same as --precision fp32.")],
    ("run", "resume"): [("--no-resume", "never", "Same as --resume never.")],
}


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source shipped (e.g. bytecode-only install): help text only
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: str) -> tuple[type, bool]:
    """('int | None') -> (int, True). Annotations are strings (``from __future__ import annotations``)."""
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) != 1 or parts[0] not in ("int", "float", "str", "bool"):
        raise TypeError(f"config field type {annotation!r} has no command-line form")
    return {"int": int, "float": float, "str": str, "bool": bool}[parts[0]], optional


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None (the field's docstring says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """One flag per field of every section; help text from the field docstrings."""
    parser = argparse.ArgumentParser(
        description="Train a SAGAN (python train_ddp.py ... or torchrun --nproc_per_node=N train_ddp.py ...).",
        formatter_class=_HelpFormatter)
    for section, section_cls in _SECTIONS.items():
        defaults = section_cls()  # the fields' own defaults (TrainConfig() resolves those the data decides)
        group = parser.add_argument_group(section, section_cls.__doc__)
        docs = field_docs(section_cls)
        for f in dataclasses.fields(section_cls):
            typ, _ = _base_type(str(f.type))
            default = getattr(defaults, f.name)
            kwargs: dict[str, Any] = dict(dest=f"{section}.{f.name}", default=default, help=docs.get(f.name, ""))
            if typ is not bool:
                kwargs["metavar"] = f.name.upper()
            if typ is bool:
                group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            elif section == "run" and f.name == "resume":
                group.add_argument(_flag(f.name), nargs="?", const="latest", type=str, **kwargs)
            else:
                group.add_argument(_flag(f.name), type=typ, **kwargs)
            for flag, value, text in _ALIASES.get((section, f.name), []):
                group.add_argument(flag, dest=kwargs["dest"], action="store_const", const=value, help=text,
                                   default=argparse.SUPPRESS)  # the field's flag sets the default
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse command-line flags into a validated :class:`TrainConfig` (ConfigError on bad values)."""
    ns = vars(build_parser().parse_args(argv))
    sections = {}
    for section, section_cls in _SECTIONS.items():
        values = {f.name: ns[f"{section}.{f.name}"] for f in dataclasses.fields(section_cls)}
        try:
            sections[section] = section_cls(**values)
        except ConfigError as err:
            if err.field is None:
                raise
            raise ConfigError(f"{_flag(err.field)}: {err.problem}", err.field, err.problem) from None
    return TrainConfig(**sections)


__all__ = ["ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "DATA_DEFAULTS", "build_parser", "field_docs", "parse_config"]
