"""Training data: digits, image folders (crop, resize, corrupt files, empty/missing folders), sampler."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sagan_fast.train import ConfigError, DataConfig, DistInfo, ModelConfig, TrainConfig
from sagan_fast.train.data import (BatchSource, DataError, DigitsDataset, ImageFolderDataset,
                                   ShardedBatchSampler, build_dataset, infinite_batches, load_digits_arrays,
                                   random_flip)
from sagan_fast.train.loop import banner, build_state
from sagan_fast.train.prepared_data import prepare


def test_digits_dataset_is_real_data_in_range():
    ds = DigitsDataset(resolution=32)
    assert len(ds) == 1797 and ds.channels == 1 and ds.n_classes == 10
    x, y, skipped = ds[5]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and skipped == 0
    assert 0 <= y < 10
    assert ds.images.min() == -1.0 and ds.images.max() <= 1.0
    # Digits have ink in the middle and mostly blank side columns (not noise, not constant).
    mean = ds.images.mean(0)
    assert mean[:, 8:24, 12:20].mean() > 0.0 > -0.9 > mean[:, :, :2].mean()
    assert set(ds.labels.tolist()) == set(range(10))


def test_digits_fast_loader_matches_sklearn():
    from sklearn.datasets import load_digits

    pixels, labels = load_digits_arrays()
    ref = load_digits()
    assert np.array_equal(pixels, ref.data) and np.array_equal(labels, ref.target)


def _write(path, size, color, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def _centre_marked(path, w, h):
    """A w x h image, black except its centred min(w, h) square, white: a crop test."""
    img = Image.new("RGB", (w, h), (0, 0, 0))
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img.paste((255, 255, 255), (left, top, left + side, top + side))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    _centre_marked(root / "a" / "wide.png", 61, 23)          # odd, non-square: centre-crop
    _centre_marked(root / "b" / "deep" / "tall.png", 17, 45)  # nested folders are searched
    _write(root / "c.jpg", (40, 40), (255, 0, 0))
    _write(root / "d.webp", (33, 33), (0, 0, 255), fmt="WEBP")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_finds_recursively_crops_and_scales(image_folder):
    ds = ImageFolderDataset(image_folder, resolution=8)
    names = [p.name for p in ds.files]
    assert sorted(names) == sorted(["wide.png", "tall.png", "c.jpg", "d.webp", "broken.png"])
    for name in ("wide.png", "tall.png"):
        x, label, skipped = ds[names.index(name)]
        assert x.shape == (3, 8, 8) and label == 0 and skipped == 0
        # Only the white centre square survives the crop; JPEG-free PNG is exact up to resampling.
        assert torch.allclose(x, torch.ones_like(x), atol=1e-6), f"{name}: crop kept the black margins"
    red, _, _ = ds[names.index("c.jpg")]
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9  # JPEG: approximately pure red
    blue, _, _ = ds[names.index("d.webp")]
    assert blue[2].mean() > 0.9 and blue[0].mean() < -0.9


def test_corrupt_image_is_skipped_and_counted(image_folder):
    ds = ImageFolderDataset(image_folder, resolution=8)
    bad = [p.name for p in ds.files].index("broken.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dataset runs in DataLoader workers: it says nothing itself
        x, _, skipped = ds[bad]
    assert skipped == 1 and x.shape == (3, 8, 8)
    assert ds.skipped_files(bad, skipped) == [bad]
    assert "UnidentifiedImageError" in ds.why_unreadable(bad)
    # Through a DataLoader, the count arrives with the batch.
    sampler = ShardedBatchSampler(len(ds), batch_size=len(ds), shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    images, labels, skipped = next(iter(loader))
    assert images.shape == (5, 3, 8, 8) and int(skipped.sum()) == 1


def test_the_prepare_command_names_each_unreadable_image_on_one_line_and_a_bad_destination(image_folder,
                                                                                           tmp_path):
    """``python -m sagan_fast.train.prepared_data``: a bad image is one "warning:" line (it was Python's
    two-line UserWarning with a source line), an unwritable destination one "error:" line (it was a
    traceback)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def prepare_command(dst):
        return subprocess.run([sys.executable, "-m", "sagan_fast.train.prepared_data", str(image_folder),
                               str(dst), "--resolution", "8", "--workers", "0"], env=env, capture_output=True,
                              text=True, timeout=120)

    done = prepare_command(tmp_path / "prepared")
    assert done.returncode == 0, done.stderr
    said = [line.strip() for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    broken = image_folder / "b" / "broken.png"
    assert [line for line in said if not line.startswith("prepared ")] == [
        f"warning: skipping unreadable image {broken}: UnidentifiedImageError: cannot identify image file "
        f"'{broken}'"], done.stderr
    (tmp_path / "file").write_text("")
    failed = prepare_command(tmp_path / "file" / "prepared")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (f"error: cannot write {tmp_path / 'file' / 'prepared'} "
                                                      "(Not a directory)")


def test_all_corrupt_folder_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(DataError, match=r"none of its 1 images can be read \(e.g. x.png: UnidentifiedImage"):
        ds[0]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no jpg/jpeg/png/webp images found"):
        build_dataset(str(tmp_path / "empty"), 32)
    with pytest.raises(DataError, match="no such folder"):
        build_dataset(str(tmp_path / "missing"), 32)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        build_dataset(str(tmp_path / "file.png"), 32)


def test_linked_folders_are_searched_once_each_and_a_link_loop_ends(tmp_path):
    """A folder of links to where the images are (a common way to assemble a dataset): Python 3.11's
    rglob silently left them out. A link loop and a second link to one folder add nothing."""
    store = tmp_path / "store"
    for name in ("part1", "part2"):
        (store / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4)).save(store / name / f"{i}.png")
    root = tmp_path / "data"
    (root / "own").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "own" / "x.jpg")
    (root / "a").symlink_to(store / "part1")
    (root / "b").symlink_to(store / "part2")
    (root / "c").symlink_to(store / "part2")  # part2 again
    (root / "own" / "loop").symlink_to(root)
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link: not an image
    files = ImageFolderDataset(root, 8).files
    assert [str(f.relative_to(root)) for f in files] == [
        "a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png", "own/x.jpg"]


