"""The MQTT side of ingestion: one persistent session that reads, validates and batches.

Two named loops run under one context manager: ``mqtt-reader`` turns broker messages into
:class:`Incoming` items (dropping and counting bad ones), ``ingest-writer`` commits them in
batches on a worker thread and announces the changed devices.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Engine

from fleet_protocol import (
    InvalidTopicError,
    MalformedPayloadError,
    StatusMessage,
    TelemetryMessage,
    TopicKind,
    decode,
    parse_device_topic,
    subscription_for,
)
from fleet_service.events import EventHub
from fleet_service.ingest.counters import IngestCounters
from fleet_service.ingest.writer import Incoming, write_batch

__all__ = ["MqttIngestSettings", "MqttIngestor"]

logger = logging.getLogger(__name__)

_MODELS: dict[TopicKind, type[StatusMessage] | type[TelemetryMessage]] = {
    TopicKind.STATUS: StatusMessage,
    TopicKind.TELEMETRY: TelemetryMessage,
}


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


def _tls_context(settings: MqttIngestSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return context


class MqttIngestor:
    """Owns the ingestion loops; use as ``async with MqttIngestor(...) as ingestor``."""

    def __init__(
        self,
        settings: MqttIngestSettings,
        engine: Engine,
        hub: EventHub,
        counters: IngestCounters,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._hub = hub
        self.counters = counters
        # Bounded: when the database falls behind, the reader waits here rather than piling up.
        self._queue: asyncio.Queue[Incoming] = asyncio.Queue(settings.queue_max)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MqttIngestor]:
        """Run both loops until the context exits; then commit what was already received."""
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(self._read_forever(), name="mqtt-reader")
            writer = group.create_task(self._write_forever(), name="ingest-writer")
            try:
                yield self
            finally:
                reader.cancel()
                # The broker has had its PUBACK for every queued message, so dropping the queue
                # would lose them; the writer gets a bounded time to commit it.
                try:
                    await asyncio.wait_for(self._queue.join(), self._settings.drain_timeout_s)
                except TimeoutError:
                    logger.error("stopped with %d messages not committed", self._queue.qsize())
                writer.cancel()

    async def _read_forever(self) -> None:
        attempt = 0
        while True:
            try:
                await self._read_session()
                attempt = 0
            except aiomqtt.MqttError as exc:
                self.counters.connected = False
                attempt += 1
                delay = random.uniform(0, min(self._settings.reconnect_max_s, 0.5 * 2**attempt))  # noqa: S311  (jitter, not crypto)
                logger.warning("broker connection lost (%s); reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            except Exception:  # supervisor loop: log, back off, keep ingesting
                self.counters.connected = False
                logger.exception("ingest reader crashed; restarting")
                await asyncio.sleep(1)

    async def _read_session(self) -> None:
        settings = self._settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry_s
        async with aiomqtt.Client(
            settings.host,
            settings.port,
            identifier=settings.identity,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=_tls_context(settings),
            clean_start=False,
            properties=properties,
        ) as client:
            for kind in _MODELS:
                await client.subscribe(subscription_for(kind, prefix=settings.topic_prefix), qos=1)
            self.counters.connected = True
            logger.info("ingesting from mqtts://%s:%d", settings.host, settings.port)
            async for message in client.messages:
                item = self._validate(str(message.topic), message.payload)
                if item is not None:
                    await self._queue.put(item)

    def _validate(self, topic: str, payload: object) -> Incoming | None:
        self.counters.received += 1
        try:
            parsed = parse_device_topic(topic, prefix=self._settings.topic_prefix)
        except InvalidTopicError as exc:
            self.counters.reject("topic")
            logger.warning("dropped message on unexpected topic %r: %s", topic, exc)
            return None
        model = _MODELS.get(parsed.kind)
        if model is None:
            self.counters.reject("topic")
            return None
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        try:
            message = decode(model, bytes(payload))
        except MalformedPayloadError as exc:
            self.counters.reject(exc.reason)
            logger.warning(
                "rejected %s from device %s: %s", parsed.kind.value, parsed.device_id, exc
            )
            return None
        return Incoming(parsed.device_id, message, datetime.now(UTC))

    async def _write_forever(self) -> None:
        settings = self._settings
        while True:
            first = await self._queue.get()
            # Let a batch gather for one interval, then take what is there in one go: cheaper
            # than waiting on the queue message by message, and the latency is bounded.
            if self._queue.qsize() < settings.batch_max:
                await asyncio.sleep(settings.batch_interval_s)
            batch = [first]
            while len(batch) < settings.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._commit(batch)
            for _ in batch:
                self._queue.task_done()

    async def _commit(self, batch: list[Incoming]) -> None:
        attempt = 0
        while True:
            try:
                result = await asyncio.to_thread(write_batch, self._engine, batch)
                break
            except Exception:  # supervisor: keep the batch and retry; the database may be back
                attempt += 1
                delay = min(self._settings.reconnect_max_s, 0.5 * 2**attempt)
                logger.exception(
                    "could not commit a batch of %d messages; retrying in %.1f s", len(batch), delay
                )
                await asyncio.sleep(delay)
        counters = self.counters
        counters.batches += 1
        counters.stored += result.stored
        counters.duplicates += result.duplicates
        if result.unknown_devices:
            counters.rejected["unknown-device"] += result.unknown_devices
        for device in result.changed:
            self._hub.publish(device)
