"""Installed models on disk: partial downloads, release directories, the active pointer, the floor.

Layout under ``<state_dir>/models/`` (every method blocks: call them with ``asyncio.to_thread``)::

    downloads/<stored_sha256>.part   a download in progress (or done, not installed yet), named by
                                     content so a resumed download finds its bytes whatever release
                                     asked for them
    <name>/releases/<release>/       one installed release: its plaintext files and release.json
                                     (the release id and the signed manifest), written last
    <name>/staging-<release>-<rand>/ a release being installed; renamed into releases/ when whole
    <name>/active.json               the pointer: the active release and the one before it
    <name>/floor.json                the highest release that passed its health check here

Power cuts: a release directory appears by one rename of a complete, fsynced staging directory,
and the pointer changes by one rename of a complete, fsynced temporary file (then the directory is
fsynced), so whatever step a cut interrupts, ``active.json`` names a whole release: the old one or
the new one. Leftover staging directories are deleted at the next start. The previous release is
kept for rollback; older ones are pruned once a new release is active.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_agent import failpoints
from device_agent.durable import fsync_dir, write_atomically, write_synced
from device_agent.errors import AgentError
from device_agent.inference import ModelSpec
from fleet_protocol import Encryption, ManifestFile, ModelManifest, SignedManifest
from fleet_protocol.sealing import SealError, Unsealer

__all__ = [
    "MODELS_DIR",
    "InstallError",
    "InstalledRelease",
    "ModelStore",
]

logger = logging.getLogger(__name__)

MODELS_DIR = "models"
_DOWNLOADS = "downloads"
_RELEASES = "releases"
_ACTIVE = "active.json"
_FLOOR = "floor.json"
_RECORD = "release.json"
_STAGING_PREFIX = "staging-"
# Read and decrypt in pieces this large: a sealed chunk is 1 MiB, so nothing bigger is held.
_BLOCK_BYTES = 1024 * 1024
_POSIX = os.name == "posix"


class InstallError(AgentError):
    """A downloaded release could not be installed (decryption, plaintext digest, disk)."""


class _Pointer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    release: Annotated[int, Field(ge=1)]
    previous: Annotated[int, Field(ge=1)] | None = None


class _Floor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    accepted_release: Annotated[int, Field(ge=0)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    release_id: str
    signed: SignedManifest


@dataclass(frozen=True, slots=True)
class InstalledRelease:
    """One release installed on disk, whole."""

    release_id: str
    signed: SignedManifest
    directory: Path

    @property
    def manifest(self) -> ModelManifest:
        """The manifest it was installed from."""
        return self.signed.manifest

    @property
    def name(self) -> str:
        """The model's name."""
        return self.signed.manifest.name

    @property
    def release(self) -> int:
        """Its release number."""
        return self.signed.manifest.release

    def spec(self) -> ModelSpec:
        """What the worker pool loads."""
        manifest = self.manifest
        files = {f.role.value: self.directory / f.name for f in manifest.files}
        return ModelSpec(
            name=manifest.name,
            version=manifest.version,
            release=manifest.release,
            runtime=manifest.runtime,
            sha256=manifest.weights.sha256,
            weights=self.directory / manifest.weights.name,
            files=files,
        )

    def damaged_files(self) -> list[str]:
        """Files whose plaintext sha256 or size is not the signed one (rehashes every byte)."""
        damaged: list[str] = []
        for file in self.manifest.files:
            path = self.directory / file.name
            try:
                digest, size = _hash_file(path)
            except OSError:
                damaged.append(file.name)
                continue
            if digest != file.sha256 or size != file.size:
                damaged.append(file.name)
        return damaged