@pytest.mark.parametrize("n_items,world,batch", [(103, 2, 5), (97, 3, 4), (10, 1, 3)],
                         ids=["103items-2ranks", "97items-3ranks", "10items-1rank"])
def test_sharded_sampler_partitions_and_resumes(n_items, world, batch):
    samplers = [ShardedBatchSampler(n_items, batch, rank=r, world_size=world, seed=7) for r in range(world)]
    epoch0 = [[i for b in s for i in b] for s in samplers]
    assert len({len(e) for e in epoch0}) == 1, "ranks must run the same number of steps"
    flat = [i for e in epoch0 for i in e]
    assert len(set(flat)) == len(flat), "ranks overlap within an epoch"
    assert set(flat) <= set(range(n_items))

    # Consume k batches, snapshot, and a fresh sampler from the snapshot continues identically.
    s = ShardedBatchSampler(n_items, batch, rank=world - 1, world_size=world, seed=7)
    straight = []
    it = infinite_batches_of(s)
    for _ in range(s.batches_per_epoch + 2):  # crosses an epoch boundary
        straight.append(next(it))
    s2 = ShardedBatchSampler(n_items, batch, rank=world - 1, world_size=world, seed=7)
    it2 = infinite_batches_of(s2)
    k = s.batches_per_epoch - 1
    for _ in range(k):
        next(it2)
    s3 = ShardedBatchSampler(n_items, batch, rank=world - 1, world_size=world, seed=7)
    s3.load_state_dict(s2.state_dict())
    it3 = infinite_batches_of(s3)
    assert [next(it3) for _ in range(3)] == straight[k:k + 3]
    # A new epoch reshuffles.
    if n_items > 10:
        assert straight[0] != straight[s.batches_per_epoch]


def infinite_batches_of(sampler):
    """infinite_batches over a loader that yields the index lists themselves."""
    loader = torch.utils.data.DataLoader(list(range(sampler.n_items)), batch_sampler=sampler,
                                         collate_fn=lambda b: b)
    return infinite_batches(loader, sampler)


def test_sampler_too_few_items_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one batch"):
        ShardedBatchSampler(5, batch_size=4, rank=0, world_size=2)


def test_random_flip_mirrors_about_half_and_is_seeded():
    x = torch.arange(64 * 3 * 2 * 5, dtype=torch.float32).view(64, 3, 2, 5)
    torch.manual_seed(3)
    y = random_flip(x)
    flipped = (y == x.flip(3)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all()) and 16 < int(flipped.sum()) < 48
    torch.manual_seed(3)
    assert torch.equal(random_flip(x), y)


def _config(data: str, flip: bool | None = None, n_classes: int = 0, **data_kw) -> TrainConfig:
    return TrainConfig(model=ModelConfig(resolution=32, n_classes=n_classes),
                       data=DataConfig(data=data, batch_size=2, workers=0, flip=flip, **data_kw))


