"""Device enrollment: spend a registration key, sign the device's CSR, register the device.

A key that a revoked certificate held is refused, so a revoked device cannot come back under a
new id with its old identity; every certificate issued is recorded (the CRL's source).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import Session

from fleet_protocol import EnrollRequest, EnrollResponse
from fleet_service.authority import CertificateAuthority
from fleet_service.errors import ForbiddenError, ServiceError
from fleet_service.keys import consume_key, hash_secret
from fleet_service.pki import CsrRejectedError, public_key_fingerprint, sign_device_csr
from fleet_service.revocation import record_issued, revoked_key_owner
from fleet_service.tables import Device

__all__ = ["EnrollmentTarget", "InvalidCsrError", "RevokedKeyError", "enroll_device"]


class InvalidCsrError(ServiceError):
    """The CSR is malformed, weak, or tries to choose its own identity."""

    status = 422
    title = "certificate signing request refused"


class RevokedKeyError(ForbiddenError):
    """The CSR's key belonged to a revoked identity."""

    title = "revoked identity"


@dataclass(frozen=True)
class EnrollmentTarget:
    """Where enrolled devices are told to connect."""

    mqtt_host: str
    mqtt_port: int
    topic_prefix: str
    cert_ttl_s: int = 30 * 86_400  # ServiceSettings.device_cert_ttl_s


def enroll_device(
    session: Session,
    request: EnrollRequest,
    authority: CertificateAuthority,
    target: EnrollmentTarget,
) -> EnrollResponse:
    """Enroll one device; any error leaves the key's use count and the registry unchanged.

    Everything happens in the caller's transaction, so a refused CSR rolls back the key use.
    """
    key = consume_key(session, request.registration_key)
    device_id = "dev-" + secrets.token_hex(6)
    try:
        cert = sign_device_csr(
            authority.key,
            authority.cert,
            request.csr_pem.encode(),
            device_id,
            valid_days=timedelta(seconds=target.cert_ttl_s),
        )
    except CsrRejectedError as exc:
        raise InvalidCsrError(str(exc)) from exc
    owner = revoked_key_owner(session, public_key_fingerprint(cert.public_key()))
    if owner is not None:
        # The whole transaction rolls back: the registration key keeps this use.
        raise RevokedKeyError(
            f"this CSR's key belonged to {owner}, which was revoked; a revoked identity cannot "
            "enroll again. Make a new key on the device (`edgefleet-agent enroll TOKEN --force` "
            "does) if the owner meant it to rejoin as a new device"
        )
    record_issued(session, cert, kind="device")
    device_token = "efd_" + secrets.token_urlsafe(32)
    session.add(
        Device(
            id=device_id,
            hostname=request.hostname,
            tags=dict(key.tags),
            enrolled_at=datetime.now(UTC),
            registration_key_id=key.id,
            token_hash=hash_secret(device_token),
            cert_serial=format(cert.serial_number, "x"),
            cert_not_after=cert.not_valid_after_utc,
        )
    )
    return EnrollResponse(
        device_id=device_id,
        certificate_pem=cert.public_bytes(Encoding.PEM).decode(),
        ca_certificate_pem=authority.pem,
        device_token=device_token,
        mqtt_host=target.mqtt_host,
        mqtt_port=target.mqtt_port,
        topic_prefix=target.topic_prefix,
        tags=dict(key.tags),
    )
