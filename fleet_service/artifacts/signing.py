"""The fleet's Ed25519 release-signing keys: one active private key, every public key trusted.

Layout under the fleet home::

    signing/active.key          the private key that signs new manifests (PKCS#8 PEM, 0600)
    signing/trusted/<id>.pub    every public key that ever signed (SubjectPublicKeyInfo PEM)

Rotation writes a new key, trusts its public half and replaces ``active.key`` atomically; the
retired private key is gone, its public key stays trusted so manifests it signed still verify.
Keys are read from disk on every use, so a rotation by the CLI reaches a running service and
every replica sharing the home at once. ``edgefleet init`` writes the fleet's first key as
``<home>/signing.key``; the first open moves it here (homes older than rotation, likewise).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleet_protocol.manifest import ModelManifest, SignedManifest, key_id_of, sign_manifest
from fleet_service.artifacts.errors import SigningKeyError
from fleet_service.files import fsync_dir, replace_atomically
from fleet_service.home import FleetHome
from fleet_service.pki import generate_signing_key

__all__ = ["ReleaseSigner", "SigningKeyInfo"]

_PRIVATE = 0o600
_PUBLIC = 0o644


@dataclass(frozen=True)
class SigningKeyInfo:
    """One trusted key as listed."""

    key_id: str
    public_key: Ed25519PublicKey
    active: bool
    created_at: datetime


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class ReleaseSigner:
    """Signs model manifests with the fleet's active key; knows every trusted public key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def active_path(self) -> Path:
        return self.directory / "active.key"

    @property
    def trusted_dir(self) -> Path:
        return self.directory / "trusted"

    @classmethod
    def open(cls, home: FleetHome) -> ReleaseSigner:
        """The signer of ``home``, creating its key directory on first use (see module doc)."""
        signer = cls(home.root / "signing")
        if not signer.active_path.exists():
            signer._adopt_or_create(home)
        return signer

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # One writer at a time across processes: the service, its replicas and the CLI.
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self.trusted_dir.mkdir(exist_ok=True)
        with (self.directory / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _adopt_or_create(self, home: FleetHome) -> None:
        with self._locked():
            if self.active_path.exists():
                return  # another process got here first
            legacy = home.signing_key
            if legacy.exists():
                key = self._load_private(legacy)
                self._trust(key.public_key())
                legacy.replace(self.active_path)  # one copy of the private key, never two
                fsync_dir(self.directory)
                home.signing_pub.unlink(missing_ok=True)
                return
            key = generate_signing_key()
            self._trust(key.public_key())
            replace_atomically(self.active_path, _private_pem(key), _PRIVATE)

    def _trust(self, public: Ed25519PublicKey) -> str:
        key_id = key_id_of(public)
        path = self.trusted_dir / f"{key_id}.pub"
        if not path.exists():
            replace_atomically(path, _public_pem(public), _PUBLIC)
        return key_id

    @staticmethod
    def _load_private(path: Path) -> Ed25519PrivateKey:
        if path.stat().st_mode & 0o077:
            raise SigningKeyError(f"{path} is readable by other users; run `chmod 600 {path}`")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return key

    def _active_key(self) -> Ed25519PrivateKey:
        try:
            return self._load_private(self.active_path)
        except FileNotFoundError as exc:
            raise SigningKeyError(
                f"no active signing key at {self.active_path}; run `edgefleet signing rotate`"
            ) from exc

    def active_key_id(self) -> str:
        """The id of the key that signs new manifests."""
        return key_id_of(self._active_key().public_key())

    def trusted(self) -> dict[str, Ed25519PublicKey]:
        """Every trusted public key by key id (the active one included)."""
        keys: dict[str, Ed25519PublicKey] = {}
        for path in sorted(self.trusted_dir.glob("*.pub")):
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except ValueError as exc:
                raise SigningKeyError(f"{path} is not a PEM public key: {exc}") from exc
            if not isinstance(key, Ed25519PublicKey) or key_id_of(key) != path.stem:
                raise SigningKeyError(
                    f"{path} does not hold the Ed25519 key its name says; remove the file"
                )
            keys[path.stem] = key
        return keys

    def list_keys(self) -> list[SigningKeyInfo]:
        """Trusted keys, oldest first, with the active one marked."""
        active = self.active_key_id()
        infos = [
            SigningKeyInfo(
                key_id=key_id,
                public_key=key,
                active=key_id == active,
                created_at=datetime.fromtimestamp(
                    (self.trusted_dir / f"{key_id}.pub").stat().st_mtime, UTC
                ),
            )
            for key_id, key in self.trusted().items()
        ]
        return sorted(infos, key=lambda info: (info.created_at, info.key_id))

    def sign(self, manifest: ModelManifest) -> SignedManifest:
        """Sign ``manifest`` with the active key."""
        key = self._active_key()
        if key_id_of(key.public_key()) not in self.trusted():
            self._trust(key.public_key())  # an active key is always trusted
        return sign_manifest(manifest, key)

    def rotate(self) -> str:
        """Make a new key active (the old public key stays trusted); returns its id."""
        with self._locked():
            key = generate_signing_key()
            key_id = self._trust(key.public_key())
            replace_atomically(self.active_path, _private_pem(key), _PRIVATE)
        return key_id
