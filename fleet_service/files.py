"""Small durable-file helpers: a file appears whole or not at all, and survives a power cut."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["create_once", "fsync_dir", "replace_atomically"]


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new name in ``directory`` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, data: bytes, mode: int) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def create_once(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it.

    The file appears whole or not at all (written aside, then hard-linked into place), so a
    concurrent reader, another replica for instance, never reads it half-written.
    """
    temp = _write_temp(path.parent, data, mode)
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink()
    fsync_dir(path.parent)
    return True


def replace_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path``, replacing it atomically (readers see old or new, whole)."""
    temp = _write_temp(path.parent, data, mode)
    try:
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
