"""The fleet home directory: where ``edgefleet init`` puts keys, certificates and the database."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_service.config import SERVICE_IDENTITY
from fleet_service.errors import ServiceError

__all__ = ["SERVICE_IDENTITY", "FleetHome", "HomeNotInitialisedError", "UnsafeHomeError"]


class HomeNotInitialisedError(ServiceError):
    """The home directory has no fleet in it."""

    status = 500
    title = "fleet home not initialised"


class UnsafeHomeError(ServiceError):
    """A private key in the home can be read by other users."""

    status = 500
    title = "unsafe fleet home"


@dataclass(frozen=True)
class FleetHome:
    """Paths inside one fleet home; the files are written by :mod:`fleet_service.bootstrap`."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def service_cert(self) -> Path:
        return self.root / "service.crt"

    @property
    def service_key(self) -> Path:
        return self.root / "service.key"

    def service_files(self, identity: str) -> tuple[Path, Path]:
        """(certificate, key) of a service MQTT identity: the primary or a replica's."""
        if identity == SERVICE_IDENTITY:
            return self.service_cert, self.service_key
        return self.root / f"{identity}.crt", self.root / f"{identity}.key"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing.pub"

    @property
    def jwt_secret(self) -> Path:
        return self.root / "jwt.secret"

    @property
    def saved_settings(self) -> Path:
        """Settings chosen at ``edgefleet init`` (e.g. the advertised host), as JSON."""
        return self.root / "settings.json"

    def read_saved_settings(self) -> dict[str, Any]:
        """What ``edgefleet init`` recorded; empty when nothing was."""
        if not self.saved_settings.exists():
            return {}
        saved: dict[str, Any] = json.loads(self.saved_settings.read_text())
        return saved

    def save_settings(self, **values: Any) -> None:
        """Merge ``values`` into what later commands read (see :meth:`read_saved_settings`)."""
        saved = {**self.read_saved_settings(), **values}
        self.saved_settings.write_text(json.dumps(saved, indent=2) + "\n")

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def demo_dir(self) -> Path:
        return self.root / "demo"

    def is_initialised(self) -> bool:
        """Whether ``edgefleet init`` has run here."""
        return self.ca_cert.exists()

    def require_initialised(self) -> None:
        """Raise a clear error when there is no fleet in this home."""
        if not self.is_initialised():
            raise HomeNotInitialisedError(
                f"no fleet in {self.root}: run `edgefleet init --home {self.root}` first"
            )

    @property
    def secret_files(self) -> tuple[Path, ...]:
        """Files that must stay readable by their owner only."""
        return (
            self.ca_key,
            self.server_key,
            self.service_key,
            self.signing_key,
            # Kept in step with fleet_service/artifacts (signing.py, urls.py), which own them.
            self.root / "signing" / "active.key",
            self.root / "artifact-url.secret",
            self.jwt_secret,
        )

    def require_private_secrets(self) -> None:
        """Refuse to run with a key that others can read (a copy or an untar can widen modes)."""
        candidates = [*self.secret_files, *self.root.glob(f"{SERVICE_IDENTITY}-*.key")]
        exposed = [p for p in candidates if p.exists() and p.stat().st_mode & 0o077]
        if exposed:
            names = " ".join(str(p) for p in exposed)
            raise UnsafeHomeError(
                f"private keys readable by other users: {names}; run `chmod 600 {names}`"
            )

    def read_jwt_secret(self) -> bytes:
        """The HMAC key that signs operator tokens."""
        return self.jwt_secret.read_bytes()
