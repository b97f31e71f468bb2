"""Sample quality during a training run: every ``--eval-every`` steps the EMA generator is scored.

Rank 0 scores ``--eval-samples`` images of the EMA generator with a
:class:`~sagan_fast.metrics.Evaluator` built once at the start (the built-in digits judge for the
digits, Inception from ``--inception-weights`` for an image folder). The scores are logged with the
step (TensorBoard, metrics.jsonl), printed on one line beside the real data's own values, plotted
over the run in ``<out>/metrics.png``, and when the FID is the lowest so far the whole training state
is written to ``<out>/best.pt`` (a checkpoint like the others: ``load_generator("<out>/best.pt")``,
``--resume <out>/best.pt``). The best FID so far travels in every checkpoint, so a resumed run keeps
comparing against it. Scoring touches no random stream of the run: a run that evaluates trains the
same weights as one that does not.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .checkpoint import TrainState, save_training_state
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, all_gather_objects
from .errors import together
from .logging import METRICS_FILE, RunLogger, ScalarMeter

BEST_CHECKPOINT = "best.pt"
PLOT_FILE = "metrics.png"


def build_evaluator(cfg: TrainConfig, info: DistInfo):
    """The run's :class:`~sagan_fast.metrics.Evaluator` (real side extracted now); a bad
    --inception-weights or a missing dependency is a ConfigError naming the flag."""
    from ..metrics.evaluator import Evaluator
    from ..metrics.inception import MissingDependencyError

    weights = cfg.eval.inception_weights
    try:
        return Evaluator.for_data(cfg.data.data, cfg.model.resolution, inception_weights=weights,
                                  device=info.device, n_samples=cfg.eval.eval_samples, seed=cfg.run.seed)
    except (OSError, ValueError, MissingDependencyError) as err:
        what = "--inception-weights" if weights is not None else "--eval-every"
        raise ConfigError(f"{what}: cannot evaluate this run: {err}") from None


def check_inception_weights(path: str) -> None:
    """A ConfigError naming --inception-weights if ``path`` is not a file."""
    from ..metrics.inception import check_weights_path

    try:
        check_weights_path(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--inception-weights: {err}") from None


class RunEvaluation:
    """The evaluations of one training run (see the module doc). Every rank makes one and calls it
    at the same steps; only rank 0 scores."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, state: TrainState, logger: RunLogger) -> None:
        self.cfg, self.info, self.logger = cfg, info, logger
        self.out = Path(cfg.run.out)
        self.every = cfg.eval.every(cfg.data.data)
        # A run shorter than the interval (a smoke run of a few steps) is not scored at all.
        self.active = bool(self.every) and cfg.run.steps >= self.every
        self.evaluator = None
        if cfg.eval.inception_weights is not None:  # a wrong path is wrong whether this run scores or not
            together(info, check_inception_weights, cfg.eval.inception_weights)
        if self.active:  # built now: a file that is not Inception's is an error before any step
            self.evaluator = together(info, build_evaluator if info.is_main else lambda *a: None, cfg, info)
        self.history = read_score_history(self.out / METRICS_FILE, state.step) if info.is_main else []
        self._plot_warned = False

    def due(self, step: int, last: bool) -> bool:
        """Every ``every`` steps, and at the last step (of a run at least that long)."""
        return self.active and (last or step % self.every == 0)

    def __call__(self, state: TrainState, meter: ScalarMeter) -> dict[str, float]:
        """Score the EMA generator at ``state.step``; on every rank: write best.pt if it is the best
        so far. Returns the scores (rank 0; {} elsewhere, or when the images were not finite)."""
        start = time.perf_counter()
        scores, best = self._score(state) if self.info.is_main else ({}, None)
        best = all_gather_objects(best, self.info)[0]
        if best is not None:
            state.best = best
            save_training_state(self.cfg, state, self.info, path=self.out / BEST_CHECKPOINT,
                                extra={"scores": scores} if self.info.is_main else None)
        if scores:
            from ..metrics.evaluator import format_scores

            self.history.append((state.step, scores))
            self.logger.log(state.step, scores)
            mark = f"; the best so far, saved as {BEST_CHECKPOINT}" if best is not None else ""
            self.logger.message(f"eval step {state.step}: {format_scores(scores, self.evaluator.reference)} "
                                f"({self.cfg.eval.eval_samples} samples, {time.perf_counter() - start:.1f} s"
                                f"{mark})")
            self._plot()
        meter.exclude(time.perf_counter() - start)
        return scores

    def _score(self, state: TrainState) -> tuple[dict[str, float], dict[str, Any] | None]:
        """(scores, the new best record if these are the best so far) on rank 0."""
        try:
            scores = self.evaluator(state.ema.model)
        except ValueError as err:  # non-finite images: the divergence guard has the last word
            self.logger.message(f"warning: eval step {state.step} skipped: {err}", warning=True)
            return {}, None
        value = scores.get(self.evaluator.fid_key, math.nan)
        if math.isfinite(value) and (state.best is None or value < state.best["value"]):
            return scores, {"step": state.step, "key": self.evaluator.fid_key, "value": value}
        return scores, None

    def _plot(self) -> None:
        try:
            plot_scores(self.history, self.evaluator.reference, self.out / PLOT_FILE)
        except ImportError:
            if not self._plot_warned:
                self.logger.message(f"warning: matplotlib is not installed: no {PLOT_FILE} "
                                    "(pip install matplotlib)", warning=True)
                self._plot_warned = True


def is_score_key(key: str) -> bool:
    """``digits/fid``, ``inception/kid``, ...: the keys of an evaluation in metrics.jsonl."""
    return key.startswith(("digits/", "inception/"))


def read_score_history(path: Path, up_to_step: int) -> list[tuple[int, dict[str, float]]]:
    """(step, scores) of the evaluations a run's metrics.jsonl holds, up to ``up_to_step``."""
    if not path.exists():
        return []
    history = []
    for line in path.read_text().splitlines():
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        scores = {k: (math.nan if v is None else float(v)) for k, v in record.items() if is_score_key(k)}
        if scores and record.get("step", math.inf) <= up_to_step:
            history.append((int(record["step"]), scores))
    return history


def plot_scores(history: list[tuple[int, dict[str, float]]], reference: dict[str, float], path: Path) -> Path:
    """One panel per score over the steps, the real data's own value dashed; written atomically as
    PNG. matplotlib's object API (no pyplot): nothing global changes in the caller's process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..metrics.evaluator import NAMES

    keys = list(dict.fromkeys(k for _, scores in history for k in scores))
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = [(step, scores[key]) for step, scores in history if key in scores]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label="EMA G")
        if key in reference:
            ax.axhline(reference[key], color="gray", linestyle="--", linewidth=1, label="real data")
        extractor, name = key.split("/", 1)
        if name in ("fid", "kid") and all(v > 0 for _, v in points) and len(points) > 1:
            ax.set_yscale("log")
        ax.set_title(f"{extractor} {NAMES.get(name, name)}", fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    tmp.replace(path)
    return path


__all__ = ["BEST_CHECKPOINT", "PLOT_FILE", "RunEvaluation", "build_evaluator", "plot_scores",
           "read_score_history"]
