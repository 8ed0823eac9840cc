"""Model releases: validate a request, store its files (sealed when asked), number, sign, record.

A release's number rises by one per model name. Two uploads of one name racing each other both
read the same highest number; the unique constraint on (name, release) lets only one insert
win, and the other retries with the next number inside a savepoint, so neither fails.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_protocol.manifest import (
    FILE_NAME_PATTERN,
    MODEL_NAME_PATTERN,
    Encryption,
    FileRole,
    ManifestFile,
    ModelManifest,
    ModelRuntime,
    SignedManifest,
    TargetConstraints,
)
from fleet_protocol.sealing import new_key, seal_chunks
from fleet_service.artifacts.errors import ReleaseInvalidError
from fleet_service.artifacts.signing import ReleaseSigner
from fleet_service.artifacts.store import ArtifactStore, read_file_chunks
from fleet_service.errors import ConflictError, NotFoundError
from fleet_service.schemas import ModelConstraintsPublic, ModelFilePublic, ModelReleasePublic
from fleet_service.tables import ModelRelease

__all__ = [
    "ARCHITECTURE_PATTERN",
    "VERSION_PATTERN",
    "ProgressHook",
    "ReleaseFile",
    "constraints_from",
    "create_release",
    "get_release",
    "list_releases",
    "release_public",
    "resign_release",
    "signed_manifest_of",
]

logger = logging.getLogger(__name__)

# A version shows in listings and may name a directory on the device: no spaces or separators.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
# As devices report it (platform.machine(), lowercased): x86_64, aarch64, armv7l, amd64, ...
ARCHITECTURE_PATTERN = r"^[a-z0-9_]{1,32}$"
# Each retry means another upload of the same name committed in between; twenty in a row
# would take a burst of concurrent uploads no operator produces.
MAX_NUMBERING_ATTEMPTS = 20
MAX_FILES = 16

ProgressHook = Callable[[int], None]
"""Called with the number of plaintext bytes just read, as a release's files are stored."""


@dataclass(frozen=True)
class ReleaseFile:
    """A local file to put in a release; ``name`` (on the device) defaults to the file's name."""

    path: Path
    role: FileRole
    name: str | None = None

    @property
    def file_name(self) -> str:
        return self.name if self.name is not None else self.path.name


def _check_request(
    name: str,
    version: str,
    runtime: ModelRuntime | str,
    files: Sequence[ReleaseFile],
    constraints: TargetConstraints,
    expires_at: datetime,
    now: datetime,
) -> ModelRuntime:
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise ReleaseInvalidError(
            f"model name {name!r} is invalid: use 1-63 of a-z, 0-9, '_' and '-', starting "
            "with a letter or digit"
        )
    if not re.fullmatch(VERSION_PATTERN, version):
        raise ReleaseInvalidError(
            f"version {version!r} is invalid: use 1-64 of letters, digits, '.', '_', '+' and "
            "'-', starting with a letter or digit"
        )
    try:
        parsed_runtime = ModelRuntime(runtime)
    except ValueError:
        choices = ", ".join(r.value for r in ModelRuntime)
        raise ReleaseInvalidError(f"runtime {runtime!r} is unknown: use one of {choices}") from None
    weights = [f for f in files if f.role is FileRole.WEIGHTS]
    if len(weights) != 1:
        raise ReleaseInvalidError(
            f"a release needs exactly one weights file, got {len(weights)}; pass the model file "
            "as the weights"
        )
    if len(files) > MAX_FILES:
        raise ReleaseInvalidError(f"a release holds at most {MAX_FILES} files, got {len(files)}")
    seen: set[str] = set()
    for file in files:
        _check_file(file, seen)
    for arch in constraints.architectures:
        if not re.fullmatch(ARCHITECTURE_PATTERN, arch):
            raise ReleaseInvalidError(
                f"architecture {arch!r} is invalid: use the machine name devices report, in "
                "lowercase (x86_64, aarch64, armv7l, ...)"
            )
    if expires_at.tzinfo is None:
        raise ReleaseInvalidError("the expiry needs a time zone (UTC)")
    if expires_at <= now:
        raise ReleaseInvalidError(
            f"the expiry {expires_at.isoformat()} is in the past; choose a later one "
            "(expires_in_days of 1 or more)"
        )
    return parsed_runtime


