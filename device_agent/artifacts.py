"""Fetching a release's files: the agent routes, signed URLs, Range resume, signed length, sha256.

:class:`ServiceClient` talks to the service's agent routes with the device token, verifying the
server against the fleet CA pinned at enrollment: ``GET /api/v1/agent/signing-keys`` and
``GET /api/v1/agent/releases/{release_id}/urls``. The URLs it returns are short-lived and
signed for this device; :func:`download_file` fetches one of them without the token (the URL is
its own credential, and a presigned S3 URL must not see the device token):

* into a partial file named by the stored sha256, resuming with ``Range`` from its length after
  a cut, so no byte is fetched twice;
* reading at most the signed ``stored_size``: a longer body is refused, never cut to fit;
* a 403 (the URL expired during a long cut) asks the service for fresh URLs, a bounded number
  of times;
* the sha256 of the stored bytes must be the signed one, or the partial file is deleted.

httpx errors never leave this module; they become::

    AgentError
    └── ArtifactError                  a release's files could not be fetched as signed
        ├── ArtifactUnavailableError   no usable answer (network, 5xx, timeout): try again later
        ├── ArtifactRefusedError       the service refused (4xx) a route the agent needs
        ├── ArtifactUrlExpiredError    still 403 after asking for fresh URLs
        ├── ArtifactTooLargeError      the server sent (or announced) more than the signed length
        ├── ArtifactIntegrityError     the stored bytes' sha256 is not the signed one
        └── InsufficientDiskError      not enough free space for the download and the install
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent import failpoints
from device_agent.config import AgentSettings
from device_agent.errors import AgentError
from device_agent.http_answers import caused_by_cert_verification, problem_detail
from device_agent.https_transport import load_service_credentials
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import ManifestFile
from fleet_protocol.manifest import key_id_of, public_key_from_text

__all__ = [
    "SIGNING_KEYS_PATH",
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactRefusedError",
    "ArtifactTooLargeError",
    "ArtifactUnavailableError",
    "ArtifactUrlExpiredError",
    "InsufficientDiskError",
    "ReleaseUrls",
    "ServiceClient",
    "check_disk",
    "download_file",
    "release_urls_path",
]

logger = logging.getLogger(__name__)

SIGNING_KEYS_PATH = "/api/v1/agent/signing-keys"

# Bytes handed to a worker thread per write+hash: large enough that the thread hop costs
# nothing next to the work, small enough to keep a Pi's memory flat and progress smooth.
_WRITE_BYTES = 1024 * 1024
# The first pause after a cut; doubled per cut in a row, capped by model_retry_max_s.
_CUT_PAUSE_S = 0.5
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class ArtifactError(AgentError):
    """A release's files could not be fetched as signed."""


class ArtifactUnavailableError(ArtifactError):
    """No usable answer from the service or the artifact URL; a later attempt may succeed."""


class ArtifactRefusedError(ArtifactError):
    """The service answered a 4xx to a route the agent needs (revoked device, release withdrawn)."""


class ArtifactUrlExpiredError(ArtifactError):
    """The artifact URL kept answering 403 although fresh URLs were asked for."""


class ArtifactTooLargeError(ArtifactError):
    """The server sent or announced more bytes than the manifest signs for the file."""


class ArtifactIntegrityError(ArtifactError):
    """The downloaded bytes do not hash to the signed sha256: tampered with or damaged."""


class InsufficientDiskError(ArtifactError):
    """The filesystem holding the state dir has too little free space for the release."""


def release_urls_path(release_id: str) -> str:
    """The agent route that hands out one release's signed URLs."""
    return f"/api/v1/agent/releases/{release_id}/urls"


@dataclass(frozen=True, slots=True)
class ReleaseUrls:
    """A release's signed download URLs by file name, as the service issued them."""

    release_id: str
    urls: dict[str, str]


