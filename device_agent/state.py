"""The state directory: where an enrolled device keeps its key, certificates, token and identity.

Layout (the directory is created 0700)::

    device.key     0600  EC P-256 private key, generated here and never sent anywhere
    device.crt     0644  the device certificate issued by the fleet CA (CN = device id)
    ca.crt         0644  the fleet CA, pinned at enrollment by the join token's fingerprint
    device_token   0600  bearer token for the agent's HTTPS calls to the service
    device.json    0644  the identity: device id, service URL, broker address, topic prefix, tags
    renewal.key    0600  while a certificate renewal is pending: the new key its CSR is for

``device.json`` is written last, so its presence is what "enrolled" means: a crash half-way through
an enrollment leaves a directory that is simply not enrolled yet.

A renewal replaces ``device.key`` and ``device.crt`` together (:meth:`StateDir.install_renewal`):
both new files are put next to the old ones as ``*.new`` first, then renamed over them; whoever
loads the directory next finishes or undoes an interrupted swap, so the key and the certificate
always belong together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

from cryptography import x509
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from device_agent.durable import fsync_dir
from device_agent.errors import AlreadyEnrolledError, CorruptStateError, NotEnrolledError
from fleet_protocol import InvalidTopicError, validate_device_id

__all__ = ["DeviceIdentity", "StateDir"]

logger = logging.getLogger(__name__)

_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700
# POSIX permission checks make no sense on Windows, where os.chmod only toggles read-only.
_POSIX = os.name == "posix"


class DeviceIdentity(BaseModel):
    """Who this device is and where it connects; the contents of ``device.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str
    service_url: str
    mqtt_host: Annotated[str, Field(min_length=1, max_length=253)]
    mqtt_port: Annotated[int, Field(ge=1, le=65_535)]
    topic_prefix: Annotated[str, Field(min_length=1)]
    tags: dict[str, str] = Field(default_factory=dict)
    enrolled_at: AwareDatetime

    @field_validator("device_id")
    @classmethod
    def _valid_device_id(cls, value: str) -> str:
        try:
            return validate_device_id(value)
        except InvalidTopicError as exc:
            # Re-raised as ValueError so pydantic reports it as a normal validation error.
            raise ValueError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class StateDir:
    """The files of one state directory; methods read and write them with the right modes."""

    root: Path

    @property
    def key_path(self) -> Path:
        """The device's private key (0600)."""
        return self.root / "device.key"

    @property
    def cert_path(self) -> Path:
        """The device certificate."""
        return self.root / "device.crt"

    @property
    def ca_path(self) -> Path:
        """The pinned fleet CA certificate."""
        return self.root / "ca.crt"

    @property
    def token_path(self) -> Path:
        """The device API token (0600)."""
        return self.root / "device_token"

    @property
    def pending_key_path(self) -> Path:
        """The key of a pending certificate renewal (0600), kept until its certificate comes."""
        return self.root / "renewal.key"

    @property
    def identity_path(self) -> Path:
        """``device.json``; its presence means the directory is enrolled."""
        return self.root / "device.json"

    def is_enrolled(self) -> bool:
        """Whether an identity has been written here."""
        return self.identity_path.is_file()

    def check_can_enroll(self, *, force: bool) -> None:
        """Raise :class:`AlreadyEnrolledError` unless enrolling here loses nothing or is forced."""
        if self.is_enrolled() and not force:
            raise AlreadyEnrolledError(
                f"{self.root} already holds an enrolled device identity; enrolling again would "
                "replace its key and id. Pass --force to do that, or use another --state-dir"
            )

    def load_identity(self) -> DeviceIdentity:
        """Read ``device.json`` after checking every state file is present and private."""
        if not self.is_enrolled():
            raise NotEnrolledError(
                f"{self.root} holds no enrolled device identity; run "
                f"`edgefleet-agent enroll TOKEN --state-dir {self.root}` first"
            )
        self.finish_renewal()
        for path in (self.key_path, self.cert_path, self.ca_path, self.token_path):
            if not path.is_file():
                raise CorruptStateError(
                    f"{path} is missing from an enrolled state directory; restore it from a "
                    f"backup or enroll again with `edgefleet-agent enroll TOKEN --state-dir "
                    f"{self.root} --force`"
                )
        for path in (self.key_path, self.token_path):
            _check_private(path)
        try:
            return DeviceIdentity.model_validate_json(self.identity_path.read_bytes())
        except ValidationError as exc:
            raise CorruptStateError(
                f"{self.identity_path} is damaged ({exc.error_count()} invalid fields, first: "
                f"{exc.errors()[0]['msg']}); enroll again with --force"
            ) from exc

    def certificate_expiry(self) -> datetime:
        """When the device certificate stops being accepted by the broker (UTC)."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CorruptStateError(
                f"cannot read the device certificate {self.cert_path} ({exc}); enroll again "
                f"with `edgefleet-agent enroll TOKEN --state-dir {self.root} --force`"
            ) from exc
        return cert.not_valid_after_utc

    def install_renewal(self, cert_pem: bytes) -> None:
        """Make the pending key (``renewal.key``) and ``cert_pem`` the device's key and cert.

        The caller has checked that the certificate is for that key. Journaled: the key moves to
        ``device.key.new`` and the cert is written as ``device.crt.new``; once both exist they
        are renamed over the old pair. A crash anywhere is finished or undone by
        :meth:`finish_renewal`, which :meth:`load_identity` runs.
        """
        key_new, cert_new = _renewal_files(self)
        staged = _stage(self.cert_path, cert_pem, _PUBLIC_MODE)
        try:
            self.pending_key_path.replace(key_new)
            staged.replace(cert_new)  # both .new files exist: the swap is decided
        except BaseException:
            staged.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.finish_renewal()  # puts the key back for the next try
            raise
        fsync_dir(self.root)
        self.finish_renewal()

    def finish_renewal(self) -> None:
        """Complete a key and certificate swap that a crash interrupted, or undo its first step.

        Safe to call at any time; does nothing when no swap is under way.
        """
        key_new, cert_new = _renewal_files(self)
        if key_new.exists() and not cert_new.exists():
            # Stopped before the certificate was staged: the old pair stays, the key waits.
            key_new.replace(self.pending_key_path)
            fsync_dir(self.root)
            logger.warning("undid an interrupted certificate renewal in %s", self.root)
            return
        if not cert_new.exists():
            return
        if key_new.exists():
            key_new.replace(self.key_path)
        cert_new.replace(self.cert_path)
        fsync_dir(self.root)

    def read_token(self) -> str:
        """The device API token for ``Authorization: Bearer``."""
        _check_private(self.token_path)
        return self.token_path.read_text().strip()

    def write_enrollment(
        self,
        identity: DeviceIdentity,
        *,
        key_pem: bytes,
        cert_pem: bytes,
        ca_pem: bytes,
        device_token: str,
    ) -> None:
        """Write a fresh identity: every file atomically, ``device.json`` last."""
        self._ensure_root()
        files = [
            (self.key_path, key_pem, _SECRET_MODE),
            (self.cert_path, cert_pem, _PUBLIC_MODE),
            (self.ca_path, ca_pem, _PUBLIC_MODE),
            (self.token_path, device_token.encode() + b"\n", _SECRET_MODE),
        ]
        staged: list[tuple[Path, Path]] = []
        try:
            for path, data, mode in files:
                staged.append((_stage(path, data, mode), path))
            # Un-enroll first so that a crash while swapping files cannot leave the old
            # device.json describing a new key: the directory reads as "not enrolled" instead.
            self.identity_path.unlink(missing_ok=True)
            for tmp, path in staged:
                tmp.replace(path)
            staged.clear()
            identity_json = identity.model_dump_json(indent=2).encode() + b"\n"
            _stage(self.identity_path, identity_json, _PUBLIC_MODE).replace(self.identity_path)
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        # A renewal pending for the identity this one replaces would mix up the new key pair.
        for path in (self.pending_key_path, *_renewal_files(self)):
            path.unlink(missing_ok=True)
        fsync_dir(self.root)
        logger.info("wrote device identity to %s device_id=%s", self.root, identity.device_id)

    def _ensure_root(self) -> None:
        if self.root.is_dir():
            return
        self.root.mkdir(parents=True, mode=_DIR_MODE)
        if _POSIX:
            # mkdir's mode is filtered by the umask; say exactly what we mean.
            self.root.chmod(_DIR_MODE)


def _renewal_files(state: StateDir) -> tuple[Path, Path]:
    """The staged key and certificate of a swap under way (:meth:`StateDir.install_renewal`)."""
    return state.root / "device.key.new", state.root / "device.crt.new"


def _check_private(path: Path) -> None:
    if _POSIX and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CorruptStateError(
            f"{path} is accessible to other users; it holds a secret. "
            f"Run `chmod 600 {path}` (and consider the key compromised if others could read it)"
        )


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a temporary sibling of ``path`` created with ``mode``; return it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Created with its final mode, so a secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            if _POSIX:
                os.fchmod(file.fileno(), mode)  # the umask may have removed bits we want
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
