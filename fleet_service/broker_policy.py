"""Keep the local broker's ACL and CRL in step with the database, and enforce revocations.

Runs on the primary only (the process that supervises mosquitto). One named loop,
``broker-policy``, computes from the database:

- the integrations' read grants and the site bridges' read and write grants (per device for a
  tag grant, so they follow enrollments, tag changes and revocations) and renders them into the
  ACL;
- the CRL: every revoked certificate that has not expired, signed by the fleet CA;

rewrites each file only when it changed (the CRL also when half its lifetime is gone), reloads
mosquitto (SIGHUP, which 2.0.11 answers by re-reading both; checked by experiment), then drops
the live session of every identity revoked since (:func:`fleet_service.revocation.drop_session`)
and clears the retained topics of decommissioned devices. A change made in this process wakes
the loop at once (:meth:`BrokerPolicy.apply_now`); changes made by a replica or the CLI are
picked up by polling every ``poll_s``.

Order matters: the CRL is reloaded before a session is dropped (or the client reconnects with
its old certificate), and a session is dropped before retained topics are cleared (the takeover
publishes its Last Will, a retained ``status``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlmodel import col, select

from broker import BrokerConfig, ReadGrant
from fleet_protocol import TopicKind, device_topic
from fleet_service.authority import CertificateAuthority
from fleet_service.db import session_scope
from fleet_service.integrations import acl_topics
from fleet_service.pki import Revocation, build_crl, write_crl
from fleet_service.revocation import BrokerTarget, drop_session, issue_session_drop_cert
from fleet_service.roles import parse_tag
from fleet_service.sites import bridge_acl_topics, is_site
from fleet_service.tables import Device, Integration, IssuedCertificate

__all__ = [
    "CLEARED_KINDS",
    "BrokerPolicy",
    "PolicyBroker",
    "PolicySettings",
    "PolicySnapshot",
    "RetainedPublisher",
    "load_snapshot",
]

logger = logging.getLogger(__name__)

# The retained topics of a device: cleared (an empty retained payload, as the service) when it
# is decommissioned, so nothing it left behind is handed to later subscribers.
CLEARED_KINDS = (TopicKind.STATUS, TopicKind.DESIRED, TopicKind.REPORTED)


class PolicyBroker(Protocol):
    """What the loop needs of the broker: the supervisor (broker.MosquittoSupervisor)."""

    @property
    def config(self) -> BrokerConfig: ...

    def set_read_grants(self, grants: tuple[ReadGrant, ...]) -> bool: ...

    async def reload_confirmed(self, timeout: float) -> bool: ...  # noqa: ASYNC109


class RetainedPublisher(Protocol):
    """Publishes as the service (fleet_service.ingest.MqttIngestor)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...


@dataclass(frozen=True)
class PolicySettings:
    """The loop's knobs (ServiceSettings: broker_policy_poll_s, crl_lifetime_days)."""

    topic_prefix: str
    crl_lifetime: timedelta
    # How often changes made elsewhere (a replica, the CLI) are looked for.
    poll_s: float
    # How long to wait for mosquitto to log that it reloaded before dropping sessions.
    reload_timeout_s: float = 5.0
    # One session drop (TLS handshake, CONNECT, DISCONNECT) on a loaded Raspberry Pi.
    session_drop_timeout_s: float = 10.0


@dataclass(frozen=True)
class PolicySnapshot:
    """What the database says the broker should enforce."""

    grants: tuple[ReadGrant, ...]
    revocations: tuple[Revocation, ...]
    revoked_identities: frozenset[str]
    decommissioned: tuple[str, ...]
    serials: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "serials", frozenset(r.serial for r in self.revocations))


