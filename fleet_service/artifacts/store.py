"""The artifact store interface: blobs addressed by the sha256 of their bytes, and its factory.

Two implementations sit behind :class:`ArtifactStore`: :mod:`fleet_service.artifacts.fs` (files
under the fleet home, the default) and :mod:`fleet_service.artifacts.s3` (MinIO or any S3 API).
Everything is streamed: a blob is hashed while it is written and read back in ranges, so a
multi-gigabyte model never sits in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from fleet_service.artifacts.errors import BlobNotFoundError
from fleet_service.artifacts.urls import SignedUrl, UrlSigner
from fleet_service.config import ServiceSettings
from fleet_service.home import FleetHome

__all__ = [
    "READ_CHUNK_BYTES",
    "ArtifactStore",
    "SignedUrl",
    "StoredBlob",
    "artifacts_dir",
    "check_digest",
    "open_store",
    "read_file_chunks",
]

# Big enough that per-chunk overhead (a thread hop, a TLS record) vanishes next to the copy,
# small enough that a few concurrent downloads stay a few MiB of memory.
READ_CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoredBlob:
    """What a put stored: the sha256 (hex) and length of the bytes."""

    sha256: str
    size: int


@runtime_checkable
class ArtifactStore(Protocol):
    """Blobs addressed by the sha256 of their bytes.

    Putting bytes that are already stored is a no-op returning the same address. A blob is
    either wholly present or absent: a failed or interrupted put leaves nothing under its name.
    """

    kind: str

    def put_file(self, path: Path) -> StoredBlob:
        """Store the bytes of a local file."""
        ...

    def put_stream(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Store the concatenation of ``chunks``; an exception from the iterable stores nothing."""
        ...

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of a blob (``end`` None: to its end); BlobNotFoundError."""
        ...

    def size(self, sha256: str) -> int:
        """Length of a blob; BlobNotFoundError when absent."""
        ...

    def exists(self, sha256: str) -> bool:
        """Whether a blob is stored."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove a blob; removing an absent blob is harmless."""
        ...

    def signed_url(self, sha256: str, *, device_id: str) -> SignedUrl:
        """A short-lived URL from which ``device_id`` may fetch the blob."""
        ...


def check_digest(sha256: str) -> str:
    """``sha256`` if it is 64 lowercase hex digits; else BlobNotFoundError (never a path)."""
    if not _SHA256.fullmatch(sha256):
        raise BlobNotFoundError(f"{sha256[:80]!r} is not a sha256 (64 lowercase hex digits)")
    return sha256


def read_file_chunks(path: Path, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """A local file in pieces."""
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            yield chunk


def artifacts_dir(home: FleetHome) -> Path:
    """Where the filesystem store keeps blobs (and every store spools uploads)."""
    return home.root / "artifacts"


def open_store(settings: ServiceSettings, home: FleetHome) -> ArtifactStore:
    """The store ``settings.artifact_store`` names; S3 checks (and creates) its bucket."""
    urls = UrlSigner.load(home, ttl_s=settings.artifact_url_ttl_s, base_url=settings.service_url)
    if settings.artifact_store == "s3":
        from fleet_service.artifacts.s3 import S3ArtifactStore

        return S3ArtifactStore.from_settings(settings, spool_dir=artifacts_dir(home) / ".tmp")
    from fleet_service.artifacts.fs import FsArtifactStore

    return FsArtifactStore(artifacts_dir(home), urls)