class ModelStore:
    """The models directory of one state dir; see the module docstring."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / MODELS_DIR
        # Owner only, whatever the state dir's mode: decrypted weights of sealed releases live
        # here, and a state dir made by systemd's StateDirectory= is 0755.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _POSIX:
            self.root.chmod(0o700)

    # -- downloads ------------------------------------------------------------------------------

    def partial_path(self, file: ManifestFile) -> Path:
        """Where ``file``'s stored bytes are downloaded to."""
        return self.root / _DOWNLOADS / f"{file.stored_sha256}.part"

    def partial_bytes(self, manifest: ModelManifest) -> int:
        """Bytes of ``manifest``'s files already downloaded (no more than each file's size)."""
        total = 0
        for file in {f.stored_sha256: f for f in manifest.files}.values():
            try:
                total += min(self.partial_path(file).stat().st_size, file.stored_size)
            except FileNotFoundError:
                continue
        return total

    # -- reading --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The models with an active release, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{_ACTIVE}"))

    def active(self, name: str) -> InstalledRelease | None:
        """The release ``name``'s pointer names, or None (none yet, or it is damaged)."""
        pointer = self._pointer(name)
        return None if pointer is None else self.installed(name, pointer.release)

    def previous(self, name: str) -> InstalledRelease | None:
        """The release active before the current one, kept for rollback."""
        pointer = self._pointer(name)
        if pointer is None or pointer.previous is None:
            return None
        return self.installed(name, pointer.previous)

    def installed(self, name: str, release: int) -> InstalledRelease | None:
        """Release ``release`` of ``name`` if it is installed whole (sizes checked, not hashes)."""
        directory = self._model_dir(name) / _RELEASES / str(release)
        try:
            record = _Record.model_validate_json((directory / _RECORD).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            logger.warning("release %s of %s is damaged (%s); ignoring it", release, name, exc)
            return None
        for file in record.signed.manifest.files:
            try:
                size = (directory / file.name).stat().st_size
            except OSError:
                size = -1
            if size != file.size:
                logger.warning(
                    "release %s of %s lacks a whole %s; ignoring it", release, name, file.name
                )
                return None
        return InstalledRelease(record.release_id, record.signed, directory)

    def floor(self, name: str) -> int:
        """The highest release of ``name`` accepted here (0 for none); lower ones are refused."""
        try:
            return _Floor.model_validate_json(
                (self._model_dir(name) / _FLOOR).read_bytes()
            ).accepted_release
        except FileNotFoundError:
            return 0
        except (OSError, ValidationError) as exc:
            # Failing closed would block every release of the model forever; the active
            # release is a floor no one can argue with.
            active = self.active(name)
            floor = active.release if active is not None else 0
            logger.warning("%s floor file is damaged (%s); using %d", name, exc, floor)
            return floor

    # -- writing --------------------------------------------------------------------------------

    def clean(self) -> None:
        """Delete staging directories and temporary pointer files a crash left behind."""
        if not self.root.is_dir():
            return
        for staging in self.root.glob(f"*/{_STAGING_PREFIX}*"):
            logger.info("removing an interrupted install: %s", staging)
            shutil.rmtree(staging, ignore_errors=True)
        for tmp in self.root.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)

    def install(self, release_id: str, signed: SignedManifest, key: str | None) -> InstalledRelease:
        """Install the downloaded files of ``signed`` as a release directory; the pointer stays.

        Encrypted files are unsealed with ``key`` (base64) streaming into staging and their
        plaintext sha256 checked; plain ones are hard-linked (copied where links are not
        supported). Raises :class:`InstallError`; the partial downloads are deleted once the
        release is in place.
        """
        manifest = signed.manifest
        existing = self.installed(manifest.name, manifest.release)
        if existing is not None and existing.signed == signed:
            return existing
        releases = self._model_dir(manifest.name) / _RELEASES
        final = releases / str(manifest.release)
        releases.mkdir(parents=True, exist_ok=True)
        staging = releases.parent / f"{_STAGING_PREFIX}{manifest.release}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            secret = _decode_key(manifest, key)
            for file in manifest.files:
                self._stage_file(file, staging / file.name, secret)
            record = _Record(release_id=release_id, signed=signed)
            write_synced(staging / _RECORD, record.model_dump_json(indent=2).encode())
            fsync_dir(staging)
            failpoints.hit(failpoints.Step.STAGED)
            if final.exists():
                # Same release number, other contents (or damaged): never both at once.
                shutil.rmtree(final)
            staging.rename(final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(releases)
        failpoints.hit(failpoints.Step.INSTALLED)
        for file in manifest.files:
            self.partial_path(file).unlink(missing_ok=True)
        logger.info("installed %s release %d in %s", manifest.name, manifest.release, final)
        return InstalledRelease(release_id, signed, final)

    def activate(self, name: str, release: int) -> None:
        """Point ``name`` at ``release`` (installed), keeping the current one as previous."""
        if self.installed(name, release) is None:
            raise InstallError(f"release {release} of {name} is not installed; cannot activate it")
        current = self._pointer(name)
        if current is not None and current.release == release:
            return
        pointer = _Pointer(release=release, previous=None if current is None else current.release)
        write_atomically(
            self._model_dir(name) / _ACTIVE,
            pointer.model_dump_json().encode() + b"\n",
            before_replace=lambda: failpoints.hit(failpoints.Step.POINTER_WRITTEN),
        )
        logger.info("%s active release is now %d (previous %s)", name, release, pointer.previous)

    def raise_floor(self, name: str, release: int) -> None:
        """Record ``release`` as accepted; never lowers the floor."""
        if release <= self.floor(name):
            return
        directory = self._model_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(
            directory / _FLOOR, _Floor(accepted_release=release).model_dump_json().encode() + b"\n"
        )

    def prune(self, name: str) -> list[int]:
        """Delete releases other than the active and the previous one; the releases deleted."""
        pointer = self._pointer(name)
        keep = set() if pointer is None else {pointer.release, pointer.previous}
        return self._delete_releases(name, keep)

    def discard(self, name: str, release: int) -> None:
        """Delete a release that failed, unless the pointer names it."""
        pointer = self._pointer(name)
        if pointer is not None and release in (pointer.release, pointer.previous):
            return
        self._delete_releases(name, keep={r for r in self._release_numbers(name) if r != release})

    def remove(self, name: str) -> None:
        """Forget ``name``'s releases and pointer (no longer desired); the floor stays."""
        directory = self._model_dir(name)
        (directory / _ACTIVE).unlink(missing_ok=True)
        if directory.is_dir():
            fsync_dir(directory)
        self._delete_releases(name, keep=set())

    # -- helpers --------------------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        return self.root / name

    def _pointer(self, name: str) -> _Pointer | None:
        path = self._model_dir(name) / _ACTIVE
        try:
            return _Pointer.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            # Cannot happen through our renames; a disk that corrupts files gets a log line.
            logger.error("%s is damaged (%s); %s has no active release", path, exc, name)
            return None

    def _release_numbers(self, name: str) -> set[int]:
        releases = self._model_dir(name) / _RELEASES
        if not releases.is_dir():
            return set()
        return {int(p.name) for p in releases.iterdir() if p.name.isdigit()}

    def _delete_releases(self, name: str, keep: set[int | None]) -> list[int]:
        deleted = sorted(r for r in self._release_numbers(name) if r not in keep)
        for release in deleted:
            shutil.rmtree(self._model_dir(name) / _RELEASES / str(release), ignore_errors=True)
        if deleted:
            logger.info("pruned releases %s of %s", deleted, name)
        return deleted

    def _stage_file(self, file: ManifestFile, target: Path, key: bytes | None) -> None:
        source = self.partial_path(file)
        if key is None:
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            failpoints.hit(failpoints.Step.STAGING)
            _fsync_file(target)
            return
        unsealer = Unsealer(key)
        hasher = hashlib.sha256()
        size = 0
        try:
            with source.open("rb") as sealed, target.open("xb") as plain:
                while block := sealed.read(_BLOCK_BYTES):
                    opened = unsealer.feed(block)
                    plain.write(opened)
                    hasher.update(opened)
                    size += len(opened)
                    failpoints.hit(failpoints.Step.STAGING)
                tail = unsealer.finish()
                plain.write(tail)
                hasher.update(tail)
                size += len(tail)
                plain.flush()
                os.fsync(plain.fileno())
        except SealError as exc:
            raise InstallError(f"{file.name} cannot be decrypted: {exc}") from exc
        except OSError as exc:
            raise InstallError(f"{file.name} cannot be written to {target}: {exc}") from exc
        if hasher.hexdigest() != file.sha256 or size != file.size:
            raise InstallError(
                f"{file.name} decrypted to {size} bytes hashing to {hasher.hexdigest()}, but the "
                f"signed manifest says {file.size} bytes hashing to {file.sha256}"
            )


def _decode_key(manifest: ModelManifest, key: str | None) -> bytes | None:
    if manifest.encryption is Encryption.NONE:
        return None
    if key is None:
        raise InstallError(
            f"{manifest.name} {manifest.version} is encrypted but its desired state carries no "
            "key; the service sends it only to targeted devices"
        )
    try:
        return base64.b64decode(key, validate=True)
    except ValueError as exc:
        raise InstallError(f"the key of {manifest.name} {manifest.version} is not base64") from exc


def _hash_file(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while block := file.read(_BLOCK_BYTES):
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as file:
        os.fsync(file.fileno())
