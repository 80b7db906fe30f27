"""Atomic file writes: a file appears at its path complete or not at all, even if the process dies."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_path", "atomic_save"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success fsync it, rename it over ``path``
    and fsync the folder; on any error remove it and leave ``path`` as it was.

    Example:
        >>> target = Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short name of its own: the destination's name may already be at the file system's length limit.
    fd, name = tempfile.mkstemp(prefix=".cstar-fx.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``: readers (and a
    process killed mid-write) see the old file or the new one, never half of one.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.pt"
        >>> atomic_save({"a": torch.zeros(1)}, target); target.is_file()
        True
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
