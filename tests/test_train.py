"""Training: config validation, hinge loss, EMA, checkpoints, a short run's outputs, exact resume."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sagan_fast.train import (EMA, ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig,
                              hinge_loss_d, hinge_loss_g, parse_config, train)
from sagan_fast.train import checkpoint as ckpt
from sagan_fast.train.config import EvalConfig, field_docs


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def tiny_config(out: Path, **run) -> TrainConfig:
    """The smallest model the architecture allows (32 px, ch 4), a few steps: seconds on a CPU."""
    return TrainConfig(
        model=ModelConfig(resolution=32, ch=4, z_dim=16, n_classes=10, attn_resolution=16),
        data=DataConfig(data="digits", batch_size=4),
        # d_steps=2 and an EMA that starts mid-run exercise more state; lr raised so steps move weights.
        optim=OptimConfig(lr_g=1e-3, lr_d=2e-3, d_steps=2, ema_start=1),
        run=RunConfig(**{"steps": 2, "out": str(out), "log_every": 1, "ckpt_every": 1, "sample_every": 1,
                         "n_samples": 6, "keep_ckpts": 1, "progress": False, **run}),
    )


# --- config --------------------------------------------------------------------------------------

def test_defaults_parse_and_every_field_has_a_docstring():
    cfg = parse_config([])
    assert cfg == TrainConfig()
    assert cfg.data.data == "digits"
    # The digits recipe (the default run); an image folder gets SAGAN's settings, unconditional.
    assert (cfg.model.n_classes, cfg.data.batch_size, cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.beta1,
            cfg.optim.beta2, cfg.optim.d_steps) == (10, 16, 8e-4, 8e-4, 0.5, 0.999, 1)
    folder = parse_config(["--data", "/data/celeba"])
    assert (folder.model.n_classes, folder.data.batch_size, folder.optim.lr_g, folder.optim.lr_d,
            folder.optim.beta1, folder.optim.beta2) == (0, 32, 1e-4, 4e-4, 0.0, 0.9)
    assert parse_config(["--data", "/x", "--lr-g", "3e-4", "--n-classes", "5"]).optim.lr_g == 3e-4
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what a checkpoint records: resolved values
    for section in (ModelConfig, DataConfig, OptimConfig, RunConfig, EvalConfig):
        docs = field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if not docs.get(f.name)]
        assert not missing, f"{section.__name__} fields without a docstring: {missing}"


def test_cli_flags_reach_typed_fields():
    cfg = parse_config(["--resolution", "64", "--ch", "8", "--batch-size", "16", "--steps", "20",
                        "--ckpt-every", "10", "--sample-every", "10", "--out", "somewhere", "--bf16",
                        "--no-flip", "--sync-bn", "--lr-g", "2e-4", "--d-steps", "2", "--n-classes", "10"])
    assert (cfg.model.resolution, cfg.model.ch, cfg.model.n_classes) == (64, 8, 10)
    assert (cfg.data.batch_size, cfg.data.flip) == (16, False)
    assert (cfg.optim.precision, cfg.optim.lr_g, cfg.optim.d_steps) == ("bf16", 2e-4, 2)
    assert parse_config(["--precision", "bf16", "--no-bf16"]).optim.precision == "fp32"
    assert (cfg.run.steps, cfg.run.ckpt_every, cfg.run.out, cfg.run.sync_bn) == (20, 10, "somewhere", True)
    assert parse_config(["--resume"]).run.resume == "latest"
    assert parse_config(["--no-resume"]).run.resume == "never"
    assert parse_config(["--resume", "x.pt"]).run.resume == "x.pt"


@pytest.mark.parametrize("argv,match", [
    (["--resolution", "48"], "--resolution: must be one of"),
    (["--ch", "0"], "--ch: must be >= 1"),
    (["--attn-resolution", "64"], "--attn-resolution: must be 0 or a power of two"),
    (["--attn-resolution", "12"], "--attn-resolution"),
    (["--sn-impl", "spectral"], "--sn-impl: must be one of"),
    (["--attention-backend", "gpu"], "--attention-backend: must be one of"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--lr-g", "0"], "--lr-g: must be > 0"),
    (["--beta2", "1.0"], "--beta2: must be in"),
    (["--d-steps", "0"], "--d-steps: must be >= 1"),
    (["--ema-decay", "1"], "--ema-decay: must be in"),
    (["--keep-ckpts", "0"], "--keep-ckpts: must be >= 1"),
    (["--device", "tpu"], "--device: must be"),
    (["--precision", "fp16"], "--precision: must be one of"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_values_are_config_errors_naming_the_flag(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(argv)


def test_unknown_flags_and_keys_are_errors(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--learning-rate", "1"])
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err
    d = TrainConfig().to_dict()
    assert TrainConfig.from_dict(d) == TrainConfig()
    d["optim"]["lr_gen"] = 1.0
    with pytest.raises(ConfigError, match="lr_gen"):
        TrainConfig.from_dict(d)


# --- losses, EMA ------------------------------------------------------------------------------------

def test_hinge_losses():
    d_real = torch.tensor([2.0, 0.5, -1.0], dtype=torch.bfloat16)
    d_fake = torch.tensor([-3.0, 0.0, 1.5])
    # relu(1 - x): 0, 0.5, 2 -> 2.5/3;  relu(1 + x): 0, 1, 2.5 -> 3.5/3
    torch.testing.assert_close(hinge_loss_d(d_real, d_fake), torch.tensor(6.0 / 3))
    torch.testing.assert_close(hinge_loss_g(d_fake), torch.tensor(0.5))  # -mean(-3, 0, 1.5)
    assert hinge_loss_d(d_real, d_fake).dtype == torch.float32


def test_ema_copies_then_averages_with_warmup():
    src = torch.nn.Linear(3, 2)
    src.register_buffer("stat", torch.zeros(2))
    ema = EMA(src, decay=0.9, start=1)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    with torch.no_grad():
        src.weight.fill_(1.0)
        src.stat.fill_(5.0)
    ema.update(step=1)  # up to start: a copy
    assert torch.equal(ema.model.weight, src.weight) and torch.equal(ema.model.stat, src.stat)
    with torch.no_grad():
        src.weight.fill_(3.0)
    ema.update(step=2)  # n = 1: d = min(0.9, 2/11)
    d = 2.0 / 11.0
    torch.testing.assert_close(ema.model.weight, torch.full((2, 3), d * 1.0 + (1 - d) * 3.0))
    assert ema.decay_at(1000) == 0.9


# --- checkpoints -----------------------------------------------------------------------------------

def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = ckpt.capture_rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.atomic_torch_save({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.restore_rng_state(loaded, torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


class _NotAllowed:
    pass


def test_checkpoint_files_atomic_listing_retention_and_safe_loading(tmp_path):
    for step in (3, 10, 7):
        ckpt.save_checkpoint(tmp_path, step, {"x": torch.ones(2)}, keep=2)
    (tmp_path / ".step_00000011.pt.tmp123").write_bytes(b"half a file")  # an interrupted write
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000007.pt", "step_00000010.pt"]
    assert ckpt.load_checkpoint(tmp_path / "step_00000010.pt")["step"] == 10
    torch.save({"format": 1, "evil": _NotAllowed()}, tmp_path / "foreign.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global|_NotAllowed"):
        ckpt.load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sagan_fast training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


# --- runs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """2 steps in one go (checkpoints at 1 and 2, only the last kept)."""
    out = tmp_path_factory.mktemp("straight")
    result = train(tiny_config(out))
    return out, result


def test_short_run_writes_checkpoint_samples_and_logs(straight_run):
    out, result = straight_run
    assert result.step == 2 and result.resumed_from is None
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000002.pt"]
    state = ckpt.load_checkpoint(out / "checkpoints" / "step_00000002.pt")  # weights_only=True inside
    for key in ("G", "D", "G_ema", "opt_G", "opt_D", "sn", "rng", "sampler", "config", "step"):
        assert key in state, key
    assert any(k.endswith("parametrizations.weight.0._u") for k in state["D"]), "SN buffers not in the state dict"
    assert state["opt_D"]["state"], "optimizer state is empty"
    assert TrainConfig.from_dict(state["config"]) == tiny_config(out)

    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step_00000001.png", "step_00000002.png"]
    img = Image.open(samples[-1])
    # 6 samples of a 10-class G: one class per row (here one image each), 2 px padding
    assert img.mode == "L" and img.size == (1 * 34 + 2, 6 * 34 + 2)
    assert np.asarray(img).std() > 1.0, "the sample grid is blank"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "gamma/G.attention",
                "gamma/D.attention", "sn_sigma/G_mean", "sn_sigma/D_max", "skipped_images"):
        assert key in records[-1] and records[-1][key] is not None, key
    assert records[-1]["gamma/G.attention"] != 0.0, "attention gamma never trained"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["run"]["steps"] == 2


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], dict):
            _assert_same_state(a[k], b[k], f"{what}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}.{k} differs (max diff {(a[k].double() - b[k].double()).abs().max():.3g})"
        else:
            assert a[k] == b[k], f"{what}.{k}: {a[k]} != {b[k]}"


def test_resume_is_bit_exact(straight_run, tmp_path):
    straight_out, _ = straight_run
    first = train(tiny_config(tmp_path, steps=1))
    assert first.step == 1
    # Same folder, more steps: continues automatically from step 1.
    second = train(tiny_config(tmp_path))
    assert second.resumed_from is not None and second.resumed_from.name == "step_00000001.pt"
    a = ckpt.load_checkpoint(straight_out / "checkpoints" / "step_00000002.pt")
    b = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")
    for key in ("G", "D", "G_ema", "opt_G", "opt_D", "sn", "sampler"):
        _assert_same_state(a[key], b[key], key)
    assert_rng_equal(a["rng"][0], b["rng"][0])
    # Each step logged once, the log rewound to the checkpoint.
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def assert_rng_equal(a: dict, b: dict) -> None:
    assert torch.equal(a["torch"], b["torch"])
    assert torch.equal(a["numpy"]["keys"], b["numpy"]["keys"]) and a["numpy"]["pos"] == b["numpy"]["pos"]


def test_resume_refuses_a_different_model_or_a_missing_or_clobbered_checkpoint(straight_run, tmp_path):
    straight_out, _ = straight_run
    cfg = tiny_config(straight_out)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ch=8),
                              run=dataclasses.replace(cfg.run, steps=3))
    with pytest.raises(ConfigError, match="model settings differ.*'ch': \\(4, 8\\)"):
        train(cfg)
    fresh = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(dataclasses.replace(fresh, run=dataclasses.replace(fresh.run, resume="latest")))
    never = tiny_config(straight_out)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(dataclasses.replace(never, run=dataclasses.replace(never.run, resume="never")))


def test_resume_check_catches_a_lost_spectral_norm_state(straight_run, tmp_path, monkeypatch):
    """The comparison above can fail: dropping the SN state on load (so D's u, v get one power
    iteration more than in the uninterrupted run) changes the weights."""
    straight_out, _ = straight_run
    train(tiny_config(tmp_path, steps=1))
    monkeypatch.setattr(ckpt, "load_spectral_norm_state", lambda model, state: None)
    train(tiny_config(tmp_path))
    a = ckpt.load_checkpoint(straight_out / "checkpoints" / "step_00000002.pt")
    b = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_state(a["D"], b["D"], "D")


def test_folder_run_skips_and_counts_an_unreadable_image(tmp_path):
    root = tmp_path / "imgs"
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]):
        (root / f"k{i}").mkdir(parents=True)
        Image.new("RGB", (40 + i, 36), color).save(root / f"k{i}" / f"img{i}.png")
    (root / "k0" / "zz_truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    base = tiny_config(tmp_path / "run", steps=1)
    cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, n_classes=0),
        data=DataConfig(data=str(root), batch_size=5, workers=1),  # one batch = every file
        optim=dataclasses.replace(base.optim, d_steps=1))
    result = train(cfg)  # the file is read (and warned about) in the DataLoader worker process
    assert result.skipped_images == 1
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_images"] == 1.0
    assert Image.open(tmp_path / "run" / "samples" / "step_00000001.png").mode == "RGB"


def test_logger_rewinds_to_the_resume_step_and_drops_a_half_written_line(tmp_path):
    from sagan_fast.train.logging import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 5}\n{"step": 6}\n{"step": 7, "lo')
    logger = RunLogger(tmp_path, enabled=True, total_steps=10, start_step=5, progress=False)
    logger.log(6, {"loss_d": 1.5, "bad": float("nan")})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1}, {"step": 5}, {"step": 6, "loss_d": 1.5, "bad": None}]
    RunLogger(tmp_path / "rank1", enabled=False, total_steps=10).log(1, {"x": 1.0})
    assert not (tmp_path / "rank1").exists(), "a non-main rank wrote files"


def test_cpu_threads_respects_the_request_then_the_environment_then_idle_cores(monkeypatch):
    import os

    import sagan_fast.train.loop as loop

    assert loop.cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert loop.cpu_threads(0) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(loop, "busy_cores", lambda: 10**6)  # every core busy
    assert loop.cpu_threads(0) == 1
    monkeypatch.setattr(loop, "busy_cores", lambda: 0)  # idle: torch's own default
    assert loop.cpu_threads(0) == min(torch.get_num_threads(), len(os.sched_getaffinity(0)))


def test_busy_cores_sees_a_busy_process_now_not_a_minute_ago():
    """Measured over a moment (/proc/stat), not the 1-minute load average, which still counted a job
    that had just ended and gave the default run one thread of two (8.6 min instead of ~6)."""
    import multiprocessing
    import os

    from sagan_fast.train.loop import busy_cores

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here: the load average is used")
    spinner = multiprocessing.get_context("fork").Process(target=_spin, daemon=True)
    spinner.start()
    try:
        time.sleep(0.2)
        assert busy_cores(0.5) >= 1
    finally:
        spinner.kill()
        spinner.join()


def _spin() -> None:
    while True:
        pass


def test_discriminator_on_a_concatenated_batch_equals_two_calls():
    """The loop's D(cat([real, fake])) relies on D having no batch statistics."""
    from sagan_fast.models import build_models

    _, D = build_models(tiny_config(Path("unused")).model, image_channels=1)
    real, fake = torch.randn(3, 1, 32, 32), torch.randn(2, 1, 32, 32)
    y_real, y_fake = torch.tensor([1, 4, 9]), torch.tensor([0, 7])
    joint = D(torch.cat([real, fake]), torch.cat([y_real, y_fake]))
    separate = torch.cat([D(real, y_real), D(fake, y_fake)])
    # float32 convolutions over different batch sizes may sum in another order: ~1e-6 relative.
    torch.testing.assert_close(joint, separate, rtol=1e-5, atol=1e-5)


