"""Files that survive a power cut: atomic replacement and durable renames.

A Raspberry Pi loses power often; every file the agent relies on after a restart (desired state,
the active model pointer, trusted keys) is written through here so it is wholly old or wholly new.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_dir", "write_atomically", "write_synced"]

_POSIX = os.name == "posix"


def write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (0600, it must not exist) holding ``data``, flushed to the disk."""
    # 0600: desired.json carries the keys of encrypted releases; nothing here is for others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_atomically(
    path: Path, data: bytes, *, before_replace: Callable[[], None] | None = None
) -> None:
    """Replace ``path`` with ``data`` so a power cut leaves the old file or the new, never half.

    Temporary file, fsync, rename over ``path``, fsync of the directory (so the rename itself
    survives a cut). ``before_replace`` runs between the fsync and the rename (a failpoint).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_synced(tmp, data)
        if before_replace is not None:
            before_replace()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (a no-op where directories cannot be fsynced)."""
    if not _POSIX:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