def load_snapshot(engine: Engine, topic_prefix: str, now: datetime) -> PolicySnapshot:
    """Read grants, revoked certificates and revoked identities (blocking)."""
    with session_scope(engine) as session:
        integrations = session.exec(select(Integration).order_by(col(Integration.identity))).all()
        active = [i for i in integrations if i.revoked_at is None]
        devices: list[tuple[str, Mapping[str, str]]] = []
        if any(i.tag for i in active):
            rows = session.exec(
                select(Device.id, Device.tags).where(col(Device.revoked_at).is_(None))
            ).all()
            devices = [(device_id, tags or {}) for device_id, tags in rows]
        grants = []
        for integration in active:
            device_ids = None
            if integration.tag:
                key, value = parse_tag(integration.tag)
                device_ids = [d for d, tags in devices if tags.get(key) == value]
            if is_site(integration):
                # A site bridge carries its devices' traffic both ways (fleet_service/sites.py).
                read, write = bridge_acl_topics(device_ids, topic_prefix)
                grants.append(ReadGrant(integration.identity, read, write))
                continue
            topics = acl_topics(integration.grants, device_ids, topic_prefix)
            grants.append(ReadGrant(integration.identity, tuple(topics)))
        revoked_devices = session.exec(
            select(Device.id).where(col(Device.revoked_at).is_not(None))
        ).all()
        decommissioned = session.exec(
            select(Device.id).where(col(Device.decommissioned_at).is_not(None))
        ).all()
        certificates = session.exec(
            select(IssuedCertificate.serial, IssuedCertificate.revoked_at).where(
                col(IssuedCertificate.revoked_at).is_not(None),
                col(IssuedCertificate.not_after) > now,
            )
        ).all()
    return PolicySnapshot(
        grants=tuple(grants),
        revocations=tuple(
            Revocation(int(serial, 16), revoked_at)
            for serial, revoked_at in certificates
            if revoked_at is not None
        ),
        revoked_identities=frozenset(
            [*revoked_devices, *(i.identity for i in integrations if i.revoked_at is not None)]
        ),
        decommissioned=tuple(sorted(decommissioned)),
    )