def test_entry_point_reports_user_errors_without_a_traceback(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ddp", Path(__file__).resolve().parents[1] / "train_ddp.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.main(["--resolution", "48"]) == 2
    assert "error: --resolution: must be one of" in capsys.readouterr().err
    assert entry.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert "no such folder" in capsys.readouterr().err


# --- checkpoints written by earlier code --------------------------------------------------------------

OLD_CHECKPOINT = Path(__file__).resolve().parent / "fixtures" / "checkpoint_main_0635966"


def _key_tree(d):
    return {k: _key_tree(v) if isinstance(v, dict) and k not in ("state", "sn", "config") else None
            for k, v in d.items()}


def test_a_checkpoint_written_before_the_redesign_resumes_where_that_run_went(tmp_path):
    """A step-1 checkpoint of the code at commit 0635966 loads, resumes, and step 2 logs the losses
    that run logged at step 2 (float32 rounding of another CPU aside), in a file of the same layout."""
    old = ckpt.load_checkpoint(OLD_CHECKPOINT / "step_00000001.pt")
    cfg = TrainConfig.from_dict(old["config"])
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=str(tmp_path), steps=2))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000001.pt").write_bytes(
        (OLD_CHECKPOINT / "step_00000001.pt").read_bytes())
    result = train(cfg)
    assert result.step == 2 and result.resumed_from.name == "step_00000001.pt"
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    expected = json.loads((OLD_CHECKPOINT / "step2_metrics.json").read_text())
    assert logged["step"] == expected["step"] == 2
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert abs(logged[key] - expected[key]) <= 1e-3 * (1 + abs(expected[key])), (key, logged, expected)
    new = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_00000002.pt")
    # The same layout; keys added since (absent in old files, which load without them) listed here.
    assert _key_tree({k: v for k, v in new.items() if k not in ("unreadable_images", "best")}) == _key_tree(old)
    # The config holds --bf16's successor, precision; the old one converts to it.
    assert "bf16" in old["config"]["optim"] and TrainConfig.from_dict(new["config"]) == cfg == \
        dataclasses.replace(TrainConfig.from_dict(old["config"]), run=cfg.run)
    for model in ("G", "D", "G_ema"):
        assert new[model].keys() == old[model].keys(), model
    assert new["sn"]["G"].keys() == old["sn"]["G"].keys() and new["sn"]["D"].keys() == old["sn"]["D"].keys()


def test_the_ema_generator_rebuilds_from_the_config_a_checkpoint_holds():
    """What load_generator(path) does: ModelConfig(**saved config), the image channels from the state
    dict (the config leaves them to the data), a strict load of G_ema, samples."""
    from sagan_fast.models import Generator

    saved = ckpt.load_checkpoint(OLD_CHECKPOINT / "step_00000001.pt")
    model_cfg = ModelConfig(**saved["config"]["model"])
    assert model_cfg.image_channels is None
    G = Generator.from_config(model_cfg, image_channels=Generator.image_channels_in(saved["G_ema"]))
    G.load_state_dict(saved["G_ema"])  # strict: every key and shape matches
    with torch.no_grad():
        images = G.eval()(torch.randn(3, model_cfg.z_dim), torch.tensor([0, 4, 9]))
    assert images.shape == (3, 1, 32, 32) and torch.isfinite(images).all() and images.std() > 0
