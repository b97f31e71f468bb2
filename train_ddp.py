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
"""

from __future__ import annotations

import sys

from sagan_fast.train import (ConfigError, DataError, destroy_distributed, init_distributed, parse_config,
                              train)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        print(f"train_ddp.py: error: {err}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.run.device)
    try:
        result = train(cfg, info)
        if info.is_main:
            speed = f"{result.images_per_s:.1f} images/s, " if result.images_per_s is not None else ""
            print(f"done: step {result.step}, {speed}checkpoint {result.last_checkpoint}, "
                  f"samples {result.last_samples}", flush=True)
    except (ConfigError, DataError, FileExistsError) as err:  # user errors: a message, not a traceback
        print(f"train_ddp.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
