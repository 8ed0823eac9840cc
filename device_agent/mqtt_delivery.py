"""Moving messages over one MQTT session: store-and-wake, the outbox pump, inbound dispatch.

Not named ``device_agent.delivery``: that is :data:`DELIVERY_LOGGER_NAME`, whose records are never
forwarded, and this module's own logger must stay forwardable (see device_agent/logforward.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from device_agent.backoff import sleep_unless_set
from device_agent.config import AgentSettings
from device_agent.connection import Connection, InboundMessage
from device_agent.desired import DesiredApplier
from device_agent.errors import PayloadTooLargeError
from device_agent.logforward import DELIVERY_LOGGER_NAME
from device_agent.outbox import Outbox, OutboxEntry, OutboxError
from device_agent.state import DeviceIdentity
from fleet_protocol import (
    DeviceMessage,
    InvalidTopicError,
    LogMessage,
    MalformedPayloadError,
    ReceiptMessage,
    ReportedState,
    TopicKind,
    decode,
    parse_device_topic,
)

__all__ = ["MqttDelivery"]

logger = logging.getLogger(__name__)
# Records about moving messages (the pump, receipts): never forwarded, see logforward.py.
delivery_logger = logging.getLogger(DELIVERY_LOGGER_NAME)


class MqttDelivery:
    """Puts messages into the outbox and runs the per-connection ``outbox-pump`` and ``inbound``.

    The pump publishes what the outbox says is due, in order, at ``drain_rate_per_s``; inbound
    confirms outbox entries by receipt, queues commands and applies desired state.
    """

    def __init__(
        self,
        settings: AgentSettings,
        identity: DeviceIdentity,
        outbox: Outbox,
        *,
        commands: asyncio.Queue[bytes],
        desired: DesiredApplier,
        certificates: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._outbox = outbox
        self._commands = commands
        self._desired = desired
        # Answers to certificate renewal requests (device_agent/renewal.py).
        self._certificates = certificates
        # Set by every put, so the pump wakes at once instead of at its next idle poll.
        self._ready = asyncio.Event()

    async def put(
        self,
        kind: TopicKind,
        message: DeviceMessage,
        *,
        retain: bool = False,
        model: str | None = None,
    ) -> None:
        """Store ``message`` durably, then wake the pump; ``model`` goes with results only."""
        await asyncio.to_thread(self._outbox.put, kind, message, model=model, retain=retain)
        self._ready.set()

    async def put_logs(self, batch: list[LogMessage]) -> None:
        """Store forwarded log records in one transaction, then wake the pump; logs a refusal."""
        try:
            await asyncio.to_thread(
                self._outbox.put_many,
                [(TopicKind.LOGS, message, None, False) for message in batch],
            )
        except OutboxError as exc:
            logger.warning("%d forwarded log records not stored: %s", len(batch), exc)
            return
        self._ready.set()

    async def report(self, reported: ReportedState) -> None:
        """Store the reported state (retained), then wake the pump."""
        await self.put(TopicKind.REPORTED, reported, retain=True)

    async def pump(self, connection: Connection) -> None:
        """Publish due outbox entries in order, at most ``drain_rate_per_s`` of them a second.

        An entry stays in the outbox after its PUBACK; it is due again ``receipt_timeout_s``
        after that unless a receipt deleted it meanwhile.
        """
        settings = self._settings
        outbox = self._outbox
        ready = self._ready
        while True:
            # Cleared before looking, so a put landing after the look still wakes us.
            ready.clear()
            entries = await asyncio.to_thread(
                outbox.due,
                settings.pump_batch,
                resend_after_s=settings.receipt_timeout_s,
                now=time.monotonic(),
            )
            if not entries:
                await sleep_unless_set(ready, settings.pump_idle_s)
                continue
            started = time.monotonic()
            await self._publish_batch(connection, entries)
            # Pacing per batch: a batch of n takes at least n / rate seconds.
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, len(entries) / settings.drain_rate_per_s - elapsed))

    async def _publish_batch(self, connection: Connection, entries: list[OutboxEntry]) -> None:
        """Publish ``entries`` pipelined (sent in order, PUBACKs awaited together)."""
        outbox = self._outbox
        results = await asyncio.gather(
            *(connection.publish_entry(entry) for entry in entries), return_exceptions=True
        )
        sent: list[int] = []
        unsendable: list[str] = []
        failure: BaseException | None = None
        for entry, result in zip(entries, results, strict=True):
            if result is None:
                sent.append(entry.seq)
            elif isinstance(result, PayloadTooLargeError):
                # Stored by an agent with a larger limit; no broker of this fleet takes it.
                logger.error("dropping outbox entry message_id=%s: %s", entry.message_id, result)
                unsendable.append(entry.message_id)
            elif failure is None:
                failure = result
        if sent:
            await asyncio.to_thread(outbox.mark_sent, sent, time.monotonic())
        if unsendable:
            await asyncio.to_thread(outbox.confirm, unsendable)
        if failure is not None:
            raise failure
        delivery_logger.debug("published %d outbox entries, depth %d", len(sent), outbox.depth())

    async def inbound(self, connection: Connection) -> None:
        """Dispatch delivered messages; this loop is also what notices a dropped connection."""
        async with contextlib.aclosing(connection.messages()) as messages:
            async for message in messages:
                await self.handle(message)

    async def handle(self, message: InboundMessage) -> None:
        """Dispatch one delivered message; a handler that fails is logged, not raised."""
        try:
            await self._dispatch(message)
        except Exception:
            # A supervisor of handlers: a message that breaks one (a retained desired
            # state, redelivered at every connect) must not take the session down.
            logger.exception("handling a message on %s failed; dropped", message.topic)

    async def _dispatch(self, message: InboundMessage) -> None:
        try:
            topic = parse_device_topic(message.topic, prefix=self._identity.topic_prefix)
        except InvalidTopicError as exc:
            logger.warning("dropped a message on an unexpected topic: %s", exc)
            return
        if topic.device_id != self._identity.device_id:
            logger.warning("dropped a message for another device on %s", message.topic)
            return
        if topic.kind is TopicKind.RECEIPTS:
            try:
                receipt = decode(ReceiptMessage, message.payload)
            except MalformedPayloadError as exc:
                delivery_logger.warning("dropped a malformed receipt: %s", exc)
                return
            confirmed = await asyncio.to_thread(self._outbox.confirm, receipt.message_ids)
            delivery_logger.debug(
                "receipt named %d messages, %d were waiting; depth %d",
                len(receipt.message_ids),
                confirmed,
                self._outbox.depth(),
            )
        elif topic.kind is TopicKind.COMMANDS:
            await self._commands.put(message.payload)
        elif topic.kind is TopicKind.DESIRED:
            if not message.payload:
                # The service cleared its retained desired state: nothing to converge to.
                logger.debug("desired state cleared; keeping the current config")
                return
            reported = self._desired.apply(message.payload)
            if reported is not None:
                await self.report(reported)
        elif topic.kind is TopicKind.CERTIFICATE and self._certificates is not None:
            await self._certificates(message.payload)
        else:
            logger.warning("dropped a %s message: devices do not receive those", topic.kind.value)
