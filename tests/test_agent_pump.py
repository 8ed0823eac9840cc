"""A real Agent in-process against a real mosquitto: the outbox pump, receipts, resends, a broker
outage, inbound commands and desired state, and log forwarding."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import BrokerConfig, MosquittoSupervisor
from device_agent.agent import Agent, State
from device_agent.config import AgentSettings
from device_agent.connection import PAHO_LOGGER_NAME
from device_agent.logforward import DELIVERY_LOGGER_NAME, LogForwarder
from device_agent.outbox import Outbox, OutboxEntry
from device_agent.runtime import RuntimeState
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    AckMessage,
    AckStatus,
    CommandMessage,
    DesiredState,
    LogLevel,
    LogMessage,
    ReceiptMessage,
    ReportedState,
    RuntimeConfig,
    TelemetryMessage,
    TopicKind,
    decode,
    device_topic,
)
from tests.fixtures.broker import CLIENT_TIMEOUT, RunningBroker, tls_context
from tests.fixtures.pki import FleetPki

WAIT = 15.0


# --- helpers -------------------------------------------------------------------------------


def new_device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:12]}"


def enroll_by_hand(
    state_dir: Path, pki: FleetPki, device_id: str, host: str, port: int
) -> DeviceIdentity:
    """Write a state dir as `edgefleet-agent enroll` would, with a certificate from ``pki``."""
    issued = pki.client(device_id)
    identity = DeviceIdentity(
        device_id=device_id,
        service_url="https://127.0.0.1:9",
        mqtt_host=host,
        mqtt_port=port,
        topic_prefix="fleet/v1",
        enrolled_at=datetime.now(UTC),
    )
    StateDir(state_dir).write_enrollment(
        identity,
        key_pem=issued.key_file.read_bytes(),
        cert_pem=issued.cert_file.read_bytes(),
        ca_pem=pki.ca_file.read_bytes(),
        device_token="efd_test",
    )
    return identity


def agent_settings(state_dir: Path, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "telemetry_interval_s": 3600,  # one sample at start, unless a test wants a stream
        "receipt_timeout_s": 600,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "pump_idle_s": 0.05,
        "connect_timeout_s": 5,
    }
    values.update(overrides)
    return AgentSettings(**values)


def make_agent(tmp_path: Path, broker: RunningBroker, **overrides: Any) -> Agent:
    device_id = new_device_id()
    state_dir = tmp_path / device_id
    identity = enroll_by_hand(state_dir, broker.pki, device_id, broker.host, broker.port)
    return Agent(agent_settings(state_dir, **overrides), identity)


def topic(agent: Agent, kind: TopicKind) -> str:
    return device_topic(agent.identity.device_id, kind)


@contextlib.asynccontextmanager
async def running(agent: Agent, *, wait_online: bool = True) -> AsyncIterator[Agent]:
    """Run ``agent`` for the block; stop it cleanly at the end."""
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(agent.run(stop), name="agent")
        try:
            if wait_online:
                async with asyncio.timeout(WAIT):
                    await agent.wait_for_state(State.ONLINE)
            yield agent
        finally:
            stop.set()
    assert agent.state is State.STOPPED


async def until(condition: Callable[[], object], what: str, within_s: float = WAIT) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def next_message(client: aiomqtt.Client, within_s: float = WAIT) -> aiomqtt.Message:
    async with asyncio.timeout(within_s):
        return await anext(aiter(client.messages))


def payload_of(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes)
    return message.payload


def stored(outbox: Outbox, kind: TopicKind | None = None) -> list[OutboxEntry]:
    """Every entry in the outbox, in order, sent or not."""
    entries = outbox.due(1_000_000, resend_after_s=0.0, now=math.inf)
    return [e for e in entries if kind is None or e.kind is kind]


def unsent(outbox: Outbox, kind: TopicKind) -> list[OutboxEntry]:
    """Entries never sent (nothing is due for a resend within an hour of being sent)."""
    entries = outbox.due(1_000_000, resend_after_s=3600.0, now=time.monotonic())
    return [e for e in entries if e.kind is kind and e.attempts == 0]


def ids(entries: list[OutboxEntry]) -> list[str]:
    return [e.message_id for e in entries]


def persistent_service(config: BrokerConfig, pki: FleetPki) -> aiomqtt.Client:
    """The service's identity with a persistent session, as the real ingestor connects."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 300
    return aiomqtt.Client(
        config.bind_host,
        config.port,
        tls_context=tls_context(pki.ca_file, pki.service),
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
        timeout=CLIENT_TIMEOUT,
    )


