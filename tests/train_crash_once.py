"""train_ddp.py with one crash, for tests/test_ddp.py: rank 0 SIGKILLs itself right after writing the
checkpoint of step STEP, once (only if MARKER does not exist yet; it creates MARKER first), so the
test can check that ``torchrun --max-restarts`` resumes from that checkpoint.

    torchrun ... tests/train_crash_once.py STEP MARKER [train_ddp.py flags]

A test-only hook, so it lives here: it wraps the loop's checkpoint save (the loop looks
``checkpoint.save_training_state`` up at every call) and runs train_ddp.main.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ddp  # noqa: E402
from sagan_fast.train import checkpoint  # noqa: E402


def main(argv: list[str]) -> int:
    crash_step, marker = int(argv[0]), Path(argv[1])
    save = checkpoint.save_training_state

    def save_then_crash(cfg, state, info):
        path = save(cfg, state, info)
        if info.is_main and state.step == crash_step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint.save_training_state = save_then_crash
    return train_ddp.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
