"""Certificate renewal: a new key made here, a CSR over the MQTT session, a verified swap.

The ``cert-renewal`` loop runs once per connection, next to ``outbox-pump`` and ``inbound``. Once
less than ``cert_renew_fraction`` of the certificate's lifetime remains, it makes a new EC P-256
key (kept in ``renewal.key``, 0600, until its certificate comes, so a restart reuses it and the
key never leaves the device), sends a CSR on ``devices/{id}/csr`` and waits up to
``cert_renew_timeout_s`` for the answer on ``certificate``. A certificate is believed only if it
chains to the pinned fleet CA, is for the pending key, names this device as its CN, is for
client authentication and outlives the current one. Then key and certificate are swapped together
(:meth:`device_agent.state.StateDir.install_renewal`) and the agent reconnects with them; what it
produces meanwhile waits in the outbox, so nothing is lost.

A refusal, a silence or an unusable answer keeps the current certificate and is retried with
capped, jittered backoff, with a warning that says why and when the certificate expires. Once it
has expired the broker refuses the device and only enrolling again helps; the agent says so.
Renewal is checked again after every (re)connect, so also after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.backoff import Backoff, sleep_unless_set
from device_agent.config import AgentSettings
from device_agent.connection import Connection
from device_agent.durable import write_atomically
from device_agent.errors import CorruptStateError, RenewalError
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    CertificateMessage,
    CsrMessage,
    MalformedPayloadError,
    TopicKind,
    decode,
)

__all__ = ["CertificateInfo", "CertificateRenewer", "check_renewed_certificate", "make_csr"]

logger = logging.getLogger(__name__)

# With nothing due, the loop looks again after at most this long: a Raspberry Pi's wall clock
# jumps when NTP first syncs, and renewal is timed by the wall clock (as expiry is).
_RECHECK_S = 600.0

# A renewed certificate may start this far in the future of our clock (the service backdates
# certificates for skew, but a device clock may run ahead).
_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What renewal needs to know of a device certificate."""

    serial: str  # lowercase hex, as the service records it
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertificateInfo:
        """Read it off a certificate."""
        return cls(
            format(cert.serial_number, "x"), cert.not_valid_before_utc, cert.not_valid_after_utc
        )

    def renew_at(self, fraction: float) -> datetime:
        """When less than ``fraction`` of the lifetime remains."""
        return self.not_after - (self.not_after - self.not_before) * fraction

    def expired(self, now: datetime) -> bool:
        """Whether the broker refuses it at ``now``."""
        return now >= self.not_after


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """A PEM CSR for ``key`` with an empty subject and no extensions, as the service wants."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def check_renewed_certificate(
    cert: x509.Certificate,
    *,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    device_id: str,
    current: CertificateInfo,
    now: datetime,
) -> None:
    """Raise :class:`RenewalError` unless ``cert`` can replace ``current`` for ``key``."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != ours:
        raise RenewalError("the renewed certificate is for another key than the one this CSR had")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise RenewalError(
            f"the renewed certificate is not issued by the pinned fleet CA ({exc})"
        ) from exc
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        # The broker takes the CN as the MQTT username; any other would lock the device out.
        raise RenewalError(f"the renewed certificate names {names}, not device {device_id!r}")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise RenewalError("the renewed certificate is not for TLS client authentication")
    if cert.not_valid_before_utc > now + _CLOCK_SKEW:
        raise RenewalError(
            f"the renewed certificate starts only at {cert.not_valid_before_utc.isoformat()}; "
            "check this device's clock"
        )
    if cert.not_valid_after_utc <= max(now, current.not_after):
        raise RenewalError(
            f"the renewed certificate expires at {cert.not_valid_after_utc.isoformat()}, no later "
            f"than the current one ({current.not_after.isoformat()})"
        )


class _NothingPending(Exception):  # noqa: N818  (a signal between two methods, never raised out)
    """A certificate arrived while no renewal is pending (an answer to a repeated request)."""