# --- the pump and receipts -----------------------------------------------------------------


async def test_telemetry_is_published_from_the_outbox_and_kept_until_its_receipt(
    broker: RunningBroker, tmp_path: Path
) -> None:
    agent = make_agent(tmp_path, broker)
    async with broker.client(broker.pki.service) as service:
        await service.subscribe(topic(agent, TopicKind.TELEMETRY), qos=1)
        async with running(agent):
            sample = decode(TelemetryMessage, payload_of(await next_message(service)))
            outbox = agent.outbox

            await until(lambda: not unsent(outbox, TopicKind.TELEMETRY), "the PUBACK")
            assert sample.message_id in ids(stored(outbox, TopicKind.TELEMETRY))

            receipts = topic(agent, TopicKind.RECEIPTS)
            await service.publish(receipts, b"{not a receipt", qos=1)
            unknown = ReceiptMessage(message_ids=["0123456789abcdef"])
            await service.publish(receipts, unknown.to_payload(), qos=1)
            receipt = ReceiptMessage(message_ids=[sample.message_id])
            await service.publish(receipts, receipt.to_payload(), qos=1)

            await until(
                lambda: sample.message_id not in ids(stored(outbox)), "the receipt to delete it"
            )
            assert agent.state is State.ONLINE  # the malformed receipt was only dropped


async def test_unconfirmed_messages_are_sent_again_until_a_receipt_arrives(
    broker: RunningBroker, tmp_path: Path
) -> None:
    agent = make_agent(tmp_path, broker, receipt_timeout_s=0.3)
    async with broker.client(broker.pki.service) as service:
        await service.subscribe(topic(agent, TopicKind.TELEMETRY), qos=1)
        async with running(agent):
            first = payload_of(await next_message(service))
            sample = decode(TelemetryMessage, first)
            started = time.monotonic()
            again = [payload_of(await next_message(service)) for _ in range(2)]
            assert again == [first, first]  # the very same message, byte for byte
            assert time.monotonic() - started >= 0.3 * 2 * 0.9

            receipt = ReceiptMessage(message_ids=[sample.message_id])
            await service.publish(topic(agent, TopicKind.RECEIPTS), receipt.to_payload(), qos=1)
            await until(lambda: not stored(agent.outbox, TopicKind.TELEMETRY), "the receipt")
            # At most one copy already on its way when the receipt landed; then silence.
            with contextlib.suppress(TimeoutError):
                late = payload_of(await next_message(service, within_s=0.3))
                assert late == first
            with pytest.raises(TimeoutError):
                await next_message(service, within_s=1.0)


async def test_telemetry_piles_up_while_the_broker_is_down_and_drains_in_order(
    fleet_pki: FleetPki, broker_config: BrokerConfig, tmp_path: Path
) -> None:
    device_id = new_device_id()
    state_dir = tmp_path / device_id
    identity = enroll_by_hand(
        state_dir, fleet_pki, device_id, broker_config.bind_host, broker_config.port
    )
    batch, rate = 4, 40.0
    agent = Agent(
        agent_settings(
            state_dir, telemetry_interval_s=0.05, pump_batch=batch, drain_rate_per_s=rate
        ),
        identity,
    )
    telemetry_topic = device_topic(device_id, TopicKind.TELEMETRY)

    async with contextlib.AsyncExitStack() as first_broker:
        await first_broker.enter_async_context(
            MosquittoSupervisor(broker_config, restart_backoff_min=0.05)
        )
        # The service's persistent session subscribes once, as the real ingestor does, and is
        # away from here on: the broker queues what the device sends for it.
        async with persistent_service(broker_config, fleet_pki) as service:
            await service.subscribe(telemetry_topic, qos=1)

        async with running(agent):
            await until(lambda: len(stored(agent.outbox, TopicKind.TELEMETRY)) >= 3, "samples")
            await until(lambda: not unsent(agent.outbox, TopicKind.TELEMETRY), "them sent")
            before_outage = ids(
                [e for e in stored(agent.outbox, TopicKind.TELEMETRY) if e.attempts > 0]
            )

            await first_broker.aclose()  # the outage
            async with asyncio.timeout(WAIT):
                await agent.wait_for_state(State.BACKING_OFF)
            await until(lambda: len(unsent(agent.outbox, TopicKind.TELEMETRY)) >= 12, "a backlog")
            backlog = ids(unsent(agent.outbox, TopicKind.TELEMETRY))

            async with MosquittoSupervisor(broker_config, restart_backoff_min=0.05):
                back = time.monotonic()
                await until(
                    lambda: not set(backlog) & set(ids(unsent(agent.outbox, TopicKind.TELEMETRY))),
                    "the backlog to drain",
                )
                drained_in = time.monotonic() - back
                async with persistent_service(broker_config, fleet_pki) as service:
                    received: list[str] = []
                    while not set(backlog) <= set(received):
                        message = await next_message(service)
                        received.append(decode(TelemetryMessage, payload_of(message)).message_id)

    assert set(before_outage) <= set(received)
    first_seen = list(dict.fromkeys(received))
    order = [first_seen.index(message_id) for message_id in before_outage + backlog]
    assert order == sorted(order)  # in the order the samples were taken
    # Paced: beyond the first batch, each message costs 1/rate seconds.
    assert drained_in >= (len(backlog) - batch) / rate * 0.9
    assert len(backlog) >= 12