def _source(data: str, flip: bool | None = None, n_classes: int = 0, **data_kw) -> BatchSource:
    return BatchSource(_config(data, flip, n_classes, **data_kw), DistInfo())


def test_batch_source_gives_a_folder_and_its_prepared_copy_as_the_same_batches(tmp_path):
    """One order, one flip, one scaling, whichever form the data is in."""
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    prepare(root, tmp_path / "prepared", 32, workers=0, quiet=True)
    got = {}
    for name, data, flip in (("folder", root, True), ("prepared", tmp_path / "prepared", True),
                             ("unflipped", root, False)):
        torch.manual_seed(7)
        source = _source(str(data), flip)
        got[name] = source.take(4)  # 3 batches per epoch: crosses into the second
        assert source.state_dict() == {"epoch": 1, "batch": 1}
    for (a, ya), (b, yb), (c, _) in zip(got["folder"], got["prepared"], got["unflipped"]):
        assert ya is None and yb is None and a.shape == b.shape == (2, 3, 32, 32)
        assert b.is_contiguous(memory_format=torch.channels_last)  # prepared: NHWC straight to the device
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)  # k / 127.5 - 1 both ways
        for image, plain in zip(a, c):
            assert torch.equal(image, plain) or torch.equal(image, plain.flip(2))
    pairs = zip(got["folder"], got["unflipped"])
    assert any(not torch.equal(a, c) for (a, _), (c, _) in pairs), "nothing flipped"


def test_batch_source_labels_resume_position_and_errors(tmp_path):
    source = _source("digits", n_classes=10)
    assert source.flip is False and source.channels == 1  # a mirrored digit is not a digit
    images, labels = next(source)
    assert images.shape == (2, 1, 32, 32) and labels.dtype == torch.long and labels.shape == (2,)
    with pytest.raises(RuntimeError, match="already taken"):
        source.load_state_dict({"epoch": 0, "batch": 0})
    resumed = _source("digits", n_classes=10)
    resumed.load_state_dict(source.state_dict())  # continues where the first one stopped
    reference = _source("digits", n_classes=10)
    reference.take(1)
    assert torch.equal(next(resumed)[1], next(reference)[1])
    assert _source("digits").take(1)[0][1] is None  # unconditional: no labels
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="--n-classes 3: the data .* has no class labels"):
        _source(str(tmp_path), n_classes=3)
    with pytest.raises(ConfigError, match="--n-classes 5: the data has 10 classes"):
        _source("digits", n_classes=5)



@contextlib.contextmanager
def folders_nobody_can_list(*folders: Path):
    """``folders`` made unlistable (mode 000) for this process. Root may list anything, so as root the
    effective user is 'nobody' (65534) inside the block: the permission check is the kernel's own."""
    for folder in folders:
        folder.chmod(0)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(65534)
        yield
    finally:
        if as_root:
            os.seteuid(0)
        for folder in folders:
            folder.chmod(0o755)


def test_a_subfolder_that_cannot_be_listed_is_named_not_silently_left_out():
    base = Path(tempfile.mkdtemp())  # not under pytest's tmp_path: 'nobody' must reach it
    try:
        base.chmod(0o777)
        root, only_locked = base / "imgs", base / "only_locked"
        for name in ("imgs/open/0.png", "imgs/open/1.png", "imgs/locked/0.png", "only_locked/locked/0.png"):
            _write(base / name, (8, 8), (0, 0, 255))
        for p in base.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        locked = root / "locked"
        with folders_nobody_can_list(locked, only_locked / "locked"):
            folder = ImageFolderDataset(root, 8)
            cfg = _config(str(root), flip=False)
            source = BatchSource(cfg, DistInfo())
            with pytest.warns(UserWarning, match=r"skipping folder .*locked: cannot be listed \(Permission denied\)"):
                index = prepare(root, base / "prepared", 8, workers=0, quiet=True)
            with pytest.raises(DataError, match=r"no jpg/jpeg/png/webp images found \(searched recursively\); 1 "
                                                r"folder\(s\) could not be read, e.g. .*locked \(Permission denied\)"):
                ImageFolderDataset(only_locked, 8)
        assert [f.name for f in folder.files] == ["0.png", "1.png"] and index["count"] == 2
        assert folder.unreadable_folders == [(locked, "Permission denied")]
        state = build_state(cfg, DistInfo(), source)
        said = banner(cfg, DistInfo(), state, None)
        assert said[-1] == (f"warning: skipped folder {locked}: cannot be listed (Permission denied); its "
                            "images are not used"), said
    finally:
        shutil.rmtree(base)