def _check_file(file: ReleaseFile, seen: set[str]) -> None:
    name = file.file_name
    if not re.fullmatch(FILE_NAME_PATTERN, name):
        raise ReleaseInvalidError(
            f"{file.role.value} file name {name!r} is invalid: use letters, digits, '.', '_' "
            "and '-' (at most 128, no directories); rename the file"
        )
    if name in seen:
        raise ReleaseInvalidError(f"two files of the release are named {name!r}; rename one")
    seen.add(name)
    try:
        size = file.path.stat().st_size
    except FileNotFoundError:
        raise ReleaseInvalidError(f"{file.role.value} file {file.path} does not exist") from None
    if size == 0:
        raise ReleaseInvalidError(f"{file.role.value} file {name} is empty")


def _store_file(
    store: ArtifactStore, file: ReleaseFile, key: bytes | None, progress: ProgressHook | None
) -> ManifestFile:
    hasher = hashlib.sha256()
    size = 0

    def plaintext() -> Iterator[bytes]:
        nonlocal size
        for chunk in read_file_chunks(file.path):
            hasher.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
            yield chunk

    # One pass over the file: hashed as plaintext, sealed (if asked) and hashed again as stored.
    stored = store.put_stream(plaintext() if key is None else seal_chunks(plaintext(), key))
    if size == 0:
        raise ReleaseInvalidError(f"{file.role.value} file {file.file_name} is empty")
    return ManifestFile(
        name=file.file_name,
        role=file.role,
        sha256=hasher.hexdigest(),
        size=size,
        stored_sha256=stored.sha256,
        stored_size=stored.size,
    )


def _new_id() -> str:
    return "rel-" + secrets.token_hex(8)


def _insert_numbered(
    session: Session, name: str, build: Callable[[int], ModelRelease]
) -> ModelRelease:
    for _ in range(MAX_NUMBERING_ATTEMPTS):
        latest = session.exec(
            select(func.max(ModelRelease.release)).where(ModelRelease.name == name)
        ).one()
        row = build((latest or 0) + 1)
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            logger.info("release %d of %s was taken concurrently; retrying", row.release, name)
            continue
        return row
    raise ConflictError(
        f"could not number a new release of {name}: {MAX_NUMBERING_ATTEMPTS} concurrent "
        "uploads took each number first; try again"
    )


def create_release(
    session: Session,
    store: ArtifactStore,
    signer: ReleaseSigner,
    *,
    name: str,
    version: str,
    runtime: ModelRuntime | str,
    files: Sequence[ReleaseFile],
    constraints: TargetConstraints | None = None,
    expires_at: datetime,
    encrypt: bool = False,
    created_by: str,
    progress: ProgressHook | None = None,
    now: datetime | None = None,
) -> ModelRelease:
    """Store ``files``, sign a manifest with the next release number of ``name``, record it.

    With ``encrypt`` every file is sealed under one fresh AES-256 key (kept on the row, base64;
    it reaches only targeted devices). Raises ReleaseInvalidError naming what to fix.
    """
    now = now or datetime.now(UTC)
    constraints = constraints or TargetConstraints()
    parsed_runtime = _check_request(name, version, runtime, files, constraints, expires_at, now)
    key = new_key() if encrypt else None
    stored = [_store_file(store, file, key, progress) for file in files]
    encryption = Encryption.AES_256_GCM_CHUNKED if encrypt else Encryption.NONE

    def build(number: int) -> ModelRelease:
        manifest = ModelManifest(
            name=name,
            version=version,
            runtime=parsed_runtime,
            release=number,
            files=stored,
            constraints=constraints,
            encryption=encryption,
            created_at=now,
            expires_at=expires_at,
        )
        return _row(manifest, signer, key, created_by=created_by, rollback_of=None)

    row = _insert_numbered(session, name, build)
    logger.info(
        "release %d of %s %s stored (%d files, %d bytes, %s)",
        row.release,
        name,
        version,
        len(stored),
        row.stored_bytes,
        encryption.value,
    )
    return row