# --- inbound: commands and desired state --------------------------------------------------


async def test_commands_are_answered_with_acks_through_the_outbox(
    broker: RunningBroker, tmp_path: Path
) -> None:
    agent = make_agent(tmp_path, broker)
    async with broker.client(broker.pki.service) as service:
        await service.subscribe(topic(agent, TopicKind.ACKS), qos=1)
        async with running(agent):
            now = datetime.now(UTC)
            command = CommandMessage(
                id="cmd-" + uuid.uuid4().hex,
                type="ping",
                issued_at=now,
                expires_at=now + timedelta(minutes=5),
            )
            commands = topic(agent, TopicKind.COMMANDS)
            await service.publish(commands, b"not even json", qos=1)  # no id: only logged
            await service.publish(commands, command.to_payload(), qos=1)

            acks = [decode(AckMessage, payload_of(await next_message(service))) for _ in range(3)]
            assert [a.command_id for a in acks] == [command.id] * 3
            assert [a.status for a in acks] == [
                AckStatus.ACCEPTED,
                AckStatus.RUNNING,
                AckStatus.SUCCEEDED,
            ]
            assert acks[-1].result is not None and acks[-1].result["pong"] is True
            assert ids(stored(agent.outbox, TopicKind.ACKS)) == [a.message_id for a in acks]

            receipt = ReceiptMessage(message_ids=[a.message_id for a in acks])
            await service.publish(topic(agent, TopicKind.RECEIPTS), receipt.to_payload(), qos=1)
            await until(lambda: not stored(agent.outbox, TopicKind.ACKS), "the acks' receipt")
            assert agent.state is State.ONLINE


async def test_desired_state_is_applied_reported_retained_and_retimes_telemetry(
    broker: RunningBroker, tmp_path: Path
) -> None:
    agent = make_agent(tmp_path, broker)  # samples once an hour unless told otherwise
    desired = DesiredState(generation=3, config=RuntimeConfig(telemetry_interval_s=1))
    async with broker.client(broker.pki.service) as service:
        # Retained before the device connects, as the service does: the subscription gets it.
        await service.publish(
            topic(agent, TopicKind.DESIRED), desired.to_payload(), qos=1, retain=True
        )
        await service.subscribe(topic(agent, TopicKind.REPORTED), qos=1)
        await service.subscribe(topic(agent, TopicKind.TELEMETRY), qos=1)
        async with running(agent):
            reports: list[ReportedState] = []
            samples: dict[str, TelemetryMessage] = {}  # by message id: QoS 1 may repeat one
            while not reports or len(samples) < 2:
                message = await next_message(service)
                if message.topic.matches(topic(agent, TopicKind.REPORTED)):
                    reports.append(decode(ReportedState, payload_of(message)))
                else:
                    sample = decode(TelemetryMessage, payload_of(message))
                    samples[sample.message_id] = sample

            # One report; QoS 1 may deliver it twice (a reconnect on a loaded machine), the same
            # message id each time.
            (reported,) = {r.message_id: r for r in reports}.values()
            assert reported.generation == 3
            assert reported.applied
            assert reported.config["telemetry_interval_s"] == 1
            assert agent.runtime.telemetry_interval_s == 1
            (entry,) = stored(agent.outbox, TopicKind.REPORTED)
            assert entry.retain
            assert entry.message_id == reported.message_id
            # The hour-long wait after the first sample was cut short by the new interval.
            first, second = samples.values()
            assert timedelta(0) < second.timestamp - first.timestamp < timedelta(seconds=3)


