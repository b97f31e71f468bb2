"""Draw samples from a trained generator (the EMA G of a run folder's newest checkpoint, or of a file).

    python -m sagan_fast.sample runs/digits --n 64 --out grid.png        # one PNG grid
    python -m sagan_fast.sample runs/digits --n 1000 --out samples/      # one PNG per sample
    python -m sagan_fast.sample runs/digits --n 1000 --out samples.npz   # uint8 images, labels, z
    python -m sagan_fast.sample runs/digits --interpolate --n 10 --out walk.png   # a latent walk
    python -m sagan_fast.sample runs/cond --class 3 --truncation 0.7 --out threes.png

A class-conditional generator without --class draws every class, one class per grid row (per strip
with --interpolate). The same checkpoint, --seed and flags give the same images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .images import grid_labels, image_grid, save_image, to_uint8

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PROG = "sagan-fast-sample"


def slerp(z0: torch.Tensor, z1: torch.Tensor, n: int) -> torch.Tensor:
    """n points from z0 to z1 on the great circle (spherical interpolation keeps |z| typical of a
    Gaussian, where a straight line would pass through low-norm z the generator rarely saw)."""
    t = torch.linspace(0, 1, n).unsqueeze(1)
    omega = torch.arccos((z0 / z0.norm() * z1 / z1.norm()).sum().clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def plan(G, args) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(z, labels or None, images per grid row) for the flags."""
    from .inference import sample_z

    n_classes = G.n_classes
    if args.interpolate:
        z0, z1 = sample_z(G, 2, seed=args.seed, truncation=args.truncation)
        walk = slerp(z0, z1, args.n)
        if n_classes == 0:
            return walk, None, args.n
        if args.cls is not None:
            return walk, torch.full((args.n,), args.cls), args.n
        # One strip per class, the same walk in each.
        return walk.repeat(n_classes, 1), torch.arange(n_classes).repeat_interleave(args.n), args.n
    z = sample_z(G, args.n, seed=args.seed, truncation=args.truncation)
    if args.cls is not None:
        return z, torch.full((args.n,), args.cls), grid_labels(args.n, 0)[1]
    y, per_row = grid_labels(args.n, n_classes)
    return z, y, per_row


def output_kind(out: str) -> str:
    """'dir' (ends with / or is a folder), 'npz' or 'grid'; ValueError for another suffix."""
    path = Path(out)
    if out.endswith(("/", "\\")) or path.is_dir():
        return "dir"
    if path.suffix.lower() == ".npz":
        return "npz"
    if path.suffix.lower() in GRID_SUFFIXES:
        return "grid"
    raise ValueError(f"--out {out!r}: give an image file ({', '.join(GRID_SUFFIXES)}) for a grid, "
                     "a folder ending in / for one PNG per sample, or a .npz file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CKPT",
                   help="A run folder (its newest checkpoint) or a checkpoint .pt file.")
    p.add_argument("--n", type=int, default=64, help="Samples (with --interpolate: frames of the walk).")
    p.add_argument("--out", default="samples.png",
                   help="Image file (a grid), folder ending in / (one PNG per sample) or .npz file.")
    p.add_argument("--class", dest="cls", type=int, default=None, metavar="K",
                   help="Class to draw (class-conditional generators only); default: every class.")
    p.add_argument("--truncation", type=float, default=None, metavar="T",
                   help="Truncated normal z in [-T, T] (smaller: more typical, less varied); "
                        "default: plain normal.")
    p.add_argument("--seed", type=int, default=0, help="Seed of z.")
    p.add_argument("--interpolate", action="store_true",
                   help="A latent walk: --n frames between two random z (spherical interpolation).")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available, else cpu.")
    p.add_argument("--batch-size", type=int, default=256, help="Samples per generator call.")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def run(args: argparse.Namespace) -> str:
    from .inference import generate, load_generator_with_info

    if args.n < 1 or (args.interpolate and args.n < 2):
        raise ValueError(f"--n must be >= {2 if args.interpolate else 1}, got {args.n}")
    if args.truncation is not None and not args.truncation > 0:
        raise ValueError(f"--truncation must be > 0, got {args.truncation}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    kind = output_kind(args.out)
    device = resolve_device(args.device)
    G, info = load_generator_with_info(args.path, device)
    if args.cls is not None:
        if G.n_classes == 0:
            raise ValueError(f"--class: {info.path} holds an unconditional generator (n_classes=0)")
        if not 0 <= args.cls < G.n_classes:
            raise ValueError(f"--class must be in [0, {G.n_classes}), got {args.cls}")
    z, y, nrow = plan(G, args)
    images = to_uint8(generate(G, z, y, batch_size=args.batch_size))
    out = Path(args.out)
    if kind == "grid":
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(image_grid(images, nrow), out)
    elif kind == "dir":
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            suffix = "" if y is None else f"_class{int(y[i])}"
            save_image(img, out / f"{i:06d}{suffix}.png")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"images": images, "z": z.numpy().astype(np.float32)}
        if y is not None:
            arrays["labels"] = y.numpy().astype(np.int64)
        np.savez_compressed(out, **arrays)
    return f"wrote {len(images)} samples of step {info.step} ({info.path}) to {out}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except (ValueError, OSError) as err:  # bad input, a missing or unwritable path: one line
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
