"""load_generator and the sample / evaluate command lines, on tiny real training runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sagan_fast import evaluate, sample
from sagan_fast.inference import (balanced_labels, find_checkpoint, generate, load_generator,
                                  load_generator_with_info, sample_z)
from sagan_fast.train import parse_config, train

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _tiny_run(out: Path, *flags: str) -> Path:
    train(parse_config(["--steps", "2", "--ch", "4", "--z-dim", "16", "--batch-size", "4",
                        "--ckpt-every", "1", "--keep-ckpts", "2", "--sample-every", "2", "--n-samples", "4",
                        "--log-every", "1", "--no-progress", "--out", str(out), *flags]))
    return out


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("uncond"), "--n-classes", "0")


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("cond"), "--n-classes", "10")


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


# --- load_generator ---------------------------------------------------------------------------------

def test_load_generator_from_a_run_folder_or_a_checkpoint(uncond_run):
    import sagan_fast

    G, info = load_generator_with_info(uncond_run)
    assert info.path.name == "step_00000002.pt" and info.step == 2  # the newest of the two kept
    assert sagan_fast.load_generator is load_generator
    saved = torch.load(info.path, map_location="cpu", weights_only=True)
    assert G.z_dim == 16 and G.n_classes == 0 and info.image_channels == 1
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    state = G.state_dict()
    assert state.keys() == saved["G_ema"].keys()
    assert all(torch.equal(state[k], saved["G_ema"][k]) for k in state)
    z = sample_z(G, 3, seed=5)
    images = generate(G, z)
    assert images.shape == (3, 1, 32, 32) and images.abs().max() <= 1
    older = load_generator(uncond_run / "checkpoints" / "step_00000001.pt")
    assert not torch.equal(generate(older, z), images)  # a file is taken as given
    assert torch.equal(generate(load_generator(uncond_run / "checkpoints"), z), images)


def test_load_conditional_generator_and_sample_helpers(cond_run):
    G = load_generator(cond_run, device="cpu")
    assert G.n_classes == 10
    z = sample_z(G, 20, seed=0)
    assert torch.equal(z, sample_z(G, 20, seed=0)) and not torch.equal(z, sample_z(G, 20, seed=1))
    assert sample_z(G, 500, seed=0, truncation=0.5).abs().max() <= 0.5
    y = balanced_labels(20, 10)
    assert torch.bincount(y).tolist() == [2] * 10
    assert generate(G, z, y).shape == (20, 1, 32, 32)
    with pytest.raises(ValueError, match="class-conditional"):
        generate(G, z)


def test_load_generator_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_generator(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        find_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt.*not a sagan_fast training checkpoint"):
        load_generator(tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt.pt.*not a readable"):
        load_generator(tmp_path / "corrupt.pt")
    import argparse

    torch.save(argparse.Namespace(x=1), tmp_path / "code.pt")  # a pickle of a class: weights_only refuses it
    with pytest.raises(ValueError, match="code.pt.*not a readable"):
        load_generator(tmp_path / "code.pt")
    torch.save({"format": 1, "config": {"model": {}}, "G_ema": {}}, tmp_path / "hollow.pt")
    with pytest.raises(ValueError, match="hollow.pt"):
        load_generator(tmp_path / "hollow.pt")


# --- sample -----------------------------------------------------------------------------------------

def test_sample_cli_writes_a_grid(uncond_run, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    r = _cli("sagan_fast.sample", str(uncond_run), "--n", "16", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "wrote 16 samples of step 2" in r.stdout
    with Image.open(out) as img:
        assert img.mode == "L" and img.size == (4 * 34 + 2, 4 * 34 + 2)
        grid = np.asarray(img)
    # The same seed in-process gives the same pixels (the CLI is the library).
    G = load_generator(uncond_run)
    expected = sample.image_grid(sample.to_uint8(generate(G, sample_z(G, 16, seed=3))), 4)[..., 0]
    assert np.array_equal(grid, expected)


def test_sample_separate_pngs_npz_and_interpolation(cond_run, tmp_path, capsys):
    from PIL import Image

    assert sample.main([str(cond_run), "--n", "12", "--out", f"{tmp_path}/each/"]) == 0
    files = sorted((tmp_path / "each").glob("*.png"))
    assert len(files) == 12 and files[0].name == "000000_class0.png" and files[-1].name == "000011_class5.png"
    assert sample.main([str(cond_run), "--n", "6", "--class", "7", "--truncation", "0.8",
                        "--out", str(tmp_path / "s.npz")]) == 0
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (6, 32, 32, 1) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [7] * 6 and np.abs(data["z"]).max() <= 0.8
    assert sample.main([str(cond_run), "--interpolate", "--n", "5", "--out", str(tmp_path / "walk.png")]) == 0
    with Image.open(tmp_path / "walk.png") as img:
        assert img.size == (5 * 34 + 2, 10 * 34 + 2)  # one strip per class
    walk = sample.slerp(torch.ones(4), -torch.ones(4) + 0.1, 7)
    assert torch.allclose(walk[0], torch.ones(4))
    assert torch.allclose(walk[-1], -torch.ones(4) + 0.1, atol=1e-5)
    assert "wrote" in capsys.readouterr().out


def test_conditional_grid_shows_one_class_per_row(cond_run):
    G = load_generator(cond_run)
    args = sample.build_parser().parse_args([str(cond_run), "--n", "64"])
    _, y, per_row = sample.plan(G, args)
    assert per_row == 7 and y.tolist()[:8] == [0] * 7 + [1] and int(y.max()) == 9


@pytest.mark.parametrize("case", ["missing", "no-checkpoint", "foreign", "class-unconditional"])
def test_sample_cli_bad_input_is_one_line_and_exit_2(case, uncond_run, tmp_path):
    target, extra = {
        "missing": (tmp_path / "no-such-run", []),
        "no-checkpoint": (tmp_path, []),
        "foreign": (tmp_path / "foreign.pt", []),
        "class-unconditional": (uncond_run, ["--class", "3"]),
    }[case]
    if case == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, target)
    r = _cli("sagan_fast.sample", str(target), "--out", str(tmp_path / "x.png"), *extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sagan-fast-sample: error:"), r.stderr
    assert not (tmp_path / "x.png").exists()


def test_sample_rejects_bad_flags_before_loading(uncond_run, tmp_path, capsys):
    for flags in (["--n", "0"], ["--truncation", "0"], ["--out", str(tmp_path / "x.gif")],
                  ["--interpolate", "--n", "1"]):
        assert sample.main([str(uncond_run), *flags]) == 2, flags
    assert "error" in capsys.readouterr().err


# --- evaluate ---------------------------------------------------------------------------------------

def test_evaluate_cli_prints_and_writes_scores(uncond_run, tmp_path):
    out = tmp_path / "scores.json"
    r = _cli("sagan_fast.evaluate", str(uncond_run), "--n", "64", "--json", str(out), "--kid-subsets", "10")
    assert r.returncode == 0, r.stderr
    assert "digits/fid" in r.stdout and "real data" in r.stdout
    result = json.loads(out.read_text())
    assert result["step"] == 2 and result["n_samples"] == 64 and result["n_real"] == 1797
    assert result["kid_subsets"] == 10
    assert set(result["scores"]) == {"digits/fid", "digits/kid", "digits/is", "digits/coverage",
                                     "digits/confident"}
    assert result["reference"]["digits/fid"] < result["scores"]["digits/fid"]  # 2 steps: far from real


def test_evaluate_conditional_run_scores_accuracy_and_writes_beside_the_run(cond_run, capsys):
    assert evaluate.main([str(cond_run), "--n", "40", "--kid-subsets", "10"]) == 0
    result = json.loads((cond_run / "evaluation_step_00000002.json").read_text())
    assert 0.0 <= result["scores"]["digits/accuracy"] <= 1.0
    assert "digits/accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "foreign"])
def test_evaluate_cli_bad_input_is_one_line_and_exit_2(case, tmp_path):
    target = tmp_path / ("gone" if case == "missing" else "foreign.pt")
    if case == "foreign":
        torch.save([1, 2, 3], target)
    r = _cli("sagan_fast.evaluate", str(target), "--json", str(tmp_path / "s.json"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sagan-fast-evaluate: error:") and target.name in lines[0]


def test_evaluate_bad_flags_and_missing_inception_weights(uncond_run, tmp_path, capsys):
    assert evaluate.main([str(uncond_run), "--n", "1"]) == 2
    assert evaluate.main([str(uncond_run), "--inception-weights", str(tmp_path / "w.pth")]) == 2
    err = capsys.readouterr().err
    assert "w.pth" in err and "never downloads" in err
    assert evaluate.main([str(uncond_run), "--data", str(tmp_path / "no-folder")]) == 2


def test_readme_loading_example_runs(uncond_run):
    import re

    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "load_generator" in b)
    namespace: dict = {}
    code = block.replace('"runs/digits"', repr(str(uncond_run)))
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["images"].shape == (16, 1, 32, 32)
