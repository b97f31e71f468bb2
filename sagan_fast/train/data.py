"""Training data: where batches come from, behind one object, :class:`BatchSource`.

Three kinds of data, which only :func:`build_dataset` and :class:`BatchSource` tell apart:
scikit-learn's digits (built in), a folder of images, or a folder prepared once into one uint8
array (:mod:`sagan_fast.train.prepared_data` writes it; :class:`PreparedDataset` reads it).

Datasets return ``(image, label, skipped)``: image (C, R, R) float32 in [-1, 1] (a prepared one:
uint8 (R, R, C), scaled on the device), label an int (0 for a folder), skipped how many unreadable
files were passed over to produce this item (the files after it, in order: see
:meth:`ImageFolderDataset.skipped_files`). DataLoader workers see the same file list, so they say
nothing about a bad file: :class:`BatchSource`, in the training process, names each one once (the
loop logs it and counts it once per file, however many workers and epochs meet it). A resumable
sharded sampler orders them. Random flips are not done per item but on the batch on the device
(:func:`random_flip`, one implementation for all three), from the seeded global generator, so
augmentation is part of the RNG state a checkpoint restores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from .config import ConfigError, TrainConfig
from .distributed import DistInfo
from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# A prepared folder (see sagan_fast.train.prepared_data): DST/images.npy + DST/index.json.
PREPARED_FORMAT = "sagan_fast.prepared_images/1"
IMAGES_FILE = "images.npy"
INDEX_FILE = "index.json"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 64) pixel values 0..16 and (1797,) labels of scikit-learn's digits (no download).

    Reads the CSV that ships inside scikit-learn (what ``sklearn.datasets.load_digits`` reads)
    without importing scikit-learn, whose import (scipy included) takes seconds; falls back to
    ``load_digits`` if the file is not where it is expected.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("--data digits needs scikit-learn (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), bilinearly upsampled, in memory."""

    n_classes = 10
    channels = 1

    def __init__(self, resolution: int) -> None:
        pixels, labels = load_digits_arrays()
        images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        # Bilinear keeps strokes smooth; align_corners=False keeps the digit centred.
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self.images = (images * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.images[index], int(self.labels[index]), 0


def find_images(root: str | os.PathLike,
                unreadable_folders: list[tuple[Path, str]] | None = None) -> list[Path]:
    """All jpg/png/webp files under ``root`` (recursive, sorted so every rank sees one order).

    Symbolic links to folders are followed (as torchvision's ImageFolder does; ``Path.rglob`` of
    Python 3.11 silently leaves them out), each folder once: a link loop or a folder linked twice
    does not repeat images. A subfolder that cannot be listed (no permission) is passed over and
    appended to ``unreadable_folders`` as (path, reason), for the caller to report."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"--data {str(root)!r}: no such folder (use 'digits' for the built-in dataset)")
    if not root.is_dir():
        raise DataError(f"--data {str(root)!r} is not a folder")
    files, seen, unlisted = [], set(), []

    def cannot_list(err: OSError) -> None:
        unlisted.append((Path(err.filename), err.strerror or type(err).__name__))

    for folder, subfolders, names in os.walk(root, onerror=cannot_list, followlinks=True):
        subfolders.sort()  # which of two links to one folder is walked: the same on every machine
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        files += [p for name in names if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                  and (p := Path(folder, name)).is_file()]
    files.sort()
    unlisted.sort()
    if unreadable_folders is not None:
        unreadable_folders += unlisted
    if not files:
        why = (f"; {len(unlisted)} folder(s) could not be read, e.g. {unlisted[0][0]} ({unlisted[0][1]})"
               if unlisted else "")
        raise DataError(f"--data {str(root)!r}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images "
                        f"found (searched recursively){why}")
    return files


def unreadable_errors() -> tuple[type[Exception], ...]:
    """What Pillow raises for a file that is not a readable image: truncated, corrupt, unknown format,
    or too large to decode safely (DecompressionBombError: over 2 x Image.MAX_IMAGE_PIXELS pixels)."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageFolderDataset(Dataset):
    """Every image under a folder: RGB, centre square crop, resized to ``resolution``, in [-1, 1].

    An unreadable file is skipped (the next file is used) and counted in the item's ``skipped``
    (:meth:`skipped_files` says which; :meth:`why_unreadable` why). A subfolder that cannot be listed
    is left out and named in :attr:`unreadable_folders`. Nothing is printed here: this runs in each
    DataLoader worker.
    """

    n_classes = 0
    channels = 3

    def __init__(self, root: str | os.PathLike, resolution: int) -> None:
        self.root = Path(root)
        self.unreadable_folders: list[tuple[Path, str]] = []
        self.files = find_images(root, self.unreadable_folders)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        from PIL import Image

        with warnings.catch_warnings():
            # Large images (DecompressionBombWarning, up to twice the limit) are read and scaled down.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return self._load(index)

    def _load(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC, reducing_gap=3.0)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = data.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float()
        return x.div_(127.5).sub_(1.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        errors = unreadable_errors()
        for skipped in range(len(self.files)):
            try:
                return self.load((index + skipped) % len(self.files)), 0, skipped
            except errors:
                pass
        raise DataError(self.none_readable())

    def skipped_files(self, index: int, skipped: int) -> list[int]:
        """The files item ``index`` passed over: the ``skipped`` ones from ``index`` on, wrapping."""
        return [(index + k) % len(self.files) for k in range(skipped)]

    def why_unreadable(self, index: int) -> str:
        """The error reading file ``index`` gives (reads it again: for messages, once per bad file)."""
        try:
            self.load(index)
        except unreadable_errors() as err:
            return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        return "read fine on a second try"

    def none_readable(self) -> str:
        return (f"--data {str(self.root)!r}: none of its {len(self.files)} images can be read (e.g. "
                f"{self.files[0].name}: {self.why_unreadable(0)})")


def is_prepared(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder written by :func:`prepare` (its index names our format)."""
    index = Path(path) / INDEX_FILE
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == PREPARED_FORMAT
    except (OSError, ValueError):
        return False



class PreparedDataset(Dataset):
    """The prepared array: item = (uint8 (R, R, C) tensor, label 0, skipped 0); batches via ``__getitems__``.

    ``skipped`` is 0 per item: unreadable files were dropped at preparation time and are counted in
    :attr:`index` ``["skipped"]``. ``resolution`` (optional) must match the prepared one.
    """

    n_classes = 0

    def __init__(self, root: str | os.PathLike, resolution: int | None = None) -> None:
        self.root = Path(root)
        if not is_prepared(self.root):
            raise DataError(f"{self.root} is not a prepared dataset (no {INDEX_FILE} of format "
                            f"{PREPARED_FORMAT}); "
                            f"make one with `python -m sagan_fast.train.prepared_data SRC {self.root} "
                            f"--resolution R`")
        self.index = json.loads((self.root / INDEX_FILE).read_text())
        if resolution is not None and resolution != self.index["resolution"]:
            raise DataError(f"{self.root} was prepared at {self.index['resolution']} px, not {resolution}: "
                            "prepare it again at this resolution")
        self.resolution, self.channels = int(self.index["resolution"]), int(self.index["channels"])
        self._images: np.ndarray | None = None  # opened lazily: per process (DataLoader workers)
        try:
            len(self)
        except (OSError, ValueError) as err:  # e.g. "mmap length is greater than file size": truncated
            raise DataError(f"{self.root}: {IMAGES_FILE} cannot be read ({err}); prepare the folder "
                            "again") from None
        if len(self) != self.index["count"]:
            raise DataError(f"{self.root}: {IMAGES_FILE} holds {len(self)} images, the index says "
                            f"{self.index['count']} (a damaged copy?)")
        r, c = self.resolution, self.channels
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (r, r, c):
            found = f"{self.images.dtype} {tuple(self.images.shape)}"
            raise DataError(f"{self.root}: {IMAGES_FILE} holds {found}, the index says uint8 (N, {r}, {r}, "
                            f"{c}): prepare the folder again")

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.root / IMAGES_FILE, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None  # workers map the file themselves
        return state

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return torch.from_numpy(np.array(self.images[index])), 0, 0

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch with one gather from the memory map (DataLoader uses this when present)."""
        batch = torch.from_numpy(self.images[np.asarray(indices, dtype=np.int64)])
        n = len(indices)
        return batch, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)


def collate_prepared(batch):
    """DataLoader collate_fn for :class:`PreparedDataset`: ``__getitems__`` already built the batch."""
    return batch


def build_dataset(data: str, resolution: int) -> Dataset:
    """'digits', a prepared folder, or an image folder (see :class:`DigitsDataset`,
    :class:`PreparedDataset`, :class:`ImageFolderDataset`)."""
    if data == "digits":
        return DigitsDataset(resolution)
    if is_prepared(data):
        return PreparedDataset(data, resolution)
    if (Path(data) / IMAGES_FILE).is_file() and (Path(data) / INDEX_FILE).is_file():
        raise DataError(f"--data {data!r}: a prepared folder whose {INDEX_FILE} is damaged or of another "
                        f"format (not {PREPARED_FORMAT}): prepare the folder again")
    return ImageFolderDataset(data, resolution)


@dataclass
class SamplerPosition:
    """Where the data stream is: epoch and batches already taken from it (saved in checkpoints)."""

    epoch: int = 0
    batch: int = 0


class ShardedBatchSampler(Sampler[list[int]]):
    """DistributedSampler's split (a seeded shuffle per epoch, padded to equal shards, rank::world)
    yielding whole batches, restartable from any (epoch, batch) position, for exact resumption.

    Incomplete last batches are dropped so every rank runs the same number of equal-size steps.
    Iterating yields one epoch from the current position; :meth:`advance` moves the position.
    """

    def __init__(self, n_items: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.n_items, self.batch_size = n_items, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.per_rank = math.ceil(n_items / world_size)
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"{n_items} images give {self.per_rank} per process: fewer than one batch of "
                            f"{batch_size} (lower --batch-size or use fewer processes)")
        self.position = SamplerPosition()
        self._cached_epoch: tuple[int, list[int]] | None = None

    def _epoch_indices(self, epoch: int) -> list[int]:
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n_items, generator=g).tolist()
        else:
            order = list(range(self.n_items))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]  # pad by wrapping, as DistributedSampler
        self._cached_epoch = (epoch, order[self.rank:total:self.world_size])
        return self._cached_epoch[1]

    def batch_indices(self, position: SamplerPosition) -> list[int]:
        """The dataset indices of the batch at ``position`` (the one the next ``advance`` consumes)."""
        b = position.batch
        return self._epoch_indices(position.epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position.batch

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._epoch_indices(self.position.epoch)
        for b in range(self.position.batch, self.batches_per_epoch):
            yield indices[b * self.batch_size:(b + 1) * self.batch_size]

    def advance(self) -> None:
        """Record that one more batch was consumed (call once per batch the loop uses)."""
        self.position.batch += 1
        if self.position.batch >= self.batches_per_epoch:
            self.position = SamplerPosition(self.position.epoch + 1, 0)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state: dict[str, int], batch_size: int | None = None,
                        world_size: int | None = None) -> None:
        """Continue from ``state``; ``batch_size``, ``world_size``: those it was saved with, if they
        differ from this sampler's: the position then becomes the same fraction of the epoch."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        batch_size, world_size = batch_size or self.batch_size, world_size or self.world_size
        if (batch_size, world_size) != (self.batch_size, self.world_size):
            before = math.ceil(self.n_items / world_size) // batch_size
            batch = batch * self.batches_per_epoch // max(before, 1)
        if batch >= self.batches_per_epoch:  # saved with more data than there is now
            epoch, batch = epoch + 1, 0
        self.position = SamplerPosition(epoch, batch)


def make_loader(dataset: Dataset, sampler: ShardedBatchSampler, *, workers: int, pin_memory: bool,
                seed: int) -> torch.utils.data.DataLoader:
    """The DataLoader of every dataset here, batches in ``sampler``'s order.

    Its own generator (``seed``): creating a loader iterator must not draw from the global one, or a
    resumed run (which creates one mid-epoch) would diverge from an uninterrupted run.
    ``pin_memory`` lets the host-to-device copy run asynchronously.
    """
    prepared = isinstance(dataset, PreparedDataset)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        collate_fn=collate_prepared if prepared else None,  # PreparedDataset gathers whole batches
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        persistent_workers=workers > 0,
        # uint8 batches are small: a deeper queue evens out page-cache misses of the memory map.
        prefetch_factor=(4 if prepared else 2) if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start: SIGINT, SIGTERM and SIGHUP are for the training process (stop.py),
    which ends its workers itself. A Ctrl-C or a terminal's hangup reaches the whole foreground
    process group, torchrun signals each worker's process group, SLURM every process: a worker that
    died of it (or left its loop on KeyboardInterrupt) would fail the batch in flight, before the
    step could be saved.

    SIGINT and SIGHUP are ignored. SIGTERM from the parent (the loader ending a worker,
    multiprocessing at exit) still ends the worker as torch's own handler does (exit 0); from anyone
    else it is ignored. The sender is known from ``sigwaitinfo``, in a thread, with SIGTERM blocked
    elsewhere (Linux; where there is no sigwaitinfo, SIGTERM keeps torch's handling).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm-from-parent", daemon=True).start()


def infinite_batches(loader: torch.utils.data.DataLoader, sampler: ShardedBatchSampler
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches forever, epoch after epoch, advancing ``sampler``'s position as each is consumed."""
    while True:
        for batch in loader:
            sampler.advance()
            yield batch


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image (B, C, H, W) left-right with probability 1/2: one draw of B uniforms from
    ``generator`` or the global generator of the images' device."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def to_training_batch(images: torch.Tensor, device: torch.device | str | None = None, *, flip: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, R, R, C) -> float32 (B, C, R, R) in [-1, 1], channels_last, randomly mirrored.

    Runs where ``device`` says (the GPU: the copy moves uint8 bytes, the arithmetic happens there).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"to_training_batch: expected uint8 (B, R, R, C), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if device is not None:
        images = images.to(device, non_blocking=True)
    x = images.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last, no copy
    if flip:
        x = random_flip(x, generator)
    return (x.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class BatchSource:
    """This rank's training batches, forever: ``next(batches)`` is ``(images, labels or None)`` on
    the device, images float32 (B, C, R, R) in [-1, 1], mirrored at random when flips are on.

    Which data (digits, an image folder, a prepared folder: uint8 NHWC batches scaled and flipped
    on the device, channels_last) is this object's business. Its position in the data (the
    sampler's) is what a checkpoint saves: :meth:`state_dict` / :meth:`load_state_dict`. Bad
    settings for the data (labels, channels) are a :class:`ConfigError` naming the flag; a folder is
    only listed here, not read.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        data, model = cfg.data, cfg.model
        self.dataset = build_dataset(data.data, model.resolution)
        n_classes = model.n_classes
        if n_classes > 0 and self.dataset.n_classes == 0:
            raise ConfigError(f"--n-classes {n_classes}: the data {data.data!r} has no class labels")
        if 0 < n_classes < self.dataset.n_classes:
            raise ConfigError(f"--n-classes {n_classes}: the data has {self.dataset.n_classes} classes")
        if model.image_channels is not None and model.image_channels != self.dataset.channels:
            raise ConfigError(f"--image-channels {model.image_channels}: the data {data.data!r} has "
                              f"{self.dataset.channels}-channel images")
        is_digits = data.data == "digits"
        workers = data.workers if data.workers is not None else (0 if is_digits else min(4, _cores()))
        self.sampler = ShardedBatchSampler(len(self.dataset), data.batch_size, info.rank, info.world_size,
                                           seed=cfg.run.seed)
        self.loader = make_loader(self.dataset, self.sampler, workers=workers,
                                  pin_memory=info.device.type == "cuda", seed=cfg.run.seed + info.rank)
        self.channels = self.dataset.channels
        self.flip = data.flip if data.flip is not None else not is_digits  # a mirrored digit is not a digit
        self.device, self.labels = info.device, n_classes > 0
        self._prepared = isinstance(self.dataset, PreparedDataset)
        self._batches: Iterator | None = None
        self._seen_unreadable: set[int] = set()
        self._new_unreadable: list[tuple[str, str]] = []

    def describe(self) -> str:
        """E.g. "digits (1797 images, 1 channel)", "folder /data/x (202599 images, 3 channels)"."""
        ds = self.dataset
        kind = ("digits" if isinstance(ds, DigitsDataset) else
                f"prepared folder {ds.root}" if self._prepared else f"folder {ds.root}")
        plural = "s" if self.channels != 1 else ""
        return (f"{kind} ({len(ds)} images, {self.channels} channel{plural}, "
                f"{self.sampler.batches_per_epoch} batches per epoch per process)")

    def __iter__(self) -> "BatchSource":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._batches is None:  # at the first batch, so after a resume's load_state_dict
            self._batches = infinite_batches(self.loader, self.sampler)
        position = replace(self.sampler.position)  # of the batch next() takes (a copy: advance() moves it)
        try:
            images, labels, skipped = next(self._batches)
        except DataError:  # raised in a DataLoader worker: its text holds the worker's traceback
            raise DataError(self.dataset.none_readable()) from None
        if not self._prepared and skipped.any():  # a CPU tensor: no device sync
            self._note_unreadable(position, skipped.tolist())
        if self._prepared:
            images = to_training_batch(images, self.device, flip=self.flip)
        else:
            images = images.to(self.device, non_blocking=True)
            if self.flip:
                images = random_flip(images)
        return images, labels.to(self.device, non_blocking=True) if self.labels else None

    def take(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The next ``n`` batches (one per D update of a step)."""
        return [next(self) for _ in range(n)]

    def _note_unreadable(self, position: SamplerPosition, skipped: list[int]) -> None:
        for index, n in zip(self.sampler.batch_indices(position), skipped):
            for i in self.dataset.skipped_files(index, n):
                if i not in self._seen_unreadable:
                    self._seen_unreadable.add(i)
                    self._new_unreadable.append((str(self.dataset.files[i]), self.dataset.why_unreadable(i)))

    def pop_unreadable(self) -> list[tuple[str, str]]:
        """(path, why) of each unreadable file this rank met for the first time since the last call."""
        new, self._new_unreadable = self._new_unreadable, []
        return new

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int], batch_size: int | None = None,
                        world_size: int | None = None) -> None:
        """See :meth:`ShardedBatchSampler.load_state_dict`."""
        if self._batches is not None:
            raise RuntimeError("BatchSource.load_state_dict: batches were already taken from this source")
        self.sampler.load_state_dict(state, batch_size, world_size)