class CertificateRenewer:
    """Renews this device's certificate: the ``cert-renewal`` loop and the answer handler."""

    def __init__(
        self,
        settings: AgentSettings,
        identity: DeviceIdentity,
        state: StateDir,
        *,
        on_renewed: Callable[[CertificateInfo], None],
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._device_id = identity.device_id
        self._state = state
        self._on_renewed = on_renewed
        self._backoff = Backoff(
            settings.cert_renew_retry_min_s, settings.cert_renew_retry_max_s, rng=rng
        )
        self._current: CertificateInfo | None = None
        self._pending: ec.EllipticCurvePrivateKey | None = None
        self._last_request: str | None = None
        self._sent_at: float | None = None  # monotonic; until the request is answered or failed
        self._retry_at: float | None = None  # monotonic; after a failure
        self._answered = asyncio.Event()

    @property
    def current(self) -> CertificateInfo:
        """The certificate the device holds now; :meth:`load` first."""
        if self._current is None:
            raise RuntimeError("load() the certificate before renewing it")
        return self._current

    def load(self) -> CertificateInfo:
        """Read the current certificate and a pending renewal key. Blocking (files)."""
        path = self._state.cert_path
        try:
            current = CertificateInfo.of(x509.load_pem_x509_certificate(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise CorruptStateError(
                f"cannot read the device certificate {path} ({exc}); enroll again with "
                f"`edgefleet-agent enroll TOKEN --state-dir {self._state.root} --force`"
            ) from exc
        self._current = current
        self._pending = _load_pending_key(self._state.pending_key_path)
        if not self.check_expired():
            logger.info(
                "device certificate serial=%s not_after=%s renew_after=%s",
                current.serial,
                current.not_after.isoformat(),
                current.renew_at(self._settings.cert_renew_fraction).isoformat(),
            )
        return current

    def check_expired(self) -> bool:
        """Whether the certificate has expired; if so, log what the owner has to do."""
        current = self.current
        if not current.expired(datetime.now(UTC)):
            return False
        logger.error(
            "device certificate serial=%s expired at %s: the broker refuses this device and it "
            "can no longer renew over MQTT. Enroll it again with a new join token: "
            "`edgefleet-agent enroll TOKEN --state-dir %s --force` (it joins as a new device)",
            current.serial,
            current.not_after.isoformat(),
            self._state.root,
        )
        return True

    async def run(self, connection: Connection) -> None:
        """The ``cert-renewal`` loop of one connection: renew when due, retry with backoff."""
        timeout = self._settings.cert_renew_timeout_s
        while True:
            delay = self._seconds_to_wait(time.monotonic(), datetime.now(UTC))
            if delay > 0:
                await asyncio.sleep(min(delay, _RECHECK_S))
                continue
            try:
                await self._request(connection)
            except OSError as exc:  # the new key cannot be stored: disk full or read-only
                self._failed(f"cannot store the new key in {self._state.root}: {exc}")
                continue
            if not await sleep_unless_set(self._answered, timeout):
                self._failed(f"no answer from the service within {timeout:g} s")

    async def handle_answer(self, payload: bytes) -> None:
        """Take the service's answer on ``certificate``: install the certificate or back off."""
        try:
            answer = decode(CertificateMessage, payload)
        except MalformedPayloadError as exc:
            logger.warning("dropped a malformed certificate answer: %s", exc)
            return
        if answer.refused is not None:
            if answer.request_id != self._last_request or self._pending is None:
                logger.info("ignored the refusal of an earlier request_id=%s", answer.request_id)
                return
            # Whatever the reason, the next try comes with a fresh key: the service refuses a
            # key it has certified before (its answer may have been lost on the way here).
            self._failed(f"the service refused it: {answer.refused}", new_key=True)
            return
        try:
            renewed = await asyncio.to_thread(self._install, answer)
        except _NothingPending:
            logger.info(
                "ignored certificate serial=%s (request_id=%s): no renewal is pending",
                answer.serial,
                answer.request_id,
            )
            return
        except RenewalError as exc:
            if answer.request_id != self._last_request:
                logger.info("ignored an unusable answer to an earlier request: %s", exc)
                return
            self._failed(
                f"the answer to request_id={answer.request_id} is unusable: {exc}", new_key=True
            )
            return
        except OSError as exc:  # a restart finishes or undoes the swap (StateDir.finish_renewal)
            self._failed(f"cannot write the renewed certificate to {self._state.root}: {exc}")
            return
        previous = self.current
        self._current = renewed
        self._backoff.reset()
        self._retry_at = self._sent_at = None
        self._answered.set()
        logger.info(
            "switched to the renewed certificate serial=%s not_after=%s previous_serial=%s; "
            "reconnecting with it",
            renewed.serial,
            renewed.not_after.isoformat(),
            previous.serial,
        )
        self._on_renewed(renewed)

    # -- internals ------------------------------------------------------------------------------

    def _seconds_to_wait(self, monotonic: float, now: datetime) -> float:
        due = (self.current.renew_at(self._settings.cert_renew_fraction) - now).total_seconds()
        if due > 0:
            return due
        if self._retry_at is not None and monotonic < self._retry_at:
            return self._retry_at - monotonic
        # A request sent on an earlier connection may still be answered (the answer waits in
        # the persistent session): give it its time before asking again.
        timeout = self._settings.cert_renew_timeout_s
        if self._sent_at is not None and monotonic < self._sent_at + timeout:
            return self._sent_at + timeout - monotonic
        return 0.0

    async def _request(self, connection: Connection) -> None:
        key = await asyncio.to_thread(self._pending_key)
        csr_pem = await asyncio.to_thread(make_csr, key)
        request = CsrMessage(device_id=self._device_id, csr_pem=csr_pem)
        self._answered.clear()
        self._last_request = request.message_id
        self._sent_at = time.monotonic()
        # Directly, not through the outbox: a request is answered or retried, never replayed.
        await connection.publish(TopicKind.CSR, request)
        current = self.current
        logger.info(
            "certificate renewal requested request_id=%s serial=%s not_after=%s attempt=%d",
            request.message_id,
            current.serial,
            current.not_after.isoformat(),
            self._backoff.attempt + 1,
        )

    def _pending_key(self) -> ec.EllipticCurvePrivateKey:
        """The key of the pending renewal: made here once, on disk (0600) until it is used."""
        if self._pending is None:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_atomically(self._state.pending_key_path, pem)
            self._pending = key
        return self._pending

    def _install(self, answer: CertificateMessage) -> CertificateInfo:
        """Check the certificate of ``answer`` and swap it in with the pending key. Blocking."""
        key = self._pending
        if key is None:
            raise _NothingPending
        pem = answer.certificate_pem or ""
        try:
            cert = x509.load_pem_x509_certificates(pem.encode())[0]
            ca = x509.load_pem_x509_certificate(self._state.ca_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise RenewalError(f"the certificate cannot be read ({exc})") from exc
        if format(cert.serial_number, "x") != answer.serial:
            raise RenewalError(f"the certificate's serial is not the announced {answer.serial}")
        check_renewed_certificate(
            cert,
            key=key,
            ca=ca,
            device_id=self._device_id,
            current=self.current,
            now=datetime.now(UTC),
        )
        self._state.install_renewal(cert.public_bytes(serialization.Encoding.PEM))
        self._pending = None
        return CertificateInfo.of(cert)

    def _failed(self, reason: str, *, new_key: bool = False) -> None:
        """Back off; ``new_key`` drops the pending key so the next request makes another."""
        if new_key:
            self._pending = None
            self._state.pending_key_path.unlink(missing_ok=True)
        delay = self._backoff.next_delay()
        self._retry_at = time.monotonic() + delay
        self._sent_at = None
        self._answered.set()
        current = self.current
        logger.warning(
            "certificate renewal failed attempt=%d retry_in_s=%.1f cert_serial=%s "
            "cert_not_after=%s: %s; the device keeps its current certificate until then",
            self._backoff.attempt,
            delay,
            current.serial,
            current.not_after.isoformat(),
            reason,
        )
        self.check_expired()


def _load_pending_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """The key a renewal interrupted by a restart was for; None (and gone) if unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        logger.warning("discarded the damaged pending renewal key %s (%s)", path, exc)
        path.unlink(missing_ok=True)
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        path.unlink(missing_ok=True)
        return None
    return key
