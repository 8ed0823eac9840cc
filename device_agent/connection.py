"""The device's mTLS MQTT v5 session; the only module that touches aiomqtt and paho.

One :func:`connect` is one broker connection. The session itself outlives it: we connect with
``clean_start=False`` and a session expiry interval, and subscribe to the device's ``commands``,
``receipts``, ``desired`` and ``certificate`` topics at QoS 1, so what is sent to the device
while it is away waits at the broker and arrives when it comes back. Each connection reads the
key and certificate from the state dir afresh, so one made after a renewal uses the new pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from device_agent import __version__
from device_agent.config import AgentSettings
from device_agent.errors import ConnectionLostError, CorruptStateError, PayloadTooLargeError
from device_agent.outbox import OutboxEntry
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    MAX_PAYLOAD_BYTES,
    DeviceMessage,
    DeviceState,
    StatusMessage,
    TopicKind,
    device_topic,
)

__all__ = [
    "INBOUND_KINDS",
    "LOST_REASON",
    "PAHO_LOGGER_NAME",
    "Connection",
    "InboundMessage",
    "build_tls_context",
    "connect",
    "mqtt_keepalive",
]

logger = logging.getLogger(__name__)

# paho logs every packet at DEBUG; it gets its own logger so the CLI can keep it quiet.
PAHO_LOGGER_NAME = f"{__name__}.paho"

# The Last Will's reason: what the fleet sees when the broker, not the agent, ends the session.
LOST_REASON = "connection lost"

# Every device-originated message is QoS 1: the service deduplicates by message id, so
# at-least-once is exactly what the contract wants (DESIGN.md, topic table).
_QOS = 1

# MQTT v5 DISCONNECT reason "Session taken over": a second connection used our client id.
_SESSION_TAKEN_OVER = 0x8E

# What the service sends to a device (DESIGN.md, topic table), all QoS 1 into its session.
INBOUND_KINDS = (
    TopicKind.COMMANDS,
    TopicKind.RECEIPTS,
    TopicKind.DESIRED,
    TopicKind.CERTIFICATE,
)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message the broker delivered to this device."""

    topic: str
    payload: bytes
    retain: bool


