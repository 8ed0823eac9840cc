"""The enrollment contract: the join token an operator hands out and the HTTPS payloads.

A join token carries the service URL, the registration key and the sha256 fingerprint of the
fleet CA (like ``kubeadm join --discovery-token-ca-cert-hash``), so the agent's first contact with
the service is pinned rather than trust-on-first-use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

__all__ = [
    "JOIN_TOKEN_PREFIX",
    "EnrollRequest",
    "EnrollResponse",
    "InvalidJoinTokenError",
    "JoinToken",
    "ca_fingerprint",
]

JOIN_TOKEN_PREFIX = "efjoin1."  # noqa: S105  (a format marker, not a secret)

Fingerprint = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


class InvalidJoinTokenError(ValueError):
    """A join token is not one that ``edgefleet keys create`` prints."""


def ca_fingerprint(ca_der: bytes) -> str:
    """``sha256:<hex>`` of a CA certificate's DER bytes, as carried in join tokens."""
    return "sha256:" + hashlib.sha256(ca_der).hexdigest()


class JoinToken(BaseModel):
    """What an agent needs to enroll: where, with which key, and which CA to expect."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: HttpUrl
    key: Annotated[str, Field(min_length=16, max_length=128)]
    ca: Fingerprint

    def encode(self) -> str:
        """The single copy-pasteable string an operator hands to a device."""
        raw = json.dumps(self.model_dump(mode="json"), separators=(",", ":")).encode()
        return JOIN_TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> JoinToken:
        """Parse a token from :meth:`encode`; raise :class:`InvalidJoinTokenError`."""
        token = token.strip()
        if not token.startswith(JOIN_TOKEN_PREFIX):
            raise InvalidJoinTokenError(
                f"a join token starts with {JOIN_TOKEN_PREFIX!r}; "
                "copy the whole line printed by `edgefleet keys create`"
            )
        body = token[len(JOIN_TOKEN_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return cls.model_validate_json(raw)
        except (binascii.Error, ValueError, ValidationError) as exc:
            raise InvalidJoinTokenError(
                "the join token is damaged (truncated or edited); create a new one"
            ) from exc


class EnrollRequest(BaseModel):
    """``POST /api/v1/enroll`` body: the registration key and a CSR made on the device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registration_key: Annotated[str, Field(min_length=1, max_length=128)]
    csr_pem: Annotated[str, Field(min_length=1, max_length=16_384)]
    hostname: Annotated[str, Field(max_length=253)] = ""


class EnrollResponse(BaseModel):
    """What the service returns to a freshly enrolled device."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    certificate_pem: str
    ca_certificate_pem: str
    device_token: str
    mqtt_host: str
    mqtt_port: int
    topic_prefix: str
    tags: dict[str, str]
