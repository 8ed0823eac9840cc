"""The S3 artifact store (MinIO or any S3 API) through the ``minio`` package.

Objects are named ``artifacts/<aa>/<sha256>``. A stream is spooled to a local temporary file
while it is hashed (S3 needs the name, i.e. the digest, before the upload starts), then
uploaded in parts, so memory stays bounded. Devices download by MinIO presigned GET URLs,
signed for ``s3_public_endpoint`` (the address devices reach) when it differs from the one
the service uses. Foreign errors (S3Error, urllib3) become StoreUnavailableError or
BlobNotFoundError here, at the boundary.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from fleet_service.artifacts.errors import BlobNotFoundError, StoreUnavailableError
from fleet_service.artifacts.store import (
    READ_CHUNK_BYTES,
    StoredBlob,
    check_digest,
    read_file_chunks,
)
from fleet_service.artifacts.urls import SignedUrl
from fleet_service.config import ServiceSettings

__all__ = ["S3ArtifactStore"]

_PREFIX = "artifacts/"
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound"}
# S3 multipart parts: 64 MiB keeps a 4 GiB model at 64 parts, well under the 10,000-part cap.
_PART_BYTES = 64 * 1024 * 1024
# A stalled S3 endpoint must not hang an upload or a download thread forever.
_TIMEOUT = urllib3.Timeout(connect=10, read=120)


def _http() -> urllib3.PoolManager:
    retries = urllib3.Retry(total=3, backoff_factor=0.5, status_forcelist=[500, 502, 503, 504])
    return urllib3.PoolManager(timeout=_TIMEOUT, retries=retries, maxsize=16)


class S3ArtifactStore:
    """Blobs as objects in one bucket."""

    kind = "s3"

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        spool_dir: Path,
        url_ttl_s: int,
        presigner: Minio | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.spool_dir = spool_dir
        self.url_ttl_s = url_ttl_s
        self.presigner = presigner or client
        spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def from_settings(cls, settings: ServiceSettings, *, spool_dir: Path) -> S3ArtifactStore:
        """A store for the ``s3_*`` settings; creates the bucket when it does not exist."""
        assert settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key

        def client(endpoint: str) -> Minio:
            return Minio(
                endpoint,
                access_key=settings.s3_access_key,
                secret_key=settings.s3_secret_key.get_secret_value()
                if settings.s3_secret_key
                else None,
                secure=settings.s3_secure,
                # Given, so presigning needs no round trip to look the bucket's region up.
                region=settings.s3_region,
                http_client=_http(),
            )

        main = client(settings.s3_endpoint)
        public = settings.s3_public_endpoint
        store = cls(
            main,
            settings.s3_bucket,
            spool_dir=spool_dir,
            url_ttl_s=settings.artifact_url_ttl_s,
            presigner=client(public) if public and public != settings.s3_endpoint else None,
        )
        store.ensure_bucket()
        return store

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists."""
        with _translated(f"bucket {self.bucket}"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

    @staticmethod
    def object_name(sha256: str) -> str:
        """The object key of a blob."""
        check_digest(sha256)
        return f"{_PREFIX}{sha256[:2]}/{sha256}"

    def put_file(self, path: Path) -> StoredBlob:
        """Hash a local file, then upload it unless the bucket already holds it."""
        hasher = hashlib.sha256()
        size = 0
        for chunk in read_file_chunks(path):
            hasher.update(chunk)
            size += len(chunk)
        blob = StoredBlob(hasher.hexdigest(), size)
        if not self.exists(blob.sha256):
            with _translated(f"upload of {blob.sha256}"):
                self.client.fput_object(
                    self.bucket, self.object_name(blob.sha256), str(path), part_size=_PART_BYTES
                )
        return blob

    def put_stream(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Spool ``chunks`` to a temporary file, then upload it by its digest."""
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="s3-")
        spool = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            return self.put_file(spool)
        finally:
            spool.unlink(missing_ok=True)

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of a blob, streamed from S3."""
        length = 0 if end is None else max(0, end - start)
        if end is not None and length == 0:
            return iter(())
        with _translated(f"artifact {sha256}"):
            response = self.client.get_object(
                self.bucket, self.object_name(sha256), offset=start, length=length
            )
        return _stream(response, sha256)

    def size(self, sha256: str) -> int:
        """Length of a blob."""
        with _translated(f"artifact {sha256}"):
            stat = self.client.stat_object(self.bucket, self.object_name(sha256))
        assert stat.size is not None
        return stat.size

    def exists(self, sha256: str) -> bool:
        """Whether a blob is stored."""
        try:
            self.size(sha256)
        except BlobNotFoundError:
            return False
        return True

    def delete(self, sha256: str) -> None:
        """Remove a blob (absent is fine: S3 deletes are idempotent)."""
        with _translated(f"artifact {sha256}"):
            self.client.remove_object(self.bucket, self.object_name(sha256))

    def signed_url(self, sha256: str, *, device_id: str) -> SignedUrl:
        """A presigned GET URL; S3 cannot bind it to ``device_id``, only to the blob and time."""
        del device_id  # the presigned URL is a bearer capability, valid for url_ttl_s
        issued = datetime.now(UTC)
        ttl = timedelta(seconds=self.url_ttl_s)
        with _translated(f"artifact {sha256}"):
            url = self.presigner.presigned_get_object(
                self.bucket, self.object_name(sha256), expires=ttl, request_date=issued
            )
        return SignedUrl(url=url, expires_at=issued + ttl)


def _stream(response: Any, sha256: str) -> Iterator[bytes]:
    try:
        with _translated(f"artifact {sha256}"):
            yield from response.stream(READ_CHUNK_BYTES)
    finally:
        response.close()
        response.release_conn()


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn minio/urllib3 failures into the store's errors, naming what was being done."""
    try:
        yield
    except S3Error as exc:
        if exc.code in _MISSING_CODES:
            raise BlobNotFoundError(f"no {what} is stored") from exc
        raise StoreUnavailableError(
            f"S3 refused the request for {what}: {exc.code} {exc.message}; check the s3_* "
            "settings (endpoint, bucket, keys)"
        ) from exc
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise StoreUnavailableError(
            f"S3 could not be reached for {what}: {exc}; check s3_endpoint and that the object "
            "store is up"
        ) from exc
