"""An image folder prepared once into one uint8 array at the training resolution, read memory-mapped.

Decoding JPEGs and resizing them is what limits a GAN's input pipeline (a SAGAN-128 step on one
H100 wants over a thousand images per second); BigGAN-PyTorch and StudioGAN prepare an HDF5 file
once for the same reason. Here the prepared form is a folder::

    DST/images.npy   uint8 (N, R, R, C), NHWC: one memory-mapped array, one gather per batch
    DST/index.json   format, resolution, count, channels, source, skipped files

``images.npy`` is read through ``np.load(mmap_mode="r")``
(:class:`sagan_fast.train.data.PreparedDataset`, which ``--data DST`` uses): the OS page cache
serves every worker process and rank from one copy. NHWC on disk is what channels_last wants on the
GPU: the uint8 batch goes to the device as is (a quarter of float32's bytes) and
:func:`~sagan_fast.train.data.to_training_batch` turns it into a float NCHW channels_last view in
[-1, 1] with random flips, on the GPU.

The decoding and cropping are :class:`sagan_fast.train.data.ImageFolderDataset`'s (imported, not
copied), so a prepared dataset holds the very pixels the folder dataset would produce; an
unreadable file is skipped, counted in the index and named in a warning, as there.

Preparing (writes DST atomically: a temporary sibling folder renamed at the end)::

    python -m sagan_fast.train.prepared_data SRC DST --resolution 128 [--workers 8] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

# The reading side lives with the other datasets (sagan_fast.train.data); re-exported here.
from .data import IMAGES_FILE, INDEX_FILE, DataError, ImageFolderDataset, PreparedDataset, is_prepared
from .data import PREPARED_FORMAT as FORMAT
from .data import to_training_batch, unreadable_errors


def _init_decode_worker() -> None:
    # One thread per process (as DataLoader workers do): the processes are the parallelism, and a
    # forked child must not reuse the parent's OpenMP pool.
    torch.set_num_threads(1)


def _decode_chunk(args: tuple[list[str], int]) -> list[np.ndarray | str]:
    """Worker: uint8 (R, R, 3) per file, or the error text for an unreadable one."""
    files, resolution = args
    ds = ImageFolderDataset.__new__(ImageFolderDataset)  # only .load is used: no folder listing
    ds.root, ds.files, ds.resolution = Path(files[0]).parent, [Path(f) for f in files], resolution
    out: list[np.ndarray | str] = []
    for i in range(len(files)):
        try:
            x = ds.load(i)  # float (3, R, R) = k / 127.5 - 1 for the decoded byte k
        except unreadable_errors() as err:  # what data.ImageFolderDataset skips
            out.append(f"{type(err).__name__}: {err}")
            continue
        # Exact inverse of load's scaling: (k/127.5 - 1 + 1) * 127.5 is within 1e-4 of the integer k.
        out.append(((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    return out


def prepare(src: str | os.PathLike, dst: str | os.PathLike, resolution: int, *, workers: int | None = None,
            chunk: int = 64, overwrite: bool = False, quiet: bool = False) -> dict:
    """Decode every image under ``src`` once into ``dst`` (see the module doc); returns the index.

    ``workers`` decoding processes (default: the CPU count; 0: in this process). Raises
    :class:`~sagan_fast.train.data.DataError` if ``src`` has no image or none is readable, and
    ``FileExistsError`` if ``dst`` exists and ``overwrite`` is False.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass --overwrite to replace it)")
    folder = ImageFolderDataset(src, resolution)  # its listing and its errors for a bad folder
    files = folder.files
    for path, why in folder.unreadable_folders:
        warnings.warn(f"skipping folder {path}: cannot be listed ({why})", stacklevel=2)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        shape = (len(files), resolution, resolution, 3)
        images = np.lib.format.open_memmap(tmp / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=shape)
        chunks = [([str(f) for f in files[i:i + chunk]], resolution) for i in range(0, len(files), chunk)]
        workers = (os.cpu_count() or 1) if workers is None else workers
        count, skipped = 0, []
        pool = (ProcessPoolExecutor(workers, initializer=_init_decode_worker)
                if workers > 0 and len(chunks) > 1 else None)
        try:
            results = pool.map(_decode_chunk, chunks) if pool else map(_decode_chunk, chunks)
            for (names, _), decoded in zip(chunks, results):  # in order: the array follows the sorted listing
                for name, item in zip(names, decoded):
                    if isinstance(item, str):
                        skipped.append(name)
                        warnings.warn(f"skipping unreadable image {name}: {item}", stacklevel=2)
                    else:
                        images[count] = item
                        count += 1
                if not quiet:
                    print(f"\rprepared {count + len(skipped)}/{len(files)}", end="", file=sys.stderr,
                          flush=True)
        finally:
            if pool:
                pool.shutdown()
        if not quiet:
            print(file=sys.stderr)
        if count == 0:
            raise DataError(f"none of the {len(files)} images under {src} could be read")
        images.flush()
        del images
        if count < len(files):  # rare (unreadable files): rewrite at the exact length
            full = np.load(tmp / IMAGES_FILE, mmap_mode="r")
            exact = np.lib.format.open_memmap(tmp / "exact.npy", mode="w+", dtype=np.uint8,
                                              shape=(count,) + shape[1:])
            for i in range(0, count, 1024):
                exact[i:i + 1024] = full[i:min(i + 1024, count)]
            exact.flush()
            del exact, full
            os.replace(tmp / "exact.npy", tmp / IMAGES_FILE)
        index = {"format": FORMAT, "resolution": resolution, "count": count, "channels": 3,
                 "layout": "NHWC", "n_classes": 0, "source": str(src.resolve()),
                 "skipped": len(skipped), "skipped_files": skipped}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        if dst.exists():  # overwrite: move the old one aside first, so dst is never half-written
            old = dst.with_name(f".{dst.name}.old{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sagan_fast.train.prepared_data",
        description="Decode an image folder once into a memory-mapped uint8 array for training.")
    parser.add_argument("src", help="folder of jpg/png/webp images (searched recursively)")
    parser.add_argument("dst", help="output folder (written atomically)")
    parser.add_argument("--resolution", type=int, required=True, help="training resolution in pixels")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPU count)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = parser.parse_args(argv)

    def one_line(message, category, filename, lineno, line=None) -> str:
        # One line per unreadable file (not Python's two-line warning), over the "prepared n/N" line.
        return f"\r{' ' * 40}\rwarning: {message}\n"

    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        index = prepare(args.src, args.dst, args.resolution, workers=args.workers, overwrite=args.overwrite)
    except (DataError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full destination
        print(f"error: cannot write {args.dst} ({err.strerror})", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
    print(f"{args.dst}: {index['count']} images at {index['resolution']} px, {index['skipped']} unreadable "
          "skipped")
    return 0


__all__ = ["FORMAT", "IMAGES_FILE", "INDEX_FILE", "PreparedDataset", "is_prepared", "main", "prepare",
           "to_training_batch"]


if __name__ == "__main__":
    sys.exit(main())
