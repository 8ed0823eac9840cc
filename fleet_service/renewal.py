"""Device certificate renewal over MQTT: a CSR on ``devices/{id}/csr``, answered on ``certificate``.

The broker's ACL lets a device publish only on its own ``csr`` topic, and only a device holding a
certificate for that id can connect as it, so the topic says who is asking. The service then
checks that the request names the same device, that the device is enrolled and not revoked and
was not renewed a moment ago, that the CSR passes the enrollment checks
(:func:`fleet_service.pki.sign_device_csr`) and that its key is new: neither one this device
held before nor one of a revoked identity. It signs for ``device_cert_ttl_s``, records the
certificate (``issued_certificate``, ``device.cert_serial``/``cert_not_after``) and an audit
event in one transaction, and publishes the certificate to the device (QoS 1, into its
persistent session, not retained). A refusal is answered too, with the reason, so the device
backs off and says why in its log.

Errors::

    ValueError
     └── RenewalRefusedError   a CSR that is not signed; ``reason`` is a short label for logs

The ``cert-renewal`` loop (:meth:`CertificateRenewer.run`) runs next to the ingest loops in
:class:`fleet_service.ingest.MqttIngestor`, which hands it CSR messages with :meth:`offer` and
acknowledges each one to the broker once it has been answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet_protocol import (
    CertificateMessage,
    CsrMessage,
    InvalidTopicError,
    MalformedPayloadError,
    TopicKind,
    decode,
    device_topic,
    parse_device_topic,
)
from fleet_service import audit
from fleet_service.authority import CertificateAuthority
from fleet_service.db import session_scope
from fleet_service.pki import CsrRejectedError, public_key_fingerprint, sign_device_csr
from fleet_service.revocation import record_issued, revoked_key_owner
from fleet_service.roles import Principal, Role
from fleet_service.tables import Device, IssuedCertificate

__all__ = [
    "CertificateRenewer",
    "RenewalRefusedError",
    "renew_certificate",
]

logger = logging.getLogger(__name__)

# The audit action of a renewal, granted or refused.
RENEW_ACTION = "certificate.renew"

# CSRs waiting to be answered. Renewals are rare (one per device per lifetime); past this a CSR
# is acknowledged away unanswered and the device asks again after its timeout.
_QUEUE_MAX = 256

# A device gets a new certificate at most once per this share of the lifetime: renewals are due
# after two thirds of it, so only a broken or hostile device asks sooner, and each signature is a
# row in ``issued_certificate`` (and on the CRL if the device is revoked).
_MIN_INTERVAL_FRACTION = 0.1

_MESSAGE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class RenewalRefusedError(ValueError):
    """A CSR the service will not sign; the message tells the device (and its owner) why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        # "malformed", "device-id", "unknown-device", "revoked", "too-soon", "csr", "key-reused"
        self.reason = reason
        self.detail = detail


def _device_principal(device_id: str) -> Principal:
    # A device acts for itself only; the role is the least one, it is never checked here.
    return Principal(name=f"device:{device_id}", kind="device", role=Role.VIEWER)


def renew_certificate(
    engine: Engine,
    authority: CertificateAuthority,
    device_id: str,
    request: CsrMessage,
    *,
    ttl_s: int,
    now: datetime | None = None,
) -> CertificateMessage:
    """Sign ``request`` from ``device_id`` (the id of the topic it came on) and record it.

    Blocking (database, signature): run it in a thread. Raises :class:`RenewalRefusedError`
    with nothing written.
    """
    now = now or datetime.now(UTC)
    if request.device_id != device_id:
        raise RenewalRefusedError(
            "device-id",
            f"the CSR asks for device {request.device_id!r} but came on the csr topic of "
            f"{device_id!r}; a device renews its own certificate only, with its own id",
        )
    lifetime = timedelta(seconds=ttl_s)
    with session_scope(engine) as session:
        device = session.get(Device, device_id)
        if device is None:
            raise RenewalRefusedError(
                "unknown-device",
                f"device {device_id} is not enrolled in this fleet (it was deleted); enroll it "
                "again with a new join token",
            )
        if device.revoked_at is not None:
            raise RenewalRefusedError(
                "revoked",
                f"device {device_id} was revoked at {device.revoked_at.isoformat()}; a revoked "
                "device gets no new certificate. Enroll it again with a new join token if it "
                "should rejoin the fleet",
            )
        latest = session.exec(
            select(IssuedCertificate.issued_at)
            .where(IssuedCertificate.identity == device_id, IssuedCertificate.kind == "device")
            .order_by(col(IssuedCertificate.issued_at).desc())
            .limit(1)
        ).first()
        if latest is not None and now < (earliest := latest + lifetime * _MIN_INTERVAL_FRACTION):
            raise RenewalRefusedError(
                "too-soon",
                f"device {device_id} got a certificate at {latest.isoformat()}; ask again "
                f"after {earliest.isoformat()}",
            )
        try:
            cert = sign_device_csr(
                authority.key, authority.cert, request.csr_pem.encode(), device_id, lifetime
            )
        except CsrRejectedError as exc:
            raise RenewalRefusedError("csr", str(exc)) from exc
        # Checked on the signed certificate, which is dropped unsent if the key is refused.
        _check_key_is_new(session, device_id, public_key_fingerprint(cert.public_key()))
        serial = format(cert.serial_number, "x")
        not_after = cert.not_valid_after_utc
        record_issued(session, cert, kind="device")
        previous = device.cert_serial
        device.cert_serial = serial
        device.cert_not_after = not_after
        session.add(device)
        audit.record(
            session,
            _device_principal(device_id),
            RENEW_ACTION,
            device_id,
            detail={
                "request_id": request.message_id,
                "serial": serial,
                "previous_serial": previous,
                "not_after": not_after.isoformat(),
            },
        )
    logger.info(
        "renewed device certificate device_id=%s serial=%s previous_serial=%s not_after=%s "
        "request_id=%s",
        device_id,
        serial,
        previous,
        not_after.isoformat(),
        request.message_id,
    )
    return CertificateMessage(
        request_id=request.message_id,
        certificate_pem=cert.public_bytes(Encoding.PEM).decode() + authority.pem,
        serial=serial,
        not_after=not_after,
    )


