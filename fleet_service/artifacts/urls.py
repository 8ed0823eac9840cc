"""Short-lived HMAC-signed artifact URLs of the filesystem store, bound to one device and one blob.

A URL reads ``{service}/api/v1/artifacts/{sha256}?device=D&expires=E&sig=S`` where ``S`` is the
HMAC-SHA256 (base64url, unpadded) of the device id, the blob's sha256 and the expiry under a
secret kept in the fleet home (0600). Every replica reads the same file, so any of them can
verify a URL another one issued. The URL is a capability: it works for anyone holding it until
it expires; a caller that also sends a device token must be the device it was issued to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from fleet_service.artifacts.errors import SigningKeyError, UrlRefusedError
from fleet_service.files import create_once
from fleet_service.home import FleetHome

__all__ = ["URL_SECRET_FILE", "SignedUrl", "UrlSigner"]

URL_SECRET_FILE = "artifact-url.secret"  # noqa: S105  (a file name, not a secret)
_SECRET_BYTES = 32
_CONTEXT = b"edgefleet-artifact-url-v1"


@dataclass(frozen=True)
class SignedUrl:
    """A short-lived URL a device fetches one blob from."""

    url: str
    expires_at: datetime


class UrlSigner:
    """Issues and verifies artifact URLs; ``ttl_s`` is the ``artifact_url_ttl_s`` setting."""

    def __init__(self, secret: bytes, *, ttl_s: int, base_url: str) -> None:
        if len(secret) < _SECRET_BYTES:
            raise SigningKeyError(f"the artifact URL secret must be {_SECRET_BYTES} bytes or more")
        self._secret = secret
        self.ttl_s = ttl_s
        self.base_url = base_url.rstrip("/")

    @classmethod
    def load(cls, home: FleetHome, *, ttl_s: int, base_url: str) -> UrlSigner:
        """The signer of this fleet home; the secret is created (0600) on first use."""
        path = home.root / URL_SECRET_FILE
        if not path.exists():
            create_once(path, secrets.token_bytes(_SECRET_BYTES), 0o600)
        return cls(_read_private(path), ttl_s=ttl_s, base_url=base_url)

    def _signature(self, sha256: str, device_id: str, expires: int) -> str:
        message = b"\n".join((_CONTEXT, device_id.encode(), sha256.encode(), str(expires).encode()))
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, sha256: str, device_id: str, *, now: datetime | None = None) -> SignedUrl:
        """A URL for ``device_id`` to fetch blob ``sha256``, valid for ``ttl_s`` from ``now``."""
        issued = now or datetime.now(UTC)
        expires = int((issued + timedelta(seconds=self.ttl_s)).timestamp())
        query = urlencode(
            {
                "device": device_id,
                "expires": expires,
                "sig": self._signature(sha256, device_id, expires),
            }
        )
        return SignedUrl(
            url=f"{self.base_url}/api/v1/artifacts/{sha256}?{query}",
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    def verify(
        self,
        sha256: str,
        *,
        device_id: str,
        expires: int,
        sig: str,
        now: datetime | None = None,
    ) -> None:
        """Return if the URL is genuine and unexpired; else UrlRefusedError saying which."""
        expected = self._signature(sha256, device_id, expires)
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise UrlRefusedError(
                "signature",
                "the artifact URL's signature does not match (it was altered, or issued by "
                "another fleet); ask the service for fresh URLs: "
                "GET /api/v1/agent/releases/{release_id}/urls",
            )
        if (now or datetime.now(UTC)).timestamp() >= expires:
            at = datetime.fromtimestamp(expires, UTC).isoformat()
            raise UrlRefusedError(
                "expired",
                f"the artifact URL expired at {at}; ask the service for fresh URLs: "
                "GET /api/v1/agent/releases/{release_id}/urls (a download resumes with Range)",
            )


def _read_private(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        raise SigningKeyError(f"{path} is readable by other users; run `chmod 600 {path}`")
    return path.read_bytes()