def _row(
    manifest: ModelManifest,
    signer: ReleaseSigner,
    key: bytes | None,
    *,
    created_by: str,
    rollback_of: str | None,
) -> ModelRelease:
    signed = signer.sign(manifest)
    return ModelRelease(
        id=_new_id(),
        name=manifest.name,
        version=manifest.version,
        runtime=manifest.runtime.value,
        release=manifest.release,
        signed_manifest=signed.model_dump(mode="json"),
        encryption_key=base64.b64encode(key).decode() if key is not None else None,
        stored_bytes=manifest.stored_bytes,
        rollback_of=rollback_of,
        created_by=created_by,
        created_at=manifest.created_at,
        expires_at=manifest.expires_at,
    )


def resign_release(
    session: Session,
    signer: ReleaseSigner,
    release_id: str,
    *,
    created_by: str,
    now: datetime | None = None,
) -> ModelRelease:
    """A new release of the same stored files (and key), with the next number of its name.

    How a rollback to an older release gets past the devices' downgrade floor. The new
    manifest lives as long as the old one did, counted from now.
    """
    now = now or datetime.now(UTC)
    old = get_release(session, release_id)
    manifest = signed_manifest_of(old).manifest
    lifetime = manifest.expires_at - manifest.created_at
    key = base64.b64decode(old.encryption_key) if old.encryption_key else None

    def build(number: int) -> ModelRelease:
        document = manifest.model_dump()
        document.update(release=number, created_at=now, expires_at=now + lifetime)
        renewed = ModelManifest.model_validate(document)
        return _row(renewed, signer, key, created_by=created_by, rollback_of=old.id)

    return _insert_numbered(session, manifest.name, build)


def signed_manifest_of(release: ModelRelease) -> SignedManifest:
    """The signed manifest exactly as stored."""
    return SignedManifest.model_validate(release.signed_manifest)


def release_public(release: ModelRelease) -> ModelReleasePublic:
    """The API shape of a release (no encryption key)."""
    signed = signed_manifest_of(release)
    manifest = signed.manifest
    return ModelReleasePublic(
        id=release.id,
        name=release.name,
        version=release.version,
        runtime=manifest.runtime,
        release=release.release,
        files=[
            ModelFilePublic.model_validate(
                {"name": f.name, "role": f.role.value, "sha256": f.sha256, "size": f.size}
            )
            for f in manifest.files
        ],
        constraints=ModelConstraintsPublic(
            architectures=list(manifest.constraints.architectures),
            min_ram_bytes=manifest.constraints.min_ram_bytes,
            min_disk_bytes=manifest.constraints.min_disk_bytes,
        ),
        encrypted=manifest.encryption is not Encryption.NONE,
        stored_bytes=release.stored_bytes,
        key_id=signed.key_id,
        created_by=release.created_by,
        created_at=release.created_at,
        expires_at=release.expires_at,
        rollback_of=release.rollback_of,
    )


def get_release(session: Session, release_id: str) -> ModelRelease:
    """One release; NotFoundError naming it."""
    release = session.get(ModelRelease, release_id)
    if release is None:
        raise NotFoundError(f"model release {release_id!r} does not exist")
    return release


def list_releases(
    session: Session, *, name: str | None = None, limit: int = 200
) -> list[ModelRelease]:
    """Releases, newest first; only those of ``name`` when given."""
    query = select(ModelRelease)
    if name is not None:
        query = query.where(ModelRelease.name == name)
    query = query.order_by(col(ModelRelease.created_at).desc(), col(ModelRelease.release).desc())
    return list(session.exec(query.limit(limit)).all())


def constraints_from(
    architectures: Sequence[str], min_ram_bytes: int, min_disk_bytes: int
) -> TargetConstraints:
    """TargetConstraints from loose input (lowercased architectures); ReleaseInvalidError."""
    try:
        return TargetConstraints(
            architectures=[a.strip().lower() for a in architectures if a.strip()],
            min_ram_bytes=min_ram_bytes,
            min_disk_bytes=min_disk_bytes,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ReleaseInvalidError(f"constraints {where}: {first['msg']}") from exc
