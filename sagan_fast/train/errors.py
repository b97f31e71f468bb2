"""What a training run reports as one line instead of a traceback, and how ranks agree on it.

A *user error* (:data:`USER_ERRORS`) is a mistake in the flags, the data, the run folder or a
checkpoint, a full disk, or a run that diverged: ``train_ddp.py`` prints it as
``train_ddp.py: error: ...`` and exits 2. Under DDP a check that may fail on some ranks only runs
through :func:`together`, so every rank stops at the same point: the rank that found the problem (the
lowest one) reports it, the others raise :class:`OtherRankFailed`, which prints nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

from ..models.config import ConfigError

if TYPE_CHECKING:
    from .distributed import DistInfo

T = TypeVar("T")


class DataError(ValueError):
    """The data source is missing, empty or entirely unreadable."""


class Diverged(RuntimeError):
    """The losses went non-finite or past --max-loss, or a spectral norm degenerated."""


class OutputError(RuntimeError):
    """The run folder could not be written: a full disk, a quota, a read-only file system."""


class OtherRankFailed(RuntimeError):
    """Another rank hit a user error and reports it; this rank stops quietly (exit 2)."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, Diverged, OutputError)


def together(info: "DistInfo", fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on every rank; if it raises a user error on any rank, every rank raises:
    the lowest failing rank its own error, the others :class:`OtherRankFailed`. One collective (an
    all-gather of the error messages) under DDP; nothing extra alone."""
    from .distributed import all_gather_objects

    try:
        value, error = fn(*args, **kwargs), None
    except USER_ERRORS as err:
        value, error = None, err
    if not info.distributed:
        if error is not None:
            raise error
        return value
    failed = [r for r, e in enumerate(all_gather_objects(None if error is None else str(error), info))
              if e is not None]
    if not failed:
        return value
    if info.rank == failed[0]:
        raise error
    raise OtherRankFailed(f"rank {failed[0]} failed")