class BrokerPolicy:
    """Owns the ``broker-policy`` loop of the primary.

    Call :meth:`prepare` before the broker starts (it writes the CRL and the ACL the broker
    loads), then run ``async with policy.running(engine, publisher)``.
    """

    def __init__(
        self,
        broker: PolicyBroker,
        authority: CertificateAuthority,
        target: BrokerTarget,
        settings: PolicySettings,
    ) -> None:
        if broker.config.crl_file is None:
            raise ValueError("the broker policy needs BrokerConfig.crl_file set")
        self._broker = broker
        self._authority = authority
        self._target = target
        self._settings = settings
        self._crl_file = broker.config.crl_file
        self._wakeup = asyncio.Event()
        self._finished = asyncio.Condition()
        self._started_passes = 0
        self._finished_passes = 0
        self._last_complete_pass = 0
        # What the CRL on disk lists and when it was signed (None: not written by us yet).
        self._crl_serials: frozenset[int] | None = None
        self._crl_signed_at: datetime | None = None
        # Identities whose sessions were dropped (or that were revoked before the broker started,
        # so never connected to it with a valid certificate), and devices whose retained topics
        # were cleared since this process started.
        self._enforced: set[str] | None = None
        self._cleared: set[str] = set()

    def prepare(self, engine: Engine) -> PolicySnapshot:
        """Write the CRL and the ACL from the database (blocking); before the broker starts.

        The CRL is signed afresh on every start, so a long stop never leaves it expired.
        """
        now = datetime.now(UTC)
        snapshot = load_snapshot(engine, self._settings.topic_prefix, now)
        self._broker.set_read_grants(snapshot.grants)
        self._write_crl(snapshot, now)
        self._enforced = set(snapshot.revoked_identities)
        logger.info(
            "broker policy: %d read grants, %d revoked certificates on the CRL",
            len(snapshot.grants),
            len(snapshot.revocations),
        )
        return snapshot

    def wake(self) -> None:
        """Something changed here: run a pass now."""
        self._wakeup.set()

    # A timeout argument: routes wait for the broker as long as their setting says.
    async def apply_now(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Run a pass now and wait for it: True once the broker enforces what is committed.

        False after ``timeout`` or when the pass could not finish (the broker is down); the
        loop keeps trying every ``poll_s``.
        """
        wanted = self._started_passes + 1
        self.wake()
        try:
            async with asyncio.timeout(timeout), self._finished:
                await self._finished.wait_for(lambda: self._finished_passes >= wanted)
        except TimeoutError:
            return False
        return self._last_complete_pass >= wanted

    @asynccontextmanager
    async def running(
        self, engine: Engine, publisher: RetainedPublisher | None
    ) -> AsyncIterator[BrokerPolicy]:
        """Run the loop until the context exits."""
        async with asyncio.TaskGroup() as group:
            task = group.create_task(self._run(engine, publisher), name="broker-policy")
            try:
                yield self
            finally:
                task.cancel()

    async def _run(self, engine: Engine, publisher: RetainedPublisher | None) -> None:
        while True:
            # Cleared before the pass: a change committed during it wakes the next one.
            self._wakeup.clear()
            self._started_passes += 1
            number = self._started_passes
            try:
                complete = await self._pass(engine, publisher)
            except Exception:  # supervisor loop: log, keep the broker policy running
                logger.exception("broker policy pass failed; retrying in %.1fs", self._poll_s)
                complete = False
            if complete:
                self._last_complete_pass = number
            async with self._finished:
                self._finished_passes = number
                self._finished.notify_all()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll_s)

    @property
    def _poll_s(self) -> float:
        return self._settings.poll_s

    async def _pass(self, engine: Engine, publisher: RetainedPublisher | None) -> bool:
        now = datetime.now(UTC)
        snapshot = await asyncio.to_thread(load_snapshot, engine, self._settings.topic_prefix, now)
        if self._enforced is None:  # running without prepare(): nothing to catch up on
            self._enforced = set(snapshot.revoked_identities)
        changed = await asyncio.to_thread(self._write_files, snapshot, now)
        if changed:
            await self._broker.reload_confirmed(self._settings.reload_timeout_s)
        complete = await self._drop_sessions(engine, snapshot)
        if publisher is not None:
            complete = await self._clear_retained(snapshot, publisher) and complete
        return complete

    def _write_files(self, snapshot: PolicySnapshot, now: datetime) -> bool:
        acl_changed = self._broker.set_read_grants(snapshot.grants)
        crl_changed = False
        # Only additions matter at once; an expired certificate leaving the list can wait for
        # the next signing (it is refused as expired anyway).
        added = self._crl_serials is None or bool(snapshot.serials - self._crl_serials)
        due = (
            self._crl_signed_at is None
            or now - self._crl_signed_at >= self._settings.crl_lifetime / 2
        )
        if added or due:
            self._write_crl(snapshot, now)
            crl_changed = True
        return acl_changed or crl_changed

    def _write_crl(self, snapshot: PolicySnapshot, now: datetime) -> None:
        crl = build_crl(
            self._authority.key,
            self._authority.cert,
            snapshot.revocations,
            lifetime=self._settings.crl_lifetime,
        )
        self._crl_file.parent.mkdir(parents=True, exist_ok=True)
        write_crl(self._crl_file, crl)
        self._crl_serials = snapshot.serials
        self._crl_signed_at = now
        logger.info(
            "wrote CRL %s with %d revoked certificates", self._crl_file, len(snapshot.serials)
        )

    async def _drop_sessions(self, engine: Engine, snapshot: PolicySnapshot) -> bool:
        assert self._enforced is not None
        pending = sorted(snapshot.revoked_identities - self._enforced)
        complete = True
        for identity in pending:
            key, cert = await asyncio.to_thread(self._issue_drop_cert, engine, identity)
            try:
                await drop_session(
                    self._target, key, cert, timeout_s=self._settings.session_drop_timeout_s
                )
            except (aiomqtt.MqttError, OSError) as exc:
                logger.warning(
                    "could not drop the session of revoked %s (%s); retrying in %.1fs",
                    identity,
                    exc,
                    self._poll_s,
                )
                complete = False
                continue
            self._enforced.add(identity)
        return complete

    def _issue_drop_cert(
        self, engine: Engine, identity: str
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        with session_scope(engine) as session:
            return issue_session_drop_cert(session, self._authority, identity)

    async def _clear_retained(self, snapshot: PolicySnapshot, publisher: RetainedPublisher) -> bool:
        complete = True
        for device_id in snapshot.decommissioned:
            if device_id in self._cleared:
                continue
            topics = [
                device_topic(device_id, kind, prefix=self._settings.topic_prefix)
                for kind in CLEARED_KINDS
            ]
            results = [await publisher.publish(topic, b"", retain=True) for topic in topics]
            if all(results):
                self._cleared.add(device_id)
                logger.info("cleared the retained topics of decommissioned %s", device_id)
            else:
                complete = False
        return complete
