"""Train a SAGAN: ``python train_ddp.py --out runs/digits``, or under torchrun for several processes
(``torchrun --standalone --nproc_per_node=8 train_ddp.py ...``); ``--help`` lists every flag.

The command lives in the package (:mod:`sagan_fast.train_ddp`, also the console script
``sagan-fast-train``); this file runs it from a checkout.
"""

import sys

from sagan_fast.train_ddp import continue_command, done_line, main  # noqa: F401 (what callers import)

if __name__ == "__main__":
    sys.exit(main())
