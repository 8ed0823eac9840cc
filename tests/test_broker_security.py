"""The broker's mTLS listener and ACL, checked against a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from broker import BrokerConfig, MosquittoSupervisor, render_broker_files
from fleet_protocol import TopicKind, device_topic, subscription_for
from tests.fixtures.broker import RunningBroker, make_broker_config, tls_context
from tests.fixtures.pki import FleetPki, Identity

DEVICE_A = "dev-aaaa0001"
DEVICE_B = "dev-bbbb0002"
WAIT = 5.0
# An MQTT 3.1.1 CONNECT with an empty client id and a clean session; the broker answers a
# client it accepts with CONNACK 0x20 0x02 0x00 0x00.
CONNECT_PACKET = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    """The next message ``client`` receives, or fail the test after ``WAIT`` seconds."""
    async with asyncio.timeout(WAIT):
        return await anext(aiter(client.messages))


async def mqtt_connect(broker: RunningBroker, identity: Identity | None) -> bytes:
    """Send CONNECT over TLS with ``identity``'s certificate; return the broker's first bytes.

    A refused client gets an empty answer, however the refusal shows (a TLS alert, a reset, an
    EOF). Raw TLS rather than an MQTT client: with TLS 1.3 the broker refuses a client
    certificate after the client's side of the handshake is done, and aiomqtt then waits out
    its whole timeout instead of reporting the refusal.
    """
    context = tls_context(broker.pki.ca_file, identity)
    async with asyncio.timeout(WAIT):
        try:
            reader, writer = await asyncio.open_connection(broker.host, broker.port, ssl=context)
        except (ssl.SSLError, ConnectionError):
            return b""
        try:
            writer.write(CONNECT_PACKET)
            await writer.drain()
            return await reader.read(len(CONNACK_ACCEPTED))
        except (ssl.SSLError, ConnectionError):
            return b""
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()


async def broker_logged(broker: RunningBroker, text: str) -> bool:
    """Whether mosquitto's log shows ``text`` within ``WAIT`` (it logs after sending alerts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while text not in broker.config.log_path.read_text(errors="replace"):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_client_with_a_fleet_certificate_is_accepted(broker: RunningBroker) -> None:
    assert await mqtt_connect(broker, broker.pki.client(DEVICE_A)) == CONNACK_ACCEPTED


async def test_client_without_certificate_is_refused(broker: RunningBroker) -> None:
    assert await mqtt_connect(broker, None) == b""
    assert await broker_logged(broker, "peer did not return a certificate")


async def test_client_with_certificate_from_another_ca_is_refused(
    broker: RunningBroker, other_ca_pki: FleetPki
) -> None:
    # Same CN as a real device: only the issuing CA differs.
    assert await mqtt_connect(broker, other_ca_pki.client(DEVICE_A)) == b""
    assert await broker_logged(broker, "certificate verify failed")


async def test_device_telemetry_reaches_the_service(broker: RunningBroker) -> None:
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE_A)) as device,
    ):
        await service.subscribe(subscription_for(TopicKind.TELEMETRY), qos=1)
        await device.publish(device_topic(DEVICE_A, TopicKind.TELEMETRY), b"a-1", qos=1)
        message = await next_message(service)
    assert message.topic.value == device_topic(DEVICE_A, TopicKind.TELEMETRY)
    assert message.payload == b"a-1"


async def test_service_shared_subscription_receives_telemetry(broker: RunningBroker) -> None:
    # Service replicas split ingestion with MQTT 5 shared subscriptions; the ACL must allow them.
    shared = f"$share/ingest/{subscription_for(TopicKind.TELEMETRY)}"
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE_A)) as device,
    ):
        await service.subscribe(shared, qos=1)
        await device.publish(device_topic(DEVICE_A, TopicKind.TELEMETRY), b"a-1", qos=1)
        message = await next_message(service)
    assert message.payload == b"a-1"