def build_tls_context(state: StateDir) -> ssl.SSLContext:
    """mTLS client context: trust only the fleet CA, present the device cert, TLS 1.2 or later.

    Host name checking stays on, so the broker's certificate must name ``mqtt_host``. Reads
    files: call it from a thread when on an event loop.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=state.ca_path)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=state.cert_path, keyfile=state.key_path)
    except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; named for the reader
        raise CorruptStateError(
            f"cannot load the TLS identity from {state.root} ({exc}); enroll again with "
            f"`edgefleet-agent enroll TOKEN --state-dir {state.root} --force`"
        ) from exc
    return context


class Connection:
    """An open MQTT connection for one device; publishes typed messages on its own topics."""

    def __init__(
        self, client: aiomqtt.Client, identity: DeviceIdentity, *, publish_timeout_s: float
    ) -> None:
        self._client = client
        self._identity = identity
        self._publish_timeout_s = publish_timeout_s

    @property
    def identity(self) -> DeviceIdentity:
        """The device this connection speaks for."""
        return self._identity

    def topic(self, kind: TopicKind, *, model: str | None = None) -> str:
        """This device's topic of ``kind`` under its fleet's prefix."""
        return device_topic(
            self._identity.device_id, kind, prefix=self._identity.topic_prefix, model=model
        )

    async def publish(
        self,
        kind: TopicKind,
        message: DeviceMessage,
        *,
        retain: bool = False,
        model: str | None = None,
    ) -> None:
        """Publish ``message`` at QoS 1 and wait for the broker's PUBACK."""
        await self._publish_payload(kind, message.to_payload(), model=model, retain=retain)

    async def publish_entry(self, entry: OutboxEntry) -> None:
        """Publish an outbox entry's stored payload as it is, at QoS 1; wait for the PUBACK."""
        await self._publish_payload(
            entry.kind, entry.payload, model=entry.model, retain=entry.retain
        )

    async def publish_status(self, state: DeviceState, *, reason: str | None = None) -> None:
        """Publish the retained ``status`` message (birth ``online`` or a clean ``offline``).

        Published directly, not through the outbox: it is a live signal, not data to replay.
        """
        message = StatusMessage(state=state, agent_version=__version__, reason=reason)
        await self.publish(TopicKind.STATUS, message, retain=True)

    async def subscribe_inbound(self) -> None:
        """Subscribe at QoS 1 to what the service sends this device (:data:`INBOUND_KINDS`).

        The persistent session keeps these subscriptions, but saying them again on every
        connection costs one round trip and covers a session the broker has expired. Messages
        queued while the device was away may arrive before the SUBACK; :meth:`messages` yields
        them all the same.
        """
        options = SubscribeOptions(qos=_QOS)
        topics = [(self.topic(kind), options) for kind in INBOUND_KINDS]
        try:
            granted = await self._client.subscribe(topics, timeout=self._publish_timeout_s)
        except aiomqtt.MqttError as exc:
            raise ConnectionLostError(
                f"subscribing to this device's topics on {self._broker} failed: "
                f"{_describe(exc)}; the connection will be re-established"
            ) from exc
        refused = [
            topic
            for (topic, _), code in zip(topics, granted, strict=False)
            if _subscription_refused(code)
        ]
        if refused:
            # Not fatal: telemetry still flows. The broker's ACL is what to look at.
            logger.error(
                "the broker refused subscriptions to %s; commands, receipts or desired state "
                "will not arrive (check the broker's ACL for this device)",
                ", ".join(refused),
            )

    async def _publish_payload(
        self, kind: TopicKind, payload: bytes, *, model: str | None, retain: bool
    ) -> None:
        topic = self.topic(kind, model=model)
        if len(payload) > MAX_PAYLOAD_BYTES:
            # Checked here: Mosquitto 2.0 answers an oversized MQTT 5 QoS 1 publish with a PUBACK
            # that paho reads as a protocol error, dropping the connection (broker/templates).
            raise PayloadTooLargeError(
                f"{kind.value} message of {len(payload)} bytes exceeds the protocol limit of "
                f"{MAX_PAYLOAD_BYTES} bytes; it was not sent"
            )
        try:
            await self._client.publish(
                topic,
                payload,
                qos=_QOS,
                retain=retain,
                timeout=self._publish_timeout_s,
            )
        except aiomqtt.MqttError as exc:
            raise ConnectionLostError(
                f"publishing to {topic} on {self._broker} failed: {_describe(exc)}; the "
                "connection is presumed dead and will be re-established"
            ) from exc

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """Yield delivered messages until the connection drops, then raise ConnectionLostError.

        Even with no subscriptions this is how a dropped connection is noticed promptly, so the
        agent always keeps one task iterating it.
        """
        try:
            async for message in self._client.messages:
                yield InboundMessage(
                    topic=message.topic.value,
                    payload=_as_bytes(message.payload),
                    retain=message.retain,
                )
        except aiomqtt.MqttError as exc:
            raise ConnectionLostError(
                f"connection to {self._broker} lost: {_describe(exc)}"
            ) from exc

    def take_unread(self) -> list[InboundMessage]:
        """Messages the broker delivered that :meth:`messages` has not yielded; empties them.

        Called once the connection is closed on purpose (a switch to a renewed certificate):
        paho acknowledged these on arrival, so the broker will not send them again.
        """
        # aiomqtt has no public non-blocking read of its queue; this is the one place that
        # reaches into it.
        pending = self._client._queue
        unread: list[InboundMessage] = []
        while not pending.empty():
            message = pending.get_nowait()
            unread.append(
                InboundMessage(
                    topic=message.topic.value,
                    payload=_as_bytes(message.payload),
                    retain=message.retain,
                )
            )
        return unread

    @property
    def _broker(self) -> str:
        return f"{self._identity.mqtt_host}:{self._identity.mqtt_port}"