async def test_a_restart_command_ends_the_run_after_its_final_ack_is_stored(
    broker: RunningBroker, tmp_path: Path
) -> None:
    agent = make_agent(tmp_path, broker)
    now = datetime.now(UTC)
    command = CommandMessage(
        id="cmd-" + uuid.uuid4().hex,
        type="restart-agent",
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
    )
    async with broker.client(broker.pki.service) as service, asyncio.TaskGroup() as group:
        run = group.create_task(agent.run(asyncio.Event()))
        async with asyncio.timeout(WAIT):
            await agent.wait_for_state(State.ONLINE)
        await service.publish(topic(agent, TopicKind.COMMANDS), command.to_payload(), qos=1)
        async with asyncio.timeout(WAIT):
            await run  # returns by itself: nobody set stop

    assert agent.restart_requested
    assert agent.state is State.STOPPED
    with Outbox.in_state_dir(tmp_path / agent.identity.device_id) as outbox:
        acks = [decode(AckMessage, e.payload) for e in stored(outbox, TopicKind.ACKS)]
    # Unconfirmed, so all still there for the next run to (re)send.
    assert [a.status for a in acks] == [AckStatus.ACCEPTED, AckStatus.RUNNING, AckStatus.SUCCEEDED]
    assert {a.command_id for a in acks} == {command.id}


# --- log forwarding ------------------------------------------------------------------------


async def test_agent_log_records_are_forwarded_on_logs_but_mqtt_internals_are_not(
    broker: RunningBroker, tmp_path: Path
) -> None:
    agent = make_agent(tmp_path, broker)
    async with broker.client(broker.pki.service) as service:
        await service.subscribe(topic(agent, TopicKind.LOGS), qos=1)
        async with running(agent):
            logging.getLogger(PAHO_LOGGER_NAME).error("paho noise")
            logging.getLogger(DELIVERY_LOGGER_NAME).error("delivery noise")
            logging.getLogger("device_agent.test").info("routine, below the forward level")
            logging.getLogger("device_agent.test").error("camera %s unplugged", "cam0")

            forwarded = decode(LogMessage, payload_of(await next_message(service)))
            assert forwarded.level is LogLevel.ERROR
            assert forwarded.logger == "device_agent.test"
            assert forwarded.message == "camera cam0 unplugged"
            logs = stored(agent.outbox, TopicKind.LOGS)
            texts = [decode(LogMessage, e.payload).message for e in logs]
            assert "camera cam0 unplugged" in texts
            assert "routine, below the forward level" not in texts
            assert "paho noise" not in texts
            assert "delivery noise" not in texts


async def test_forwarder_truncates_skips_its_own_records_and_takes_records_from_threads() -> None:
    runtime = RuntimeState(telemetry_interval_s=30, log_level="INFO", log_forward_level="INFO")
    forwarder = LogForwarder(runtime, queue_max=10)
    test_logger = logging.getLogger("device_agent.forward-test")
    test_logger.addHandler(forwarder)
    test_logger.setLevel(logging.DEBUG)
    stored_batches: list[list[LogMessage]] = []

    async def store(batch: list[LogMessage]) -> None:
        test_logger.error("logged while storing")  # must not come back as a record to store
        await asyncio.to_thread(test_logger.error, "logged by a thread while storing")
        stored_batches.append(batch)

    try:
        try:
            raise RuntimeError("the tail of the traceback")
        except RuntimeError:
            test_logger.exception("start %s", "x" * 20_000)
        worker = threading.Thread(target=test_logger.warning, args=("from a worker thread",))
        worker.start()
        worker.join()
        test_logger.debug("below the forward level")
        async with asyncio.TaskGroup() as group:
            task = group.create_task(forwarder.forward(store))
            await until(lambda: sum(map(len, stored_batches)) >= 2, "two records stored")
            await asyncio.sleep(0.1)
            task.cancel()
        for n in range(15):
            test_logger.warning("burst %d", n)
    finally:
        test_logger.removeHandler(forwarder)

    messages = [m for batch in stored_batches for m in batch]
    assert [m.level for m in messages] == [LogLevel.ERROR, LogLevel.WARNING]
    long, threaded = messages
    assert len(long.message) == 8000
    assert long.message.startswith("start xxx")
    assert long.message.rstrip().endswith("RuntimeError: the tail of the traceback")
    assert "[... truncated ...]" in long.message
    assert threaded.message == "from a worker thread"
    assert forwarder.dropped == 5  # a queue of 10 took the first ten of the burst
    assert any("burst 14" in line for line in forwarder.recent())
    assert any("below the forward level" in line for line in forwarder.recent())