def _check_key_is_new(session: Session, device_id: str, fingerprint: str) -> None:
    owner = revoked_key_owner(session, fingerprint)
    if owner is not None:
        raise RenewalRefusedError(
            "key-reused",
            f"the CSR's key belonged to {owner}, which was revoked; make a new key on the device",
        )
    held = session.exec(
        select(IssuedCertificate.serial).where(
            IssuedCertificate.identity == device_id,
            IssuedCertificate.public_key_sha256 == fingerprint,
        )
    ).first()
    if held is not None:
        raise RenewalRefusedError(
            "key-reused",
            f"device {device_id} already holds a certificate (serial {held}) for the CSR's key; "
            "a renewal rotates the key: make a new one on the device",
        )


@dataclass(frozen=True, slots=True)
class _Csr:
    """A CSR message off the wire and how to acknowledge it once answered."""

    device_id: str
    payload: bytes
    done: Callable[[], None]


Publish = Callable[[str, bytes], Awaitable[bool]]


class CertificateRenewer:
    """Answers device CSRs: :meth:`offer` takes them off the wire, :meth:`run` answers them."""

    def __init__(
        self,
        engine: Engine,
        authority: CertificateAuthority,
        *,
        ttl_s: int,
        topic_prefix: str,
        queue_max: int = _QUEUE_MAX,
    ) -> None:
        self._engine = engine
        self._authority = authority
        self._ttl_s = ttl_s
        self._prefix = topic_prefix
        self._queue: asyncio.Queue[_Csr] = asyncio.Queue(queue_max)

    def offer(self, topic: str, payload: object, done: Callable[[], None]) -> bool:
        """Queue the message if ``topic`` is a device's ``csr`` topic; False leaves it be.

        ``done`` acknowledges the message to the broker; it is called once the CSR has been
        answered, or at once when the queue is full (the device asks again after its timeout).
        """
        try:
            parsed = parse_device_topic(topic, prefix=self._prefix)
        except InvalidTopicError:
            return False
        if parsed.kind is not TopicKind.CSR:
            return False
        data = bytes(payload) if isinstance(payload, bytes | bytearray) else str(payload).encode()
        try:
            self._queue.put_nowait(_Csr(parsed.device_id, data, done))
        except asyncio.QueueFull:
            logger.warning(
                "certificate renewal dropped device_id=%s: %d CSRs are waiting already; the "
                "device asks again after its timeout",
                parsed.device_id,
                self._queue.qsize(),
            )
            done()
        return True

    async def run(self, publish: Publish) -> None:
        """The ``cert-renewal`` loop: answer each queued CSR on the device's certificate topic."""
        while True:
            item = await self._queue.get()
            try:
                answer = await asyncio.to_thread(self.answer, item.device_id, item.payload)
                if answer is not None:
                    topic = device_topic(item.device_id, TopicKind.CERTIFICATE, prefix=self._prefix)
                    if not await publish(topic, answer.to_payload()):
                        logger.warning(
                            "could not send the renewal answer to %s; it asks again after its "
                            "timeout",
                            item.device_id,
                        )
            except Exception:  # supervisor loop: one bad CSR must not stop renewals
                logger.exception("certificate renewal for %s failed; it asks again", item.device_id)
            finally:
                item.done()

    def answer(self, device_id: str, payload: bytes) -> CertificateMessage | None:
        """The answer to one CSR payload: a certificate, a refusal, or None when there is no
        request id to answer (a payload that is not a CSR message). Blocking."""
        request_id = _request_id(payload)
        try:
            request = decode(CsrMessage, payload)
        except MalformedPayloadError as exc:
            refusal = RenewalRefusedError(
                "malformed",
                f"the csr payload is not a CSR message ({exc}); send "
                '{"message_id", "timestamp", "device_id", "csr_pem"} as the agent does',
            )
            self._refused(device_id, request_id, refusal)
            return None if request_id is None else _refusal(request_id, refusal)
        try:
            return renew_certificate(
                self._engine, self._authority, device_id, request, ttl_s=self._ttl_s
            )
        except RenewalRefusedError as refusal:
            self._refused(device_id, request.message_id, refusal)
            return _refusal(request.message_id, refusal)

    def _refused(
        self, device_id: str, request_id: str | None, refusal: RenewalRefusedError
    ) -> None:
        logger.warning(
            "certificate renewal refused device_id=%s request_id=%s reason=%s: %s",
            device_id,
            request_id,
            refusal.reason,
            refusal.detail,
        )
        audit.record_apart(
            self._engine,
            _device_principal(device_id),
            RENEW_ACTION,
            device_id,
            outcome="denied",
            detail={"request_id": request_id, "reason": refusal.reason, "detail": refusal.detail},
        )


def _refusal(request_id: str, refusal: RenewalRefusedError) -> CertificateMessage:
    return CertificateMessage(request_id=request_id, refused=refusal.detail[:2000])


def _request_id(payload: bytes) -> str | None:
    """The ``message_id`` of a payload that may not validate, so a refusal can name it."""
    try:
        value = json.loads(payload).get("message_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and _MESSAGE_ID.fullmatch(value) else None
