"""The filesystem artifact store: ``<home>/artifacts/<aa>/<sha256>``, served by the service itself.

A put streams into a temporary file in ``.tmp/`` (same filesystem) while hashing, fsyncs it and
renames it to its digest, so a blob name only ever holds complete, verified bytes; a crash
mid-put leaves at most a temporary file, which the next start sweeps away once it is stale.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from fleet_service.artifacts.errors import BlobNotFoundError
from fleet_service.artifacts.store import (
    READ_CHUNK_BYTES,
    StoredBlob,
    check_digest,
    read_file_chunks,
)
from fleet_service.artifacts.urls import SignedUrl, UrlSigner
from fleet_service.files import fsync_dir

__all__ = ["FsArtifactStore"]

logger = logging.getLogger(__name__)

# A temporary file this old belongs to a put that died (uploads of even a large model take
# minutes), so the sweep at start-up cannot take one from under a replica still writing it.
STALE_TEMP_S = 24 * 3600


class FsArtifactStore:
    """Blobs as files under ``root``; signed URLs point at the service's artifact route."""

    kind = "fs"

    def __init__(self, root: Path, urls: UrlSigner) -> None:
        self.root = root
        self.urls = urls
        self.temp_dir = root / ".tmp"
        self.temp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sweep_stale_temps()

    def _sweep_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_S
        for temp in self.temp_dir.iterdir():
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
                    logger.info("removed a stale partial upload %s", temp.name)
            except FileNotFoundError:
                continue

    def path_of(self, sha256: str) -> Path:
        """Where a blob lives (whether or not it exists)."""
        check_digest(sha256)
        return self.root / sha256[:2] / sha256

    def put_file(self, path: Path) -> StoredBlob:
        """Store the bytes of a local file."""
        return self.put_stream(read_file_chunks(path))

    def put_stream(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Store ``chunks`` under their sha256; a failure leaves no blob behind."""
        hasher = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.temp_dir, prefix="put-")
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    hasher.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            sha256 = hasher.hexdigest()
            final = self.path_of(sha256)
            if final.exists():
                return StoredBlob(sha256, size)  # already stored: content addressing dedups
            final.parent.mkdir(exist_ok=True)
            temp.chmod(0o640)
            temp.replace(final)
            fsync_dir(final.parent)
            return StoredBlob(sha256, size)
        finally:
            temp.unlink(missing_ok=True)

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of a blob, read lazily."""
        path = self.path_of(sha256)
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFoundError(f"no artifact {sha256} is stored") from exc
        return _read_range(handle, start, end)

    def size(self, sha256: str) -> int:
        """Length of a blob."""
        try:
            return self.path_of(sha256).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFoundError(f"no artifact {sha256} is stored") from exc

    def exists(self, sha256: str) -> bool:
        """Whether a blob is stored."""
        return self.path_of(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove a blob (absent is fine)."""
        self.path_of(sha256).unlink(missing_ok=True)

    def signed_url(self, sha256: str, *, device_id: str) -> SignedUrl:
        """An HMAC-signed URL of the service's ``/api/v1/artifacts`` route."""
        return self.urls.sign(check_digest(sha256), device_id)


def _read_range(handle: BinaryIO, start: int, end: int | None) -> Iterator[bytes]:
    with handle:
        handle.seek(start)
        remaining = None if end is None else max(0, end - start)
        while remaining is None or remaining > 0:
            want = READ_CHUNK_BYTES if remaining is None else min(READ_CHUNK_BYTES, remaining)
            chunk = handle.read(want)
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
