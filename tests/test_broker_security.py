"""The broker's mTLS listener and ACL, checked against a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import ssl
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import BrokerConfig, MosquittoSupervisor, ReadGrant, render_broker_files
from device_agent.config import AgentSettings
from fleet_protocol import TopicKind, device_topic, subscription_for
from fleet_service.pki import (
    Revocation,
    build_crl,
    issue_client_cert,
    load_certificate,
    write_crl,
)
from fleet_service.revocation import BrokerTarget, drop_session
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


# --- issue 6: session takeover, $SYS, retained messages, session expiry, CRL, read grants ---

SYS_WATCHER = "sys-watcher"
# How long a test waits to be sure a message does not come (mosquitto delivers in milliseconds).
QUIET = 1.0


async def no_message(client: aiomqtt.Client, wait: float = QUIET) -> aiomqtt.Message | None:
    """The message ``client`` receives within ``wait``, or None (the expected outcome)."""
    try:
        async with asyncio.timeout(wait):
            return await anext(aiter(client.messages))
    except TimeoutError:
        return None


def paho_connect(
    broker: RunningBroker, identity: Identity, *, session_expiry_s: int, clean_start: bool
) -> tuple[mqtt.Client, bool]:
    """A connected MQTT v5 paho client (blocking); and whether the broker had its session."""
    connected: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set_context(tls_context(broker.pki.ca_file, identity))
    client.on_connect = lambda _c, _u, flags, _rc, _p: connected.put(flags.session_present)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    client.connect(broker.host, broker.port, clean_start=clean_start, properties=properties)
    client.loop_start()
    try:
        return client, connected.get(timeout=WAIT)
    except queue.Empty:
        client.loop_stop()
        pytest.fail("no CONNACK")


def vanish(broker: RunningBroker, identity: Identity, *, session_expiry_s: int) -> None:
    """Connect with a persistent session and a subscription, then die without DISCONNECT."""
    process = subprocess.Popen(
        [
            "mosquitto_sub",
            *("-h", broker.host, "-p", str(broker.port), "-V", "mqttv5"),
            *("--cafile", str(broker.pki.ca_file)),
            *("--cert", str(identity.cert_file), "--key", str(identity.key_file)),
            # -c keeps the session; the client id is replaced by the certificate's CN anyway.
            *("-c", "-i", identity.name, "-x", str(session_expiry_s), "-q", "1"),
            *("-t", device_topic(identity.name, TopicKind.COMMANDS)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # connect and subscribe
    alive = process.poll() is None
    process.kill()  # SIGKILL: the broker sees the socket close, no DISCONNECT
    _, errors = process.communicate(timeout=WAIT)
    assert alive, errors.decode(errors="replace")


def sys_watch_config(pki: FleetPki, directory: Path, **overrides: Any) -> BrokerConfig:
    # A test-only identity allowed to read $SYS: proof that $SYS messages exist, so a device
    # seeing none of them means the ACL stops it, not that the broker sends none.
    grant = ReadGrant(SYS_WATCHER, ("$SYS/#",))
    return make_broker_config(pki, directory, read_grants=(grant,), **overrides)


async def test_device_cannot_take_over_another_devices_session_by_asking_for_its_id(
    broker: RunningBroker,
) -> None:
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE_A)) as device_a,
    ):
        await device_a.subscribe(device_topic(DEVICE_A, TopicKind.COMMANDS), qos=1)
        context = tls_context(broker.pki.ca_file, broker.pki.client(DEVICE_B))
        # Device B asks for A's client id; the broker names it after its certificate instead.
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=DEVICE_A,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=context,
            timeout=WAIT,
        ) as impostor:
            await impostor.subscribe(device_topic(DEVICE_A, TopicKind.COMMANDS), qos=1)
            await service.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"for-a", qos=1)
            # A still holds its connection and gets its command; B gets nothing of A's.
            assert (await next_message(device_a)).payload == b"for-a"
            assert await no_message(impostor) is None
    assert await broker_logged(broker, f"as {DEVICE_B}")


async def test_device_cannot_read_sys_topics(fleet_pki: FleetPki, tmp_path: Path) -> None:
    config = sys_watch_config(fleet_pki, tmp_path / "broker")
    async with MosquittoSupervisor(config) as supervisor:
        running = RunningBroker(config.bind_host, config.port, fleet_pki, config, supervisor)
        async with (
            running.client(fleet_pki.client(SYS_WATCHER)) as watcher,
            running.client(fleet_pki.client(DEVICE_A)) as device,
            running.client(fleet_pki.service) as service,
        ):
            await watcher.subscribe("$SYS/broker/version", qos=0)
            # Retained: the watcher gets it at once, so $SYS is there to be read.
            version = await next_message(watcher)
            assert b"mosquitto" in bytes(version.payload)
            for topic in ("$SYS/#", "$SYS/broker/version", "#"):
                await device.subscribe(topic, qos=0)
            await service.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"marker", qos=1)
            first = await next_message(device)
    assert (first.topic.value, first.payload) == (
        device_topic(DEVICE_A, TopicKind.COMMANDS),
        b"marker",
    )


async def test_device_cannot_write_sys_topics(fleet_pki: FleetPki, tmp_path: Path) -> None:
    config = sys_watch_config(fleet_pki, tmp_path / "broker")
    async with MosquittoSupervisor(config) as supervisor:
        running = RunningBroker(config.bind_host, config.port, fleet_pki, config, supervisor)
        async with running.client(fleet_pki.client(DEVICE_A)) as device:
            await device.publish("$SYS/broker/version", b"forged", qos=1, retain=True)
            await device.publish("$SYS/edgefleet/forged", b"forged", qos=1, retain=True)
        async with running.client(fleet_pki.client(SYS_WATCHER)) as watcher:
            await watcher.subscribe("$SYS/broker/version", qos=0)
            version = await next_message(watcher)
            await watcher.subscribe("$SYS/edgefleet/#", qos=0)
            forged = await no_message(watcher)
    assert version.payload != b"forged"
    assert forged is None


async def test_device_cannot_leave_retained_messages_on_another_devices_topics(
    broker: RunningBroker,
) -> None:
    async with broker.client(broker.pki.client(DEVICE_A)) as device_a:
        for kind in (TopicKind.STATUS, TopicKind.REPORTED, TopicKind.DESIRED):
            await device_a.publish(device_topic(DEVICE_B, kind), b"forged", qos=1, retain=True)
    async with broker.client(broker.pki.client(DEVICE_B)) as device_b:
        await device_b.publish(
            device_topic(DEVICE_B, TopicKind.STATUS), b"b-own", qos=1, retain=True
        )
    async with broker.client(broker.pki.service) as service:
        # A fresh subscription gets every retained message under B at once.
        await service.subscribe(f"{broker.config.topic_prefix}/devices/{DEVICE_B}/#", qos=1)
        first = await next_message(service)
        rest = await no_message(service)
        # Clean up: the broker is per test, but say what a service would do.
        await service.publish(device_topic(DEVICE_B, TopicKind.STATUS), b"", qos=1, retain=True)
    assert (first.topic.value, first.payload) == (
        device_topic(DEVICE_B, TopicKind.STATUS),
        b"b-own",
    )
    assert rest is None


async def test_session_of_a_vanished_client_expires(broker: RunningBroker) -> None:
    identity = broker.pki.client("dev-vanish0001")
    # Control: back within its session expiry, the broker still has the session.
    await asyncio.to_thread(vanish, broker, identity, session_expiry_s=30)
    client, present = await asyncio.to_thread(
        paho_connect, broker, identity, session_expiry_s=2, clean_start=False
    )
    client.disconnect()  # a clean DISCONNECT: the 2 s expiry starts now
    client.loop_stop()
    assert present, "a session within its expiry must still be there"
    await asyncio.sleep(3.5)
    client, present = await asyncio.to_thread(
        paho_connect, broker, identity, session_expiry_s=0, clean_start=False
    )
    client.disconnect()
    client.loop_stop()
    assert not present, "the broker kept a session past its expiry"


async def test_session_of_a_client_killed_without_disconnect_expires(
    broker: RunningBroker,
) -> None:
    identity = broker.pki.client("dev-vanish0002")
    await asyncio.to_thread(vanish, broker, identity, session_expiry_s=2)
    await asyncio.sleep(3.5)
    client, present = await asyncio.to_thread(
        paho_connect, broker, identity, session_expiry_s=0, clean_start=False
    )
    client.disconnect()
    client.loop_stop()
    assert not present, "a vanished client's session outlived its expiry"


def test_rendered_config_expires_idle_sessions_and_checks_the_crl(
    broker_config: BrokerConfig, tmp_path: Path
) -> None:
    config = dataclasses.replace(broker_config, crl_file=tmp_path / "crl.pem")
    lines = render_broker_files(config).conf_text.splitlines()
    assert f"persistent_client_expiration {config.persistent_client_expiration}" in lines
    assert f"crlfile {(tmp_path / 'crl.pem').resolve()}" in lines


def test_agent_asks_for_a_finite_session_expiry() -> None:
    # MQTT's 0xFFFFFFFF means "never expires"; the agent's default is a week.
    assert 0 < AgentSettings.model_fields["session_expiry_s"].default < 0xFFFF_FFFF


@pytest.mark.parametrize(
    "grant",
    [
        {"identity": "tap/evil", "topics": ()},
        {"identity": "tap", "topics": ("fleet/v1/devices/+/status\nuser x",)},
        {"identity": "tap", "topics": ("fleet/v1/#/status",)},
        {"identity": "tap", "topics": ("fleet v1",)},
    ],
    ids=["identity-with-slash", "topic-with-newline", "hash-not-last", "topic-with-space"],
)
def test_read_grant_refuses_what_would_inject_acl_lines(grant: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"identity|read grant"):
        ReadGrant(grant["identity"], grant["topics"])


def test_config_refuses_two_grant_sets_for_one_identity(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="repeat a name"):
        make_broker_config(
            fleet_pki,
            tmp_path,
            reader_identities=("tap",),
            read_grants=(ReadGrant("tap", ("fleet/v1/devices/+/status",)),),
        )


async def test_read_grant_reads_only_its_topics_and_cannot_publish(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    grant = ReadGrant("integration-t", (device_topic(DEVICE_A, TopicKind.TELEMETRY),))
    config = make_broker_config(fleet_pki, tmp_path / "broker", read_grants=(grant,))
    async with MosquittoSupervisor(config) as supervisor:
        running = RunningBroker(config.bind_host, config.port, fleet_pki, config, supervisor)
        async with (
            running.client(fleet_pki.client("integration-t")) as reader,
            running.client(fleet_pki.client(DEVICE_A)) as device_a,
            running.client(fleet_pki.client(DEVICE_B)) as device_b,
            running.client(fleet_pki.service) as service,
        ):
            await reader.subscribe("#", qos=1)
            await service.subscribe(f"{config.topic_prefix}/#", qos=1)
            await reader.publish(device_topic(DEVICE_A, TopicKind.COMMANDS), b"forged", qos=1)
            await reader.publish(device_topic(DEVICE_A, TopicKind.TELEMETRY), b"forged", qos=1)
            await device_b.publish(device_topic(DEVICE_B, TopicKind.TELEMETRY), b"b-1", qos=1)
            await device_a.publish(device_topic(DEVICE_A, TopicKind.STATUS), b"a-up", qos=1)
            await device_a.publish(device_topic(DEVICE_A, TopicKind.TELEMETRY), b"a-1", qos=1)
            seen_by_reader = await next_message(reader)
            seen_by_service = [(await next_message(service)).payload for _ in range(3)]
    assert (seen_by_reader.topic.value, seen_by_reader.payload) == (
        device_topic(DEVICE_A, TopicKind.TELEMETRY),
        b"a-1",
    )
    assert seen_by_service == [b"b-1", b"a-up", b"a-1"], "the reader's publishes got through"


async def test_acl_reload_stops_deliveries_to_an_existing_subscription(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    # Mosquitto 2.0.11 checks read grants per delivered message, so removing a grant and
    # reloading cuts a subscription made before; the policy loop relies on it.
    topic = device_topic(DEVICE_A, TopicKind.TELEMETRY)
    grant = ReadGrant("integration-r", (topic,))
    config = make_broker_config(fleet_pki, tmp_path / "broker", read_grants=(grant,))
    async with MosquittoSupervisor(config) as supervisor:
        running = RunningBroker(config.bind_host, config.port, fleet_pki, config, supervisor)
        async with (
            running.client(fleet_pki.client("integration-r")) as reader,
            running.client(fleet_pki.client(DEVICE_A)) as device,
        ):
            await reader.subscribe(topic, qos=1)
            await device.publish(topic, b"before", qos=1)
            assert (await next_message(reader)).payload == b"before"
            assert supervisor.set_read_grants((ReadGrant("integration-r"),))
            assert await supervisor.reload_confirmed(WAIT)
            await device.publish(topic, b"after", qos=1)
            assert await no_message(reader) is None


async def test_revoked_certificate_is_refused_once_the_crl_is_reloaded_and_its_session_dropped(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    device_id = "dev-revoke0001"
    crl_file = tmp_path / "crl.pem"
    write_crl(
        crl_file, build_crl(fleet_pki.ca_key, fleet_pki.ca_cert, [], lifetime=timedelta(days=1))
    )
    config = make_broker_config(fleet_pki, tmp_path / "broker", crl_file=crl_file)
    identity = fleet_pki.client(device_id)
    cert = load_certificate(identity.cert_file)
    async with MosquittoSupervisor(config) as supervisor:
        running = RunningBroker(config.bind_host, config.port, fleet_pki, config, supervisor)
        assert await mqtt_connect(running, identity) == CONNACK_ACCEPTED
        live, present = await asyncio.to_thread(
            paho_connect, running, identity, session_expiry_s=3600, clean_start=True
        )
        disconnected: queue.Queue[object] = queue.Queue()
        live.on_disconnect = lambda _c, _u, _f, rc, _p: disconnected.put(rc)
        try:
            revoked = Revocation(cert.serial_number, datetime.now(UTC))
            crl = build_crl(
                fleet_pki.ca_key, fleet_pki.ca_cert, [revoked], lifetime=timedelta(days=1)
            )
            write_crl(crl_file, crl)
            assert await supervisor.reload_confirmed(WAIT)
            # A new connection with the revoked certificate is refused...
            assert await mqtt_connect(running, identity) == b""
            # ...but the one already open is not re-verified: it must be dropped.
            assert live.is_connected()
            key, drop_cert = issue_client_cert(
                fleet_pki.ca_key, fleet_pki.ca_cert, device_id, timedelta(minutes=5)
            )
            target = BrokerTarget(running.host, running.port, fleet_pki.ca_file)
            await drop_session(target, key, drop_cert, timeout_s=WAIT)
            reason = await asyncio.to_thread(disconnected.get, timeout=WAIT)
        finally:
            live.loop_stop()
        assert reason is not None
        assert not live.is_connected()
        assert await broker_logged(running, f"Client {device_id} already connected, closing old")
    assert not present


async def test_dropping_a_session_also_discards_what_the_broker_kept_for_it(
    broker: RunningBroker,
) -> None:
    device_id = "dev-dropped001"
    identity = broker.pki.client(device_id)
    await asyncio.to_thread(vanish, broker, identity, session_expiry_s=3600)
    key, drop_cert = issue_client_cert(
        broker.pki.ca_key, broker.pki.ca_cert, device_id, timedelta(minutes=5)
    )
    target = BrokerTarget(broker.host, broker.port, broker.pki.ca_file)
    await drop_session(target, key, drop_cert, timeout_s=WAIT)
    client, present = await asyncio.to_thread(
        paho_connect, broker, identity, session_expiry_s=0, clean_start=False
    )
    client.disconnect()
    client.loop_stop()
    assert not present