async def test_device_cannot_publish_to_another_devices_topics(broker: RunningBroker) -> None:
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE_A)) as device_a,
    ):
        await service.subscribe(f"{broker.config.topic_prefix}/#", qos=1)
        for kind in (TopicKind.TELEMETRY, TopicKind.STATUS, TopicKind.ACKS):
            await device_a.publish(device_topic(DEVICE_B, kind), b"forged", qos=1)
        # A device may not write what it is sent either, not even in its own subtree.
        await device_a.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"forged", qos=1)
        # The broker handles one connection's publishes in order, so once this marker is in,
        # any forged message would have been delivered before it.
        await device_a.publish(device_topic(DEVICE_A, TopicKind.TELEMETRY), b"marker", qos=1)
        message = await next_message(service)
    assert (message.topic.value, message.payload) == (
        device_topic(DEVICE_A, TopicKind.TELEMETRY),
        b"marker",
    )


async def test_device_cannot_read_another_devices_commands(broker: RunningBroker) -> None:
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE_A)) as device_a,
    ):
        await device_a.subscribe(device_topic(DEVICE_B, TopicKind.COMMANDS), qos=1)
        await device_a.subscribe(device_topic(DEVICE_A, TopicKind.COMMANDS), qos=1)
        await service.publish(device_topic(DEVICE_B, TopicKind.COMMANDS), b"for-b", qos=1)
        await service.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"for-a", qos=1)
        message = await next_message(device_a)
    assert (message.topic.value, message.payload) == (
        device_topic(DEVICE_A, TopicKind.COMMANDS),
        b"for-a",
    )


async def test_device_wildcard_subscription_gets_nothing_of_other_devices(
    broker: RunningBroker,
) -> None:
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE_A)) as device_a,
        broker.client(broker.pki.client(DEVICE_B)) as device_b,
    ):
        await device_a.subscribe("#", qos=1)
        await device_b.publish(device_topic(DEVICE_B, TopicKind.TELEMETRY), b"b-data", qos=1)
        await device_b.publish(device_topic(DEVICE_B, TopicKind.STATUS), b"b-up", qos=1)
        for kind in (TopicKind.COMMANDS, TopicKind.DESIRED, TopicKind.RECEIPTS):
            await service.publish(device_topic(DEVICE_B, kind), b"for-b", qos=1)
        await service.publish("$SYS/edgefleet/test", b"sys", qos=1)
        await service.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"marker", qos=1)
        message = await next_message(device_a)
    assert (message.topic.value, message.payload) == (
        device_topic(DEVICE_A, TopicKind.COMMANDS),
        b"marker",
    )


@pytest.mark.parametrize(
    ("protocol", "qos"),
    [
        (aiomqtt.ProtocolVersion.V5, 0),
        (aiomqtt.ProtocolVersion.V311, 0),
        (aiomqtt.ProtocolVersion.V311, 1),
    ],
    ids=["v5-qos0", "v311-qos0", "v311-qos1"],
)
async def test_oversized_message_is_dropped_and_the_connection_carries_on(
    broker: RunningBroker, protocol: aiomqtt.ProtocolVersion, qos: int
) -> None:
    # MQTT 5 with QoS 1 is not here: mosquitto 2.0.11 answers it with a PUBACK that paho-mqtt
    # rejects as malformed (see broker/templates/mosquitto.conf.tmpl), so the agent checks sizes
    # before publishing instead.
    topic = device_topic(DEVICE_A, TopicKind.TELEMETRY)
    too_big = b"x" * (broker.config.max_payload_bytes + 1)
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE_A), protocol=protocol) as device_a,
    ):
        await service.subscribe(topic, qos=1)
        await device_a.publish(topic, b"before", qos=qos)
        await device_a.publish(topic, too_big, qos=qos)
        await device_a.publish(topic, b"after", qos=qos)
        received = [(await next_message(service)).payload for _ in range(2)]
    assert received == [b"before", b"after"]