@contextlib.asynccontextmanager
async def connect(
    identity: DeviceIdentity, state: StateDir, settings: AgentSettings
) -> AsyncIterator[Connection]:
    """Connect to the fleet broker as ``identity``, subscribed to its inbound topics.

    Disconnects cleanly on exit.

    Raises ConnectionLostError when the broker cannot be reached, refuses us, or drops us while
    connecting or disconnecting. Leaving the block without a clean disconnect (a crash, a lost
    network) makes the broker publish the retained Last Will ``offline``.
    """
    context = await asyncio.to_thread(build_tls_context, state)
    # paho's Properties is not annotated; it is a plain container for CONNECT properties.
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = settings.session_expiry_s
    broker = f"{identity.mqtt_host}:{identity.mqtt_port}"
    client = aiomqtt.Client(
        identity.mqtt_host,
        identity.mqtt_port,
        identifier=identity.device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
        keepalive=mqtt_keepalive(settings.keepalive_s),
        will=_last_will(identity),
        tls_context=context,
        # Small MQTT packets (an ack right after a PUBACK) otherwise wait ~40 ms on Nagle and
        # delayed ACKs; bench/commands.py measured the round trip at 93 ms with it, 11 without.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        # aiomqtt's default timeout for broker round trips; the CONNACK wait is the one that
        # matters here, publishes pass their own.
        timeout=settings.connect_timeout_s,
        logger=logging.getLogger(PAHO_LOGGER_NAME),
    )
    try:
        async with client:
            logger.info(
                "connected to %s device_id=%s session_expiry_s=%d",
                broker,
                identity.device_id,
                settings.session_expiry_s,
            )
            connection = Connection(client, identity, publish_timeout_s=settings.publish_timeout_s)
            await connection.subscribe_inbound()
            yield connection
    except aiomqtt.MqttError as exc:
        raise ConnectionLostError(
            f"MQTT connection to {broker} as {identity.device_id} failed: {_describe(exc)}; check "
            "that the broker is up and reachable and that this device has not been revoked"
        ) from exc


# aiomqtt runs paho's keepalive check once a second.
_KEEPALIVE_TICK_S = 1


def mqtt_keepalive(keepalive_s: int) -> int:
    """The MQTT keepalive to advertise so a dead link is noticed within 1.5 x ``keepalive_s``.

    paho-mqtt 2.2 pings every advertised keepalive A whatever else flows (its last-message-out
    time is not refreshed on writes, eclipse-paho/paho.mqtt.python#813) and gives up one A after
    an unanswered ping: a half-open link is noticed up to 2A + one check tick after it died.
    Advertising A = (1.5 x keepalive_s - tick) / 2 keeps that within 1.5 x keepalive_s; the
    broker drops a silent agent after 1.5 x A, sooner than before.
    """
    return max(1, int((1.5 * keepalive_s - _KEEPALIVE_TICK_S) // 2))


def _last_will(identity: DeviceIdentity) -> aiomqtt.Will:
    # Retained, so anyone who subscribes later still learns the device went away uncleanly.
    message = StatusMessage(
        state=DeviceState.OFFLINE, agent_version=__version__, reason=LOST_REASON
    )
    topic = device_topic(identity.device_id, TopicKind.STATUS, prefix=identity.topic_prefix)
    return aiomqtt.Will(topic=topic, payload=message.to_payload(), qos=_QOS, retain=True)


def _subscription_refused(code: object) -> bool:
    # MQTT 5 SUBACK reason codes of 0x80 and above are failures; v3.1.1 returns 0x80 as an int.
    value = code.value if isinstance(code, ReasonCode) else code
    return isinstance(value, int) and value >= 0x80


def _describe(exc: aiomqtt.MqttError) -> str:
    """aiomqtt's message plus the reason it wraps ("Disconnected" alone says nothing)."""
    text = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text = f"{text} ({cause})"
    codes = {getattr(getattr(e, "rc", None), "value", None) for e in (exc, cause)}
    if _SESSION_TAKEN_OVER in codes:
        text += (
            "; another client connected with this device's identity and took over its session "
            "(is a copy of this state dir running elsewhere?)"
        )
    return text


def _as_bytes(payload: object) -> bytes:
    # paho always hands over bytes for received messages; aiomqtt's type is wider than that.
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()
