"""Revoking identities: record every client certificate, revoke a device or its certificates,
and drop a live MQTT session at the broker.

The database is the source of truth: a revocation here only marks rows (in the caller's
transaction, with its audit event). The primary's broker policy loop
(:mod:`fleet_service.broker_policy`) then writes the CRL, makes mosquitto reload it, drops the
identity's session with :func:`drop_session` and, for a decommissioned device, clears its
retained topics, whichever process (replica, CLI) took the request.

Errors::

    ServiceError
     ├── NotFoundError           404  no such device (or outside the caller's tag)
     └── ConflictError           409  the device is already revoked
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlmodel import Session, col, select

from fleet_service import audit
from fleet_service.authority import CertificateAuthority
from fleet_service.errors import ConflictError
from fleet_service.pki import issue_client_cert, public_key_fingerprint
from fleet_service.registry import visible_device
from fleet_service.roles import Principal
from fleet_service.tables import Device, IssuedCertificate

__all__ = [
    "SESSION_DROP_CERT_LIFETIME",
    "BrokerTarget",
    "CertificateKind",
    "drop_session",
    "issue_session_drop_cert",
    "record_issued",
    "revoke_certificates",
    "revoke_device",
    "revoked_key_owner",
]

logger = logging.getLogger(__name__)

CertificateKind = str  # "device", "integration", "session-drop"

# The single-use certificate that ends a revoked identity's session lives this long: enough
# for one TLS handshake and CONNECT on a slow host, and it is on the CRL from the next write.
SESSION_DROP_CERT_LIFETIME = timedelta(minutes=5)

# What the reason column says about those single-use certificates.
_SESSION_DROP_REASON = "single use: ended the MQTT session of a revoked identity"


def record_issued(
    session: Session,
    cert: x509.Certificate,
    *,
    kind: CertificateKind,
    revoked_at: datetime | None = None,
    reason: str | None = None,
) -> IssuedCertificate:
    """Add ``cert`` to ``issued_certificate`` (the CRL's source) in the caller's transaction.

    Every client certificate the fleet CA signs goes through here: enrollment, integrations,
    the single-use certificates of :func:`drop_session` (and renewal should too).
    """
    common_names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    identity = str(common_names[0].value) if common_names else ""
    row = IssuedCertificate(
        serial=format(cert.serial_number, "x"),
        identity=identity,
        kind=kind,
        issued_at=datetime.now(UTC),
        not_after=cert.not_valid_after_utc,
        revoked_at=revoked_at,
        reason=reason,
        public_key_sha256=public_key_fingerprint(cert.public_key()),
    )
    session.add(row)
    return row


def revoke_certificates(
    session: Session, identity: str, *, reason: str, now: datetime | None = None
) -> list[str]:
    """Revoke every unexpired, unrevoked certificate of ``identity``; their serials (hex)."""
    now = now or datetime.now(UTC)
    rows = session.exec(
        select(IssuedCertificate).where(
            col(IssuedCertificate.identity) == identity,
            col(IssuedCertificate.revoked_at).is_(None),
            col(IssuedCertificate.not_after) > now,
        )
    ).all()
    for row in rows:
        row.revoked_at = now
        row.reason = reason
        session.add(row)
    return [row.serial for row in rows]


def revoke_device(
    session: Session,
    device_id: str,
    who: Principal,
    *,
    reason: str | None = None,
    decommission: bool = False,
) -> Device:
    """Mark ``device_id`` revoked (and decommissioned) with its certificates; audit it.

    Its history (telemetry, results, logs, audit) stays. Revoking twice is a
    :class:`ConflictError`; decommissioning a revoked device is allowed (it clears its retained
    topics) and decommissioning twice is a no-op answered with the device. A tag-scoped caller
    gets 404 for a device outside its tag.
    """
    device = visible_device(session, device_id, who)
    now = datetime.now(UTC)
    if device.revoked_at is not None and not decommission:
        raise ConflictError(
            f"device {device_id} was already revoked at {device.revoked_at.isoformat()} by "
            f"{device.revoked_by}; to also clear its retained topics, decommission it "
            f"(DELETE /api/v1/devices/{device_id} or `edgefleet devices decommission`)"
        )
    if device.decommissioned_at is not None:
        return device
    action = "device.decommission" if decommission else "device.revoke"
    text = reason or ("decommissioned" if decommission else "revoked")
    serials = []
    if device.revoked_at is None:
        serials = revoke_certificates(session, device_id, reason=text, now=now)
        known = session.get(IssuedCertificate, device.cert_serial)
        if known is None:
            # A certificate issued before the service recorded them all: put it on the CRL too.
            session.add(
                IssuedCertificate(
                    serial=device.cert_serial,
                    identity=device_id,
                    kind="device",
                    issued_at=device.enrolled_at,
                    not_after=device.cert_not_after,
                    revoked_at=now,
                    reason=text,
                )
            )
            serials.append(device.cert_serial)
        device.revoked_at = now
        device.revoked_by = who.name
    if decommission:
        device.decommissioned_at = now
    session.add(device)
    audit.record(
        session, who, action, device_id, detail={"reason": reason, "serials": sorted(serials)}
    )
    logger.info("%s device %s by %s (%d certificates)", action, device_id, who.name, len(serials))
    return device


def revoked_key_owner(session: Session, public_key_sha256: str) -> str | None:
    """The identity whose revoked certificate held this public key, if any."""
    row = session.exec(
        select(IssuedCertificate).where(
            col(IssuedCertificate.public_key_sha256) == public_key_sha256,
            col(IssuedCertificate.revoked_at).is_not(None),
        )
    ).first()
    return row.identity if row is not None else None


@dataclass(frozen=True)
class BrokerTarget:
    """Where the service reaches its broker, and the CA that verifies the broker."""

    host: str
    port: int
    ca_file: Path


@contextlib.contextmanager
def _cert_chain_file(pem: bytes) -> Iterator[str]:
    """A path to ``pem`` for ``ssl.load_cert_chain``, which only reads files.

    On Linux an anonymous memory file: the key never touches a disk. Elsewhere a 0600 file in a
    private temporary directory, removed as soon as it is loaded.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("edgefleet-session-drop", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-") as directory:
        path = Path(directory) / "identity.pem"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        yield str(path)


def _single_use_context(
    target: BrokerTarget, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(target.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with _cert_chain_file(pem) as path:
        context.load_cert_chain(path)
    return context


def issue_session_drop_cert(
    session: Session, authority: CertificateAuthority, identity: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for ``identity`` that lives minutes, recorded as revoked from the start.

    Recorded revoked so the next CRL lists it: its key never leaves this process's memory, and
    it is never needed twice.
    """
    key, cert = issue_client_cert(
        authority.key, authority.cert, identity, SESSION_DROP_CERT_LIFETIME
    )
    record_issued(
        session,
        cert,
        kind="session-drop",
        revoked_at=datetime.now(UTC),
        reason=_SESSION_DROP_REASON,
    )
    return key, cert


async def drop_session(
    target: BrokerTarget,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    *,
    timeout_s: float,
) -> None:
    """End the live connection and the stored session of the certificate's identity.

    Mosquitto has no admin command to disconnect a client without a plugin. What it does have
    (with use_identity_as_username and use_username_as_clientid) is "one client id, one
    connection": a new CONNECT with the same client id takes over the old connection, which
    gets DISCONNECT 0x8E (session taken over), and so does its Last Will. Connecting with a
    fresh certificate for the same CN, clean start and session expiry 0, then disconnecting,
    leaves nothing behind: not the connection, not the persistent session with its queued
    messages. Restarting the broker would also cut the connection, but it cuts every device's
    and keeps the persistent session. Call it only after the broker has reloaded a CRL that
    refuses the identity's own certificates, or the client just reconnects.

    Raises ``aiomqtt.MqttError`` when the broker cannot be reached or refuses.
    """
    context = await asyncio.to_thread(_single_use_context, target, key, cert)
    identity = str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    async with aiomqtt.Client(
        target.host,
        target.port,
        identifier=identity,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        properties=properties,
        tls_context=context,
        timeout=timeout_s,
    ):
        pass
    logger.info("dropped the MQTT session of %s", identity)
