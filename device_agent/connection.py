"""The device's mTLS MQTT v5 session; the only module that touches aiomqtt and paho.

One :func:`connect` is one broker connection. The session itself outlives it: we connect with
``clean_start=False`` and a session expiry interval, so QoS 1 messages for this device (commands,
desired state) wait at the broker while the device is away and arrive when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent import __version__
from device_agent.config import AgentSettings
from device_agent.errors import ConnectionLostError, CorruptStateError, PayloadTooLargeError
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    MAX_PAYLOAD_BYTES,
    DeviceMessage,
    DeviceState,
    StatusMessage,
    TelemetryMessage,
    TopicKind,
    device_topic,
)

__all__ = [
    "LOST_REASON",
    "PAHO_LOGGER_NAME",
    "Connection",
    "InboundMessage",
    "build_tls_context",
    "connect",
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
        topic = self.topic(kind, model=model)
        payload = message.to_payload()
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

    async def publish_status(self, state: DeviceState, *, reason: str | None = None) -> None:
        """Publish the retained ``status`` message (birth ``online`` or a clean ``offline``)."""
        message = StatusMessage(state=state, agent_version=__version__, reason=reason)
        await self.publish(TopicKind.STATUS, message, retain=True)

    async def publish_telemetry(self, message: TelemetryMessage) -> None:
        """Publish one telemetry sample."""
        await self.publish(TopicKind.TELEMETRY, message)

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

    @property
    def _broker(self) -> str:
        return f"{self._identity.mqtt_host}:{self._identity.mqtt_port}"


@contextlib.asynccontextmanager
async def connect(
    identity: DeviceIdentity, state: StateDir, settings: AgentSettings
) -> AsyncIterator[Connection]:
    """Connect to the fleet broker as ``identity``; disconnect cleanly on exit.

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
        keepalive=settings.keepalive_s,
        will=_last_will(identity),
        tls_context=context,
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
            yield Connection(client, identity, publish_timeout_s=settings.publish_timeout_s)
    except aiomqtt.MqttError as exc:
        raise ConnectionLostError(
            f"MQTT connection to {broker} as {identity.device_id} failed: {_describe(exc)}; check "
            "that the broker is up and reachable and that this device has not been revoked"
        ) from exc


def _last_will(identity: DeviceIdentity) -> aiomqtt.Will:
    # Retained, so anyone who subscribes later still learns the device went away uncleanly.
    message = StatusMessage(
        state=DeviceState.OFFLINE, agent_version=__version__, reason=LOST_REASON
    )
    topic = device_topic(identity.device_id, TopicKind.STATUS, prefix=identity.topic_prefix)
    return aiomqtt.Will(topic=topic, payload=message.to_payload(), qos=_QOS, retain=True)


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
