"""The run folder (--out) belongs to one training run at a time.

:class:`RunFolder` (a context manager around the whole run) creates the folder, checks it is
writable, takes an exclusive lock on ``<out>/.lock`` and removes the temporary files that
interrupted checkpoint and sample writes left there. Only rank 0 writes into the folder, so only
rank 0 locks it (with a folder shared by several machines the lock is taken where rank 0 runs).

The lock is a POSIX record lock (``fcntl.lockf``): the kernel drops it when the process ends, however
it ends (``kill -9`` included), so a restarted worker (torchrun --max-restarts) or the next run gets
it at once; unlike ``flock`` it is not shared with forked children (DataLoader workers that outlive
a killed trainer for a few seconds do not keep the folder locked). It works across machines on NFS.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from pathlib import Path

from . import checkpoint as ckpt
from .config import ConfigError
from .distributed import DistInfo
from .errors import together
from .logging import note

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

LOCK_FILE = ".lock"


class RunFolder:
    """``with RunFolder(out, info):`` the folder is this run's (see the module doc). Raises
    :class:`ConfigError` on every rank if it cannot be created or written, or another run holds it."""

    def __init__(self, out: str | os.PathLike, info: DistInfo) -> None:
        self.out, self.info = Path(out), info
        self._fd: int | None = None

    def __enter__(self) -> "RunFolder":
        together(self.info, self._open if self.info.is_main else lambda: None)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (deleting it would race a new run)
            self._fd = None

    def _open(self) -> None:
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            if out.is_symlink() and not out.exists():
                raise ConfigError(f"--out {out}: a symbolic link to {os.readlink(out)}, which does not exist "
                                  "(or is a loop of links)") from None
            raise ConfigError(f"--out {out}: exists and is not a folder") from None
        except OSError as err:
            raise ConfigError(f"--out {out}: cannot create the run folder ({err.strerror})") from None
        try:  # a write test that also works where the lock file exists already (a read-only mount)
            with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
                pass
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"--out {out}: not writable ({err.strerror})") from None
        locked = self._lock(fd)
        self._fd = fd
        removed = ckpt.remove_stale_temp_files(out, all_stale=locked)
        if removed:
            size = sum(s for _, s in removed)
            note(f"removed {len(removed)} temporary file(s) of interrupted writes in {out} "
                 f"({size / 2**20:.1f} MiB)")

    def _lock(self, fd: int) -> bool:
        """Take the lock (True), or raise if another run holds it; False where locks are unsupported."""
        if fcntl is None:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: a file system without locks
                note(f"warning: cannot lock {self.out / LOCK_FILE} ({err.strerror}): nothing stops a second "
                     "run on this folder", warning=True)
                return False
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ConfigError(f"--out {self.out}: in use by another training run ({holder}); wait for it to "
                              "finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return True
