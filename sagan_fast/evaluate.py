"""Score a trained generator: FID/KID (and IS), plus the digits scores for a digits run.

    python -m sagan_fast.evaluate runs/digits                       # 10,000 samples, digits judge
    python -m sagan_fast.evaluate runs/digits --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
    python -m sagan_fast.evaluate runs/celeba128 --inception-weights W.pth --n 10000 --json celeba.json

The real data is the run's own (--data overrides it) at the run's resolution. Every score is printed
beside the real data's own value (see sagan_fast.metrics.evaluator) and written as JSON (--json;
default: evaluation_step_XXXXXXXX.json in the run folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROG = "sagan-fast-evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CKPT",
                   help="A run folder (its newest checkpoint) or a checkpoint .pt file.")
    p.add_argument("--n", type=int, default=10000, help="Generated samples to score.")
    p.add_argument("--data", default=None,
                   help="Real data: 'digits' or an image folder; default: the data the run trained on.")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="Inception-v3 weights file (torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth or pytorch-fid's "
                        "pt_inception-2015-12-05-6726825d.pth) for Inception FID/KID/IS; never downloaded. "
                        "Needed for an image folder.")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="Where to write the scores; default: evaluation_step_XXXXXXXX.json in the run "
                        "folder.")
    p.add_argument("--max-real", type=int, default=10000,
                   help="Real images used from an image folder (at most).")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets of 1000 averaged.")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of z, labels, the real halves and KID's subsets.")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available.")
    return p


def default_json_path(ckpt: Path, step: int) -> Path:
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / f"evaluation_step_{step:08d}.json"


def table(scores: dict[str, float], reference: dict[str, float]) -> str:
    rows = [f"{'score':<22}{'model':>12}{'real data':>12}"]
    for key, value in scores.items():
        ref = reference.get(key)
        rows.append(f"{key:<22}{value:>12.4f}{'' if ref is None else f'{ref:>12.4f}'}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict:
    from .inference import load_generator_with_info
    from .metrics.evaluator import Evaluator
    from .metrics.inception import check_weights_path
    from .sample import resolve_device

    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (FID needs a covariance), got {args.n}")
    if args.kid_subsets < 1:
        raise ValueError(f"--kid-subsets must be >= 1, got {args.kid_subsets}")
    if args.max_real < 4:
        raise ValueError(f"--max-real must be >= 4, got {args.max_real}")
    if args.inception_weights is not None:
        check_weights_path(args.inception_weights)  # before any work
    device = resolve_device(args.device)
    G, info = load_generator_with_info(args.path, device)
    data = args.data or info.config.get("data", {}).get("data", "digits")
    start = time.perf_counter()
    evaluator = Evaluator.for_data(data, G.resolution, inception_weights=args.inception_weights,
                                   device=device, n_samples=args.n, max_real=args.max_real, seed=args.seed,
                                   kid_subsets=args.kid_subsets)
    if evaluator.channels != info.image_channels and data != "digits":
        raise ValueError(f"the generator makes {info.image_channels}-channel images, the data "
                         f"{data!r} has {evaluator.channels}")
    scores = evaluator(G)
    result = {"checkpoint": str(info.path), "step": info.step, "data": data, "resolution": G.resolution,
              "n_samples": args.n, "n_real": evaluator.n_real, "seed": args.seed,
              "kid_subsets": args.kid_subsets, "inception_weights": args.inception_weights,
              "scores": scores, "reference": evaluator.reference,
              "seconds": round(time.perf_counter() - start, 1)}
    out = Path(args.json) if args.json else default_json_path(info.path, info.step)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"step {info.step} ({info.path}): {args.n} samples against {evaluator.n_real} real images "
          f"of {data!r}")
    print(table(scores, evaluator.reference))
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    from .metrics.inception import MissingDependencyError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError, MissingDependencyError) as err:  # bad input or paths: one line
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