class ServiceClient:
    """HTTPS to the service's agent routes (device token, pinned CA) and to artifact URLs."""

    def __init__(self, api: httpx.AsyncClient, downloads: httpx.AsyncClient) -> None:
        self._api = api
        self._downloads = downloads

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, identity: DeviceIdentity, state: StateDir, settings: AgentSettings
    ) -> AsyncIterator[ServiceClient]:
        """Clients for ``identity``'s service; both close on exit."""
        context, token = await asyncio.to_thread(load_service_credentials, state)
        timeout = httpx.Timeout(settings.http_timeout_s, connect=settings.connect_timeout_s)
        api = httpx.AsyncClient(
            base_url=identity.service_url,
            verify=context,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
        # No token here: a signed URL carries its own credential. identity encoding, because a
        # Range is counted in the bytes on the wire and the sha256 is of the stored bytes.
        downloads = httpx.AsyncClient(
            verify=context, timeout=timeout, headers={"Accept-Encoding": "identity"}
        )
        async with api, downloads:
            yield cls(api, downloads)

    @property
    def downloads(self) -> httpx.AsyncClient:
        """The token-less client :func:`download_file` fetches signed URLs with."""
        return self._downloads

    async def signing_keys(self) -> dict[str, Ed25519PublicKey]:
        """The manifest signing keys the service trusts now, by key id."""
        body = await self._get_json(SIGNING_KEYS_PATH)
        keys: dict[str, Ed25519PublicKey] = {}
        try:
            for item in body["keys"]:
                key = public_key_from_text(str(item["public_key"]))
                if key_id_of(key) != item["key_id"]:
                    raise ValueError(f"key id {item['key_id']} does not name its key")
                keys[key_id_of(key)] = key
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{SIGNING_KEYS_PATH} answered with no usable key list ({exc}); check that "
                "agent and service versions match"
            ) from exc
        return keys

    async def release_urls(self, release_id: str) -> ReleaseUrls:
        """Fresh signed URLs for every file of ``release_id``."""
        path = release_urls_path(release_id)
        body = await self._get_json(path)
        try:
            urls = {str(name): str(url) for name, url in dict(body["urls"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{path} answered with no URLs ({exc}); check that agent and service versions match"
            ) from exc
        return ReleaseUrls(release_id=release_id, urls=urls)

    async def _get_json(self, path: str) -> Any:
        url = str(self._api.base_url.join(path))
        try:
            response = await self._api.get(path)
        except httpx.RequestError as exc:
            raise _unreachable(url, exc) from exc
        if response.status_code >= 500:
            raise ArtifactUnavailableError(
                f"{url} answered {response.status_code}: {problem_detail(response)}"
            )
        if not response.is_success:
            raise ArtifactRefusedError(
                f"{url} answered {response.status_code}: {problem_detail(response)}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise ArtifactError(f"{url} did not answer with JSON; is a proxy in the way?") from exc


# A callable giving the file's current signed URL; ``fresh=True`` asks the service for new ones.
UrlSource = Callable[[bool], Awaitable[str]]
# Called with the bytes of the file on disk so far (resumed bytes included).
Progress = Callable[[int], None]


async def download_file(
    client: httpx.AsyncClient,
    file: ManifestFile,
    partial: Path,
    *,
    url: UrlSource,
    progress: Progress,
    settings: AgentSettings,
) -> None:
    """Fetch ``file``'s stored bytes into ``partial``, resuming from what is there already.

    Returns once ``partial`` holds exactly ``file.stored_size`` bytes hashing to
    ``file.stored_sha256``; raises an :class:`ArtifactError` otherwise. On an unavailable
    server or a cut past ``download_retries`` the partial file stays for the next attempt; on a
    refused length or hash it is deleted.
    """
    sink = await asyncio.to_thread(_PartialFile.open, partial, file.stored_size)
    try:
        await _fetch_until_complete(client, file, sink, url=url, progress=progress, s=settings)
        digest = sink.digest()
    finally:
        await asyncio.to_thread(sink.close)
    if digest != file.stored_sha256:
        await asyncio.to_thread(partial.unlink, True)
        raise ArtifactIntegrityError(
            f"{file.name}: the downloaded bytes hash to {digest}, but the signed manifest says "
            f"{file.stored_sha256}: the artifact was tampered with or damaged; it was deleted"
        )


async def _fetch_until_complete(
    client: httpx.AsyncClient,
    file: ManifestFile,
    sink: _PartialFile,
    *,
    url: UrlSource,
    progress: Progress,
    s: AgentSettings,
) -> None:
    refreshes = 0
    cuts = 0
    fresh = False
    progress(sink.size)
    while sink.size < file.stored_size:
        target = await url(fresh)
        fresh = False
        try:
            await _fetch_range(client, target, file, sink, progress)
        except _ExpiredUrl as exc:
            if refreshes >= s.download_url_refreshes:
                raise ArtifactUrlExpiredError(
                    f"{file.name}: the artifact URL was refused (403: {exc}) even after "
                    f"{refreshes} fresh URLs; check the device's clock and the service's "
                    "artifact URL settings"
                ) from exc
            refreshes += 1
            fresh = True
            logger.info("artifact URL for %s refused (%s); asking for fresh URLs", file.name, exc)
        except _Cut as exc:
            cuts += 1
            if cuts > s.download_retries:
                raise ArtifactUnavailableError(
                    f"{file.name}: the download was cut {cuts} times in a row, last: {exc}; "
                    f"{sink.size} of {file.stored_size} bytes are kept for the next attempt"
                ) from exc
            pause = min(_CUT_PAUSE_S * 2 ** (cuts - 1), s.model_retry_max_s)
            logger.info(
                "download of %s cut at %d of %d bytes (%s); resuming in %.1f s",
                file.name,
                sink.size,
                file.stored_size,
                exc,
                pause,
            )
            await asyncio.sleep(pause)


class _ExpiredUrl(Exception):  # noqa: N818 -- internal signal, never leaves this module
    pass


class _Cut(Exception):  # noqa: N818 -- internal signal, never leaves this module
    pass


async def _fetch_range(
    client: httpx.AsyncClient,
    url: str,
    file: ManifestFile,
    sink: _PartialFile,
    progress: Progress,
) -> None:
    """One GET from ``sink.size``; returns when the body ended, raises _Cut on a cut."""
    start = sink.size
    headers = {"Range": f"bytes={start}-"} if start else {}
    buffer = bytearray()
    try:
        async with client.stream("GET", url, headers=headers) as response:
            await _check_answer(response, file, start, sink)
            remaining = file.stored_size - sink.size
            async for chunk in response.aiter_raw():
                if len(chunk) > remaining:
                    await _refuse_too_long(file, sink, "sent")
                remaining -= len(chunk)
                buffer += chunk
                if len(buffer) >= _WRITE_BYTES:
                    await _write(sink, buffer, progress)
                    buffer = bytearray()
    except httpx.TransportError as exc:
        if caused_by_cert_verification(exc):
            raise _unreachable(url, exc) from exc
        # What arrived before the cut is kept, so the resume does not fetch it again.
        await _write(sink, buffer, progress)
        await asyncio.to_thread(sink.sync)
        raise _Cut(f"{type(exc).__name__}: {exc}") from exc
    await _write(sink, buffer, progress)
    await asyncio.to_thread(sink.sync)
    if sink.size < file.stored_size:
        raise _Cut(f"the body ended at {sink.size} of {file.stored_size} bytes")


async def _check_answer(
    response: httpx.Response, file: ManifestFile, start: int, sink: _PartialFile
) -> None:
    status = response.status_code
    if status == httpx.codes.FORBIDDEN:
        await response.aread()
        raise _ExpiredUrl(problem_detail(response))
    if status >= 500 or status == httpx.codes.TOO_MANY_REQUESTS:
        raise _Cut(f"{status} from the artifact URL")
    if status == httpx.codes.REQUESTED_RANGE_NOT_SATISFIABLE:
        # The partial file is longer than the stored blob: not ours. Start over.
        await asyncio.to_thread(sink.reset)
        raise _Cut("416: the partial file does not fit the stored artifact; starting over")
    if status == httpx.codes.PARTIAL_CONTENT:
        match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if match is None or int(match.group(1)) != start:
            raise _Cut(
                f"206 with an unusable Content-Range {response.headers.get('content-range')!r}"
            )
        total = match.group(3)
        if total != "*" and int(total) > file.stored_size:
            await _refuse_too_long(file, sink, f"announced a total of {total} bytes")
    elif status == httpx.codes.OK:
        if start:
            # A server that ignores Range: the bytes we have come again, but correctly.
            logger.warning("%s: the server ignored Range; downloading from the start", file.name)
            await asyncio.to_thread(sink.reset)
    else:
        await response.aread()
        raise ArtifactRefusedError(
            f"{file.name}: the artifact URL answered {status}: {problem_detail(response)}"
        )
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > file.stored_size - sink.size:
        await _refuse_too_long(file, sink, f"announced {length} bytes from offset {sink.size}")


async def _refuse_too_long(file: ManifestFile, sink: _PartialFile, what: str) -> None:
    await asyncio.to_thread(sink.discard)
    raise ArtifactTooLargeError(
        f"{file.name}: the server {what}, more than the signed {file.stored_size} bytes; "
        "refused (the partial file was deleted)"
    )


async def _write(sink: _PartialFile, data: bytearray, progress: Progress) -> None:
    if not data:
        return
    await asyncio.to_thread(sink.write, bytes(data))
    progress(sink.size)
    failpoints.hit(failpoints.Step.DOWNLOADING)


class _PartialFile:
    """A partial download: appended to, hashed as it grows; blocking methods run in threads."""

    def __init__(self, path: Path, file: BinaryIO, hasher: Any, size: int) -> None:
        self.path = path
        self._file = file
        self._hasher = hasher
        self.size = size

    @classmethod
    def open(cls, path: Path, limit: int) -> _PartialFile:
        """Open ``path`` for appending, hashing what is there; delete it if over ``limit``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        size = 0
        if path.exists() and path.stat().st_size > limit:
            path.unlink()
        if path.exists():
            with path.open("rb") as existing:
                while block := existing.read(_WRITE_BYTES):
                    hasher.update(block)
                    size += len(block)
        return cls(path, path.open("ab"), hasher, size)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hasher.update(data)
        self.size += len(data)

    def sync(self) -> None:
        # What is fsynced here is never fetched again after a power cut.
        self._file.flush()
        os.fsync(self._file.fileno())

    def reset(self) -> None:
        self._file.truncate(0)
        self._file.seek(0)
        self._hasher = hashlib.sha256()
        self.size = 0

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def digest(self) -> str:
        return str(self._hasher.hexdigest())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def check_disk(directory: Path, needed: int, *, what: str) -> None:
    """Raise :class:`InsufficientDiskError` unless ``needed`` bytes are free in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise InsufficientDiskError(
            f"{what} needs {needed} bytes free in {directory}, only {free} are; free some space "
            "or lower model_disk_margin_bytes"
        )


def _unreachable(url: str, exc: httpx.RequestError) -> ArtifactError:
    if caused_by_cert_verification(exc):
        return ArtifactRefusedError(
            f"the TLS certificate of {url} is not signed by the pinned fleet CA ({exc}); "
            "something between the device and the service intercepts HTTPS"
        )
    return ArtifactUnavailableError(f"cannot reach {url} ({type(exc).__name__}: {exc})")
