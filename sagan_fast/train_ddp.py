"""The training command: ``python train_ddp.py``, ``sagan-fast-train`` (the console script that
``pip install`` makes), ``torchrun ... train_ddp.py`` or ``python -m sagan_fast.train_ddp``.

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

Ctrl-C (SIGINT), SIGTERM or SIGHUP: the step in progress finishes, a checkpoint of it is written, one
line says how to continue, and the exit status is 128 + the signal (a second Ctrl-C aborts at once).
A user mistake (a flag, the data, the run folder, a checkpoint, a full disk, a diverged run) is one
line ``train_ddp.py: error: ...`` and exit status 2.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagan_fast.train import TrainResult

# Only the standard library above: a signal during the seconds that importing torch takes is
# handled too (see main).
CONSOLE_SCRIPT = "sagan-fast-train"
PROG = CONSOLE_SCRIPT if sys.argv and Path(sys.argv[0]).name == CONSOLE_SCRIPT else "train_ddp.py"
"""How this command is called, in its messages and in the command that continues a run."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP outside the training loop (which stops on them after a step, saving it):
    while starting (imports, data listing, resuming) or after the last step. Nothing is lost then."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status: 0, 2 (a user error: one line), 128 + a stop signal."""
    run = _Run(argv)
    previous = _stop_outside_the_loop()
    run.thread_hook, threading.excepthook = threading.excepthook, run.thread_error
    try:
        return run()
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        return run.interrupted(signal.SIGINT)
    except Interrupted as stop:
        return run.interrupted(stop.signum)
    finally:
        threading.excepthook = run.thread_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Run:
    def __init__(self, argv: list[str] | None) -> None:
        self.argv, self.out = argv, None
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self.thread_errors: list[OSError] = []
        self.thread_hook = threading.excepthook

    def __call__(self) -> int:
        from sagan_fast.train import ConfigError, destroy_distributed, init_distributed, parse_config, train
        from sagan_fast.train.checkpoint import OUTPUT_ERRNOS
        from sagan_fast.train.errors import USER_ERRORS, OtherRankFailed
        from sagan_fast.train.stop import signal_name

        try:
            cfg = parse_config(self.argv)
        except ConfigError as err:
            return error(err)
        self.out = cfg.run.out
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
            return error(output_error(err, cfg.run.out))
        except RuntimeError as err:  # torch.OutOfMemoryError (a GPU's) is one too
            if (why := out_of_memory(err)) is None:
                raise
            return error(f"{why}: lower --batch-size (it is per process) or use --precision bf16 on a GPU, "
                         f"and run again{_from_newest(cfg.run.out)}")
        finally:
            destroy_distributed()
        if result.stopped_by is not None:
            if self.is_main:
                say(f"{PROG}: stopped by {signal_name(result.stopped_by)} after step {result.step}, saved "
                    f"{result.last_checkpoint}; to continue: {continue_command(self.argv)}", sys.stderr)
            return 128 + result.stopped_by
        if self.thread_errors:  # e.g. TensorBoard's writer thread; the loop did not meet it
            return error(output_error(self.thread_errors[0], cfg.run.out))
        if self.is_main:
            say(done_line(result), sys.stdout)
        return 0

    def interrupted(self, signum: int) -> int:
        if self.is_main:
            name = "(Ctrl-C)" if signum == signal.SIGINT else f"by {signal.Signals(signum).name}"
            if self.out is None:
                since = " while starting, nothing trained yet"
            else:
                from sagan_fast.train.checkpoint import newest_checkpoint

                newest = newest_checkpoint(self.out)
                since = f", nothing saved since {newest}" if newest else ", no checkpoint written"
            say(f"{PROG}: interrupted {name}{since}; to continue: {continue_command(self.argv)}", sys.stderr)
        return 128 + signum

    def thread_error(self, args: threading.ExceptHookArgs) -> None:
        """A full disk (or the like) met by a writer thread (TensorBoard's) is the main thread's one-line
        error too (TensorBoard raises it again there): no thread traceback."""
        from sagan_fast.train.checkpoint import OUTPUT_ERRNOS

        if isinstance(args.exc_value, OSError) and args.exc_value.errno in OUTPUT_ERRNOS:
            self.thread_errors.append(args.exc_value)
            return
        self.thread_hook(args)


def _stop_outside_the_loop() -> dict[int, object]:
    """Until the training loop installs its own handlers (sagan_fast.train.stop), and after it: SIGTERM
    and SIGHUP (unless ignored: nohup) raise :class:`Interrupted`, SIGINT KeyboardInterrupt (Python's
    default, absent where SIGINT was ignored at start: a script's background job). Returns the
    handlers replaced."""
    previous: dict[int, object] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    terminal = [fd for fd in (1, 2) if os.isatty(fd)]

    def stop(signum: int, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):  # the terminal is gone: writing to it fails
            null = os.open(os.devnull, os.O_WRONLY)
            for fd in terminal:
                os.dup2(null, fd)
            os.close(null)
        raise Interrupted(signum)

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) != signal.SIG_IGN:
            previous[sig] = signal.signal(sig, stop)
    return previous


def out_of_memory(err: RuntimeError) -> str | None:
    """What ran out, in a few words, if ``err`` is an allocation failure (a GPU's: torch.OutOfMemoryError;
    the CPU's: the allocator's "can't allocate memory"), else None."""
    import re

    import torch

    text = str(err)
    if isinstance(err, torch.OutOfMemoryError):
        size = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
        gpu = re.search(r"GPU (\d+)", text)
        return (f"out of GPU memory{' on GPU ' + gpu.group(1) if gpu else ''}"
                f"{' (' + size.group(1) + ' more were asked for)' if size else ''}")
    if "DefaultCPUAllocator: can't allocate memory" in text:
        size = re.search(r"allocate (\d+) bytes", text)
        asked = f" ({int(size.group(1)) / 2**30:.1f} GiB more were asked for)" if size else ""
        return f"out of memory{asked}"
    return None


def _from_newest(out: str) -> str:
    from sagan_fast.train.checkpoint import newest_checkpoint

    newest = newest_checkpoint(out)
    return f" (it continues from {newest})" if newest else ""


def say(line: str, file) -> None:
    try:
        print(line, file=file, flush=True)
    except OSError:  # a closed terminal or pipe: nothing to tell
        pass


def error(err: Exception | str) -> int:
    say(f"{PROG}: error: {err}", sys.stderr)
    return 2


def output_error(err: OSError, out: str) -> str:
    """One line for a failed write to the run folder (a full disk, a quota, permissions)."""
    name = os.fsdecode(err.filename) if err.filename is not None else out
    return (f"{name}: {err.strerror} (a full disk, a quota, permissions?); fix that and run the same "
            "command to continue from the newest checkpoint")


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
        return shlex.join([*([] if PROG == CONSOLE_SCRIPT else ["python"]), PROG, *_without_resume(argv)])
    if PROG == CONSOLE_SCRIPT and "TORCHELASTIC_RUN_ID" not in os.environ:
        return shlex.join([PROG, *_without_resume(sys.argv[1:])])
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
