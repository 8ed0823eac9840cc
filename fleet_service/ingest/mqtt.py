"""The service's MQTT link: one persistent session that ingests device messages and publishes
commands, desired state and receipts.

Two named loops run under one context manager: ``mqtt-reader`` turns broker messages into
:class:`Incoming` items (dropping and counting bad ones), ``ingest-writer`` commits them in
batches on a worker thread, then acknowledges them to the broker (manual PUBACK, so a message
is only acknowledged once it is committed), receipts them to their devices and announces the
changes. A service killed between commit and ack gets the messages again; the unique message
ids make that harmless.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Engine

from fleet_protocol import (
    MAX_RECEIPT_IDS,
    InvalidTopicError,
    MalformedPayloadError,
    ReceiptMessage,
    TopicKind,
    device_topic,
    parse_device_topic,
    subscription_for,
)
from fleet_service.events import EventHub
from fleet_service.ingest.counters import UNKNOWN_KIND, IngestCounters
from fleet_service.ingest.writer import (
    MODELS_BY_KIND,
    BatchResult,
    Incoming,
    decode_for_topic,
    write_batch,
)
from fleet_service.renewal import CertificateRenewer

__all__ = ["MqttIngestSettings", "MqttIngestor"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttIngestSettings:
    """How the service reaches the broker and paces its writes."""

    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    identity: str
    topic_prefix: str
    batch_max: int
    batch_interval_s: float
    queue_max: int
    reconnect_max_s: float
    # Long enough to ride out a service restart; the broker keeps QoS 1 messages meanwhile.
    session_expiry_s: int = 24 * 3600
    # On shutdown, how long the writer may take to commit what was already received.
    drain_timeout_s: float = 10.0
    # Shared-subscription group; replicas in one group split the stream. None: plain topics.
    shared_group: str | None = None


@dataclass(frozen=True, slots=True)
class _Received:
    """A message off the wire with what is needed to acknowledge it later."""

    item: Incoming
    mid: int
    qos: int
    session: int  # acks are only valid on the connection the message came in on


def _tls_context(settings: MqttIngestSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return context


class MqttIngestor:
    """Owns the MQTT session; use as ``async with ingestor.running()``."""

    def __init__(
        self,
        settings: MqttIngestSettings,
        engine: Engine,
        hub: EventHub,
        counters: IngestCounters,
        *,
        renewer: CertificateRenewer | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._hub = hub
        self.counters = counters
        # Answers device CSRs (fleet_service/renewal.py); None: ``csr`` is not subscribed.
        self._renewer = renewer
        # Bounded: when the database falls behind, the reader waits here and stops acking, so
        # the broker holds the rest (it sends no more than our Receive Maximum unacked).
        self._queue: asyncio.Queue[_Received] = asyncio.Queue(settings.queue_max)
        self._client: aiomqtt.Client | None = None
        self._session = 0
        # Set on every (re)connect, so the dispatcher republishes what may have been lost.
        self.connected = asyncio.Event()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MqttIngestor]:
        """Run both loops until the context exits; then commit what was already received."""
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(self._read_forever(), name="mqtt-reader")
            writer = group.create_task(self._write_forever(), name="ingest-writer")
            renewals = None
            if self._renewer is not None:
                renewals = group.create_task(self._renewer.run(self.publish), name="cert-renewal")
            try:
                yield self
            finally:
                if renewals is not None:
                    renewals.cancel()
                reader.cancel()
                try:
                    await asyncio.wait_for(self._queue.join(), self._settings.drain_timeout_s)
                except TimeoutError:
                    logger.error("stopped with %d messages not committed", self._queue.qsize())
                writer.cancel()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish at QoS 1 and wait for the broker's PUBACK; False when not connected."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1, retain=retain, timeout=10)
        except aiomqtt.MqttError as exc:
            logger.warning("could not publish to %s: %s", topic, exc)
            return False
        return True

    async def _read_forever(self) -> None:
        attempt = 0
        while True:
            try:
                await self._read_session()
                attempt = 0
            except aiomqtt.MqttError as exc:
                attempt += 1
                delay = random.uniform(0, min(self._settings.reconnect_max_s, 0.5 * 2**attempt))  # noqa: S311  (jitter, not crypto)
                logger.warning("broker connection lost (%s); reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            except Exception:  # supervisor loop: log, back off, keep ingesting
                logger.exception("ingest reader crashed; restarting")
                await asyncio.sleep(1)
            finally:
                self._client = None
                self.counters.connected = False
                self.connected.clear()

    async def _read_session(self) -> None:
        settings = self._settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry_s
        # Unacknowledged messages the broker may send us at once: enough for whole batches.
        properties.ReceiveMaximum = min(65_535, settings.queue_max)
        async with aiomqtt.Client(
            settings.host,
            settings.port,
            identifier=settings.identity,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=_tls_context(settings),
            clean_start=False,
            properties=properties,
            # No Nagle: acks and receipts are small packets a device is waiting for.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        ) as client:
            # aiomqtt has no manual-ack option; paho's is switched on through its client, so
            # PUBACK waits for the commit (the one place the private attribute is touched).
            client._client.manual_ack_set(True)
            self._session += 1
            session = self._session
            renewal = [TopicKind.CSR] if self._renewer is not None else []
            for kind in [*MODELS_BY_KIND, *renewal]:
                topic = subscription_for(kind, prefix=settings.topic_prefix)
                if settings.shared_group:
                    topic = f"$share/{settings.shared_group}/{topic}"
                await client.subscribe(topic, qos=1)
            self._client = client
            self.counters.connected = True
            self.connected.set()
            logger.info("connected to mqtts://%s:%d", settings.host, settings.port)
            async for message in client.messages:
                # A CSR is answered apart from the batches, and acknowledged once answered.
                if self._renewer is not None and self._renewer.offer(
                    str(message.topic),
                    message.payload,
                    partial(self._ack_one, message.mid, message.qos, session),
                ):
                    continue
                if not message.payload:
                    # An empty payload clears a retained topic (a decommissioned device's
                    # status or reported state, cleared by this service): nothing to store.
                    client._client.ack(message.mid, message.qos)
                    continue
                item = self._validate(str(message.topic), message.payload)
                if item is None:
                    # Never valid however often it comes back: acknowledge it away.
                    client._client.ack(message.mid, message.qos)
                    continue
                await self._queue.put(_Received(item, message.mid, message.qos, session))

    def _validate(self, topic: str, payload: object) -> Incoming | None:
        try:
            parsed = parse_device_topic(topic, prefix=self._settings.topic_prefix)
        except InvalidTopicError as exc:
            self.counters.receive(UNKNOWN_KIND)
            self.counters.reject("topic")
            logger.warning("dropped message on unexpected topic %r: %s", topic, exc)
            return None
        kind = parsed.kind.value
        self.counters.receive(kind)
        model = MODELS_BY_KIND.get(parsed.kind)
        if model is None:
            self.counters.reject("topic", kind)
            logger.warning(
                "dropped %s message from %s: not a device topic", topic, parsed.device_id
            )
            return None
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        try:
            message = decode_for_topic(parsed, bytes(payload))
        except MalformedPayloadError as exc:
            self.counters.reject(exc.reason, kind)
            logger.warning("rejected %s from device %s: %s", kind, parsed.device_id, exc)
            return None
        return Incoming(parsed.device_id, message, datetime.now(UTC))

    async def _write_forever(self) -> None:
        settings = self._settings
        while True:
            first = await self._queue.get()
            # What queued while the previous batch committed is this batch; the optional
            # interval gathers more at the price of latency.
            if settings.batch_interval_s and self._queue.qsize() < settings.batch_max:
                await asyncio.sleep(settings.batch_interval_s)
            batch = [first]
            while len(batch) < settings.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            result = await self._commit([r.item for r in batch])
            self._acknowledge(batch)
            for _ in batch:
                self._queue.task_done()
            await self._after_commit(result)

    async def _commit(self, batch: list[Incoming]) -> BatchResult:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                result = await asyncio.to_thread(write_batch, self._engine, batch)
            except Exception:  # supervisor: keep the batch unacknowledged and retry
                attempt += 1
                self.counters.database_ok = False
                delay = min(self._settings.reconnect_max_s, 0.5 * 2**attempt)
                logger.exception(
                    "could not commit a batch of %d messages; retrying in %.1f s", len(batch), delay
                )
                await asyncio.sleep(delay)
                continue
            self.counters.record(result, size=len(batch), seconds=time.perf_counter() - started)
            return result

    def _acknowledge(self, batch: list[_Received]) -> None:
        client = self._client
        for received in batch:
            # A message from an earlier connection will be redelivered on this one instead.
            if client is not None and received.session == self._session:
                client._client.ack(received.mid, received.qos)

    def _ack_one(self, mid: int, qos: int, session: int) -> None:
        client = self._client
        if client is not None and session == self._session:
            client._client.ack(mid, qos)

    async def _after_commit(self, result: BatchResult) -> None:
        result.announce(self._hub)
        await self._send_receipts(result.receipts)

    async def _send_receipts(self, receipts: dict[str, list[str]]) -> None:
        by_topic: dict[str, list[str]] = defaultdict(list)
        for device_id, ids in receipts.items():
            by_topic[
                device_topic(device_id, TopicKind.RECEIPTS, prefix=self._settings.topic_prefix)
            ] += ids
        for topic, ids in by_topic.items():
            for start in range(0, len(ids), MAX_RECEIPT_IDS):
                receipt = ReceiptMessage(message_ids=ids[start : start + MAX_RECEIPT_IDS])
                # A lost receipt only means the device resends; the duplicate is receipted then.
                await self.publish(topic, receipt.to_payload())
