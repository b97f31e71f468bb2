"""Evaluation during training: scores logged and plotted, best.pt kept by FID, sample grids in
TensorBoard, a conditional grid one class per row, no effect on the weights a run trains."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sagan_fast import load_generator
from sagan_fast.images import grid_labels
from sagan_fast.train import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, parse_config, train
from sagan_fast.train.config import EvalConfig
from sagan_fast.train.evaluation import BEST_CHECKPOINT, PLOT_FILE, read_score_history
from sagan_fast.train.observe import fixed_noise

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def eval_config(out: Path, steps: int = 4, eval_every: int = 2, **run) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(resolution=32, ch=4, z_dim=16, n_classes=10, attn_resolution=16),
        data=DataConfig(data="digits", batch_size=4),
        optim=OptimConfig(lr_g=1e-3, lr_d=2e-3),
        run=RunConfig(**{"steps": steps, "out": str(out), "log_every": 2, "ckpt_every": 2, "sample_every": 2,
                         "n_samples": 20, "keep_ckpts": 2, "progress": False, **run}),
        eval=EvalConfig(eval_every=eval_every, eval_samples=40),
    )


def scores_in(out: Path) -> list[tuple[int, dict[str, float]]]:
    return read_score_history(out / "metrics.jsonl", 10**9)


def test_defaults_evaluate_digits_only():
    cfg = parse_config([])
    assert cfg.eval.every("digits") == 250
    assert cfg.eval.every("/data/celeba") == 0  # an image folder needs Inception weights
    assert parse_config(["--inception-weights", "w.pth"]).eval.every("/data/celeba") == 5000
    assert parse_config(["--eval-every", "0"]).eval.every("digits") == 0
    assert parse_config(["--eval-every", "7", "--eval-samples", "64"]).eval == EvalConfig(7, 64)


def test_run_logs_plots_and_keeps_the_best(tmp_path, capsys):
    out = tmp_path / "run"
    result = train(eval_config(out, steps=5))
    history = scores_in(out)
    assert [step for step, _ in history] == [2, 4, 5]  # every 2 steps and the last one
    for _, scores in history:
        for key in ("digits/fid", "digits/kid", "digits/is", "digits/coverage", "digits/confident",
                    "digits/accuracy"):
            assert math.isfinite(scores[key]), key
    assert result.scores == history[-1][1]
    printed = capsys.readouterr().out
    assert printed.count("eval step ") == 3 and "(real 2.31)" in printed  # beside the real data's own value

    with Image.open(out / PLOT_FILE) as plot:
        assert plot.format == "PNG" and plot.width > 300

    best_step, best_scores = min(history, key=lambda h: h[1]["digits/fid"])
    saved = torch.load(out / BEST_CHECKPOINT, weights_only=True)
    assert saved["step"] == best_step and saved["best"]["value"] == best_scores["digits/fid"]
    assert saved["scores"]["digits/fid"] == best_scores["digits/fid"]
    G = load_generator(out / BEST_CHECKPOINT)
    assert (G.z_dim, G.n_classes) == (16, 10)
    # Every checkpoint carries the best so far, so a resumed run compares against it.
    newest = torch.load(out / "checkpoints" / "step_00000005.pt", weights_only=True)
    assert newest["best"] == saved["best"]


def test_resume_continues_the_history_and_the_best(tmp_path):
    out = tmp_path / "run"
    train(eval_config(out, steps=4))
    first = scores_in(out)
    best_before = torch.load(out / BEST_CHECKPOINT, weights_only=True)["best"]
    train(eval_config(out, steps=6))
    history = scores_in(out)
    assert [s for s, _ in history] == [2, 4, 6] and history[:2] == first
    best_after = torch.load(out / BEST_CHECKPOINT, weights_only=True)["best"]
    fid6 = history[-1][1]["digits/fid"]
    assert best_after == (best_before if fid6 >= best_before["value"] else
                          {"step": 6, "key": "digits/fid", "value": fid6})


def test_a_run_shorter_than_the_interval_is_not_scored(tmp_path):
    train(eval_config(tmp_path / "run", steps=3, eval_every=5))
    assert scores_in(tmp_path / "run") == [] and not (tmp_path / "run" / BEST_CHECKPOINT).exists()


def test_evaluating_does_not_change_the_weights(tmp_path):
    with_eval = train(eval_config(tmp_path / "a", steps=3, eval_every=1))
    without = train(eval_config(tmp_path / "b", steps=3, eval_every=0))
    assert not (tmp_path / "b" / PLOT_FILE).exists() and not (tmp_path / "b" / BEST_CHECKPOINT).exists()
    a = torch.load(with_eval.last_checkpoint, weights_only=True)
    b = torch.load(without.last_checkpoint, weights_only=True)
    for key in ("G", "D", "G_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


def test_sample_grids_go_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(eval_config(out, steps=2, eval_every=0))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("samples/ema")
    assert [e.step for e in images] == [2]
    with Image.open(out / "samples" / "step_00000002.png") as png:
        assert (images[0].width, images[0].height) == png.size


def test_conditional_grid_has_one_class_per_row():
    labels, per_row = grid_labels(100, 10)
    assert per_row == 10 and labels.view(10, 10).eq(torch.arange(10).view(10, 1)).all()
    labels, per_row = grid_labels(64, 10)  # 7 per row, the last row short
    assert per_row == 7 and labels.tolist() == [i // 7 for i in range(64)] and labels.max() == 9
    assert grid_labels(64, 0) == (None, 8)
    cfg = parse_config(["--n-classes", "10", "--n-samples", "30"])
    _, y = fixed_noise(cfg, torch.device("cpu"))
    assert y.tolist() == [i // 3 for i in range(30)]


@pytest.mark.parametrize("argv,match", [
    (["--inception-weights", "/nonexistent/weights-inception.pth"],
     "--inception-weights: .*weights-inception.pth"),  # a smoke run that would not score: still an error
    (["--inception-weights", "/nonexistent/weights-inception.pth", "--eval-every", "1"],
     "--inception-weights: .*weights-inception.pth"),
    (["--eval-every", "1", "--data", "FOLDER"], "--eval-every: cannot evaluate this run: .*Inception"),
    (["--inception-weights", "GARBAGE", "--eval-every", "1"],  # a file, not Inception's (or no torch-fidelity)
     "--inception-weights: cannot evaluate this run: .*(garbage.pth|torch-fidelity)"),
    (["--eval-samples", "1"], "--eval-samples: must be >= 2"),
])
def test_evaluation_mistakes_are_one_line(tmp_path, argv, match):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 20, 90)).save(folder / f"{i}.png")
    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    argv = [str(folder) if a == "FOLDER" else str(tmp_path / "garbage.pth") if a == "GARBAGE" else a
            for a in argv]
    proc = subprocess.run([sys.executable, str(ROOT / "train_ddp.py"), "--out", str(tmp_path / "run"), "--steps",
                           "1", "--ch", "4", "--batch-size", "4", "--cpu-threads", "1", "--no-progress", *argv],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_ddp.py: error: "), proc.stderr
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_score_history_reads_evaluation_records_only(tmp_path):
    # An evaluation's JSONL record: plain floats under <extractor>/<score> keys (null if not finite).
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 2, "loss_d": 2.0}) + "\n"
                    + json.dumps({"step": 3, "digits/fid": 1.5, "digits/kid": None}) + "\n" + '{"step": 4, "dig')
    (step, scores), = read_score_history(path, 10)
    assert step == 3 and scores["digits/fid"] == 1.5 and math.isnan(scores["digits/kid"])
    assert read_score_history(path, 2) == []


def test_evaluation_under_torchrun_scores_on_rank_0_and_every_rank_writes_best(tmp_path):
    """2 gloo ranks: rank 0 scores (no collective inside the scores: it once hung), the best.pt decision
    is shared, each evaluation is one line and one JSONL record."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "train_ddp.py"), "--out", str(out), "--steps", "4", "--eval-every", "2",
         "--eval-samples", "40", "--ch", "2", "--z-dim", "8", "--batch-size", "4", "--n-samples", "10",
         "--log-every", "2", "--ckpt-every", "1000", "--cpu-threads", "1", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval step ") == 2, proc.stdout
    assert [step for step, _ in scores_in(out)] == [2, 4]
    saved = torch.load(out / BEST_CHECKPOINT, weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2  # a collective save, every rank's RNG