async def test_second_connection_with_the_same_certificate_takes_over(
    broker: RunningBroker,
) -> None:
    identity = broker.pki.client(DEVICE_A)
    async with broker.client(broker.pki.service) as service:
        await service.subscribe(device_topic(DEVICE_A, TopicKind.TELEMETRY), qos=1)
        first = broker.client(identity)
        await first.__aenter__()
        try:
            async with broker.client(identity) as second:
                with pytest.raises(aiomqtt.MqttError):
                    await next_message(first)
                await second.publish(device_topic(DEVICE_A, TopicKind.TELEMETRY), b"2nd", qos=1)
                message = await next_message(service)
        finally:
            await first.__aexit__(None, None, None)
    assert message.payload == b"2nd"


def test_rendered_config_has_a_single_mtls_listener(broker_config: BrokerConfig) -> None:
    lines = render_broker_files(broker_config).conf_text.splitlines()
    assert [line for line in lines if line.startswith("listener ")] == [
        f"listener {broker_config.port} 127.0.0.1"
    ]
    for directive in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ):
        assert directive in lines


@pytest.mark.parametrize(
    "change",
    [
        {"key_file": Path("keys/a key\nlistener 1883")},
        {"run_as_user": "root\nallow_anonymous true"},
        {"topic_prefix": "fleet/#"},
        {"max_payload_bytes": 2_000_000},
    ],
    ids=["path-with-newline", "user-with-newline", "wildcard-prefix", "payload-over-packet"],
)
def test_config_refuses_values_that_would_weaken_the_broker(
    fleet_pki: FleetPki, tmp_path: Path, change: dict[str, Any]
) -> None:
    config = make_broker_config(fleet_pki, tmp_path)
    with pytest.raises(ValueError, match=r"broker setting|topic_prefix|max_payload_bytes"):
        render_broker_files(dataclasses.replace(config, **change))


async def test_reader_identity_reads_what_devices_send_but_not_what_they_are_sent(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    config = make_broker_config(fleet_pki, tmp_path / "broker", reader_identities=("tap",))
    async with MosquittoSupervisor(config) as supervisor:
        running = RunningBroker(config.bind_host, config.port, fleet_pki, config, supervisor)
        async with (
            running.client(fleet_pki.client("tap")) as tap,
            running.client(fleet_pki.client(DEVICE_A)) as device,
            running.client(fleet_pki.service) as service,
        ):
            await tap.subscribe(f"{config.topic_prefix}/devices/#", qos=1)
            # A desired state carries the keys of encrypted releases; commands carry parameters.
            await service.publish(
                device_topic(DEVICE_A, TopicKind.DESIRED), b"secret-key", qos=1, retain=True
            )
            await service.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"cmd", qos=1)
            result = device_topic(DEVICE_A, TopicKind.RESULTS, model="detector")
            await device.publish(result, b"r-1", qos=1)
            seen = await next_message(tap)
    assert (str(seen.topic), seen.payload) == (result, b"r-1")


async def test_reader_identity_reads_every_device_but_cannot_write(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    config = make_broker_config(fleet_pki, tmp_path / "broker", reader_identities=("tap",))
    async with MosquittoSupervisor(config) as supervisor:
        running = RunningBroker(config.bind_host, config.port, fleet_pki, config, supervisor)
        async with (
            running.client(fleet_pki.client("tap")) as tap,
            running.client(fleet_pki.client(DEVICE_A)) as device,
            running.client(fleet_pki.service) as service,
        ):
            await tap.subscribe(f"{config.topic_prefix}/devices/#", qos=1)
            await service.subscribe(f"{config.topic_prefix}/#", qos=1)
            await tap.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"forged", qos=1)
            await device.publish(device_topic(DEVICE_A, TopicKind.TELEMETRY), b"a-1", qos=1)
            seen_by_tap = await next_message(tap)
            seen_by_service = await next_message(service)
    assert seen_by_tap.payload == b"a-1"
    assert seen_by_service.payload == b"a-1", "the tap's forged command must not be delivered"
