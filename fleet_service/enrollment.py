"""Device enrollment: spend a registration key, sign the device's CSR, register the device."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import Session

from fleet_protocol import EnrollRequest, EnrollResponse
from fleet_service.authority import CertificateAuthority
from fleet_service.errors import ServiceError
from fleet_service.keys import consume_key, hash_secret
from fleet_service.pki import CsrRejectedError, sign_device_csr
from fleet_service.tables import Device

__all__ = ["EnrollmentTarget", "InvalidCsrError", "enroll_device"]


class InvalidCsrError(ServiceError):
    """The CSR is malformed, weak, or tries to choose its own identity."""

    status = 422
    title = "certificate signing request refused"


@dataclass(frozen=True)
class EnrollmentTarget:
    """Where enrolled devices are told to connect."""

    mqtt_host: str
    mqtt_port: int
    topic_prefix: str
    cert_valid_days: int = 365


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
            valid_days=target.cert_valid_days,
        )
    except CsrRejectedError as exc:
        raise InvalidCsrError(str(exc)) from exc
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
