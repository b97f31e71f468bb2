"""Train a SAGAN: one process, or several under torchrun (DDP: nccl on GPU, gloo on CPU).

One process (CPU or one GPU); the quick check, well under a minute on a CPU::

    python train_ddp.py --data digits --resolution 32 --ch 16 --batch-size 16 --steps 20 \\
        --ckpt-every 10 --sample-every 10 --out runs/check

All GPUs of one machine (--batch-size is per process)::

    torchrun --standalone --nproc_per_node=8 train_ddp.py --data /data/celeba/img_align_celeba \\
        --resolution 128 --ch 64 --batch-size 32 --precision bf16 --steps 100000 --out runs/celeba128

Several machines (run on each; torchrun's own rendezvous), restarting crashed workers from the
last checkpoint::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=sagan1 --max-restarts=3 train_ddp.py --data /data/celeba --out /shared/runs/c128

A run continues from the latest checkpoint in --out automatically (--no-resume starts fresh;
--resume PATH continues from a given file). ``python train_ddp.py --help`` lists every flag.

Ctrl-C (SIGINT) or SIGTERM: the step in progress finishes, a checkpoint of it is written, one line
says how to continue, and the exit status is 130 / 143 (a second Ctrl-C aborts at once). A user
mistake (a flag, the data, the run folder, a checkpoint, a full disk, a diverged run) is one line
``train_ddp.py: error: ...`` and exit status 2.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from sagan_fast.train import (ConfigError, TrainResult, destroy_distributed, init_distributed, parse_config,
                              train)
from sagan_fast.train.checkpoint import OUTPUT_ERRNOS, newest_checkpoint
from sagan_fast.train.errors import USER_ERRORS, OtherRankFailed
from sagan_fast.train.stop import signal_name

PROG = "train_ddp.py"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        return error(err)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        info = init_distributed(cfg.run.device)
        result = train(cfg, info)
    except OtherRankFailed:  # the failing rank printed it
        return 2
    except USER_ERRORS as err:
        return error(err)
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        return error(f"{err.filename or cfg.run.out}: {err.strerror} (a full disk, a quota, permissions?); "
                     "fix that and run the same command to continue from the newest checkpoint")
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        if is_main:
            newest = newest_checkpoint(cfg.run.out)
            since = f"nothing saved since {newest}" if newest else "no checkpoint written"
            print(f"{PROG}: interrupted (Ctrl-C), {since}; to continue: {continue_command(argv)}",
                  file=sys.stderr, flush=True)
        return 130
    finally:
        destroy_distributed()
    if result.stopped_by is not None:
        if is_main:
            print(f"{PROG}: stopped by {signal_name(result.stopped_by)} after step {result.step}, saved "
                  f"{result.last_checkpoint}; to continue: {continue_command(argv)}", file=sys.stderr,
                  flush=True)
        return 128 + result.stopped_by
    if is_main:
        print(done_line(result), flush=True)
    return 0


def error(err: Exception | str) -> int:
    print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
    return 2


def done_line(result: TrainResult) -> str:
    if result.step == result.start_step:
        what = f"step {result.step} (reached already: nothing to train)"
    else:
        speed = f", {result.images_per_s:.1f} images/s" if result.images_per_s is not None else ""
        what = f"step {result.step}{speed}"
    return f"done: {what}, checkpoint {result.last_checkpoint}, samples {result.last_samples}"


def continue_command(argv: list[str] | None = None) -> str:
    """The command that started this run, less --resume/--no-resume: it continues from the newest
    checkpoint in --out. Under torchrun, torchrun's own command line (its parent process's)."""
    if argv is not None:
        return shlex.join(["python", PROG, *_without_resume(argv)])
    launcher = _launcher()
    return shlex.join([*launcher, sys.argv[0], *_without_resume(sys.argv[1:])])


def _launcher() -> list[str]:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            parent = []
        if sys.argv[0] in parent:
            prefix = parent[:parent.index(sys.argv[0])]
            if len(prefix) >= 2 and Path(prefix[1]).name == "torchrun":  # the console script
                prefix = ["torchrun", *prefix[2:]]
            return prefix
        return ["torchrun", "...(your torchrun flags)"]
    orig = getattr(sys, "orig_argv", None)  # Python 3.10+: the interpreter's own options too
    if orig and len(orig) > len(sys.argv):
        return list(orig[:len(orig) - len(sys.argv)])
    return ["python"]


def _without_resume(args: list[str]) -> list[str]:
    kept, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--no-resume" or a.startswith("--resume="):
            i += 1
        elif a == "--resume":
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("-") else 1
        else:
            kept.append(a)
            i += 1
    return kept


if __name__ == "__main__":
    sys.exit(main())
