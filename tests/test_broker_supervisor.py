"""MosquittoSupervisor against a real mosquitto: readiness, restart after a crash, stop, errors."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import BrokerConfig, BrokerStartError, MosquittoSupervisor
from fleet_protocol import TopicKind, device_topic
from tests.fixtures.broker import RunningBroker, make_broker_config
from tests.fixtures.pki import FleetPki

DEVICE = "dev-cccc0003"
WAIT = 10.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``WAIT``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}")
        await asyncio.sleep(0.02)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def round_trip(broker: RunningBroker) -> bytes:
    """Publish as a device and receive it as the service: the broker works end to end."""
    topic = device_topic(DEVICE, TopicKind.TELEMETRY)
    async with (
        broker.client(broker.pki.service) as service,
        broker.client(broker.pki.client(DEVICE)) as device,
    ):
        await service.subscribe(topic, qos=1)
        await device.publish(topic, b"alive", qos=1)
        async with asyncio.timeout(WAIT):
            message = await anext(aiter(service.messages))
    assert isinstance(message.payload, bytes)
    return message.payload


async def test_broker_is_ready_on_entry(broker: RunningBroker) -> None:
    await broker.supervisor.wait_ready(timeout=0)
    assert broker.supervisor.pid is not None
    assert broker.supervisor.restarts == 0
    assert await round_trip(broker) == b"alive"


async def test_killed_broker_is_restarted_and_serves_again(broker: RunningBroker) -> None:
    supervisor = broker.supervisor
    old_pid = supervisor.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    await until(lambda: supervisor.restarts == 1, "the supervisor to restart mosquitto")
    await supervisor.wait_ready(timeout=WAIT)
    assert supervisor.pid not in (None, old_pid)
    assert supervisor.restarts == 1
    assert await round_trip(broker) == b"alive"


async def test_reload_keeps_the_broker_serving(broker: RunningBroker) -> None:
    pid = broker.supervisor.pid
    assert broker.supervisor.reload()
    assert await round_trip(broker) == b"alive"
    assert broker.supervisor.pid == pid
    assert broker.supervisor.restarts == 0


async def test_leaving_the_context_stops_mosquitto(broker_config: BrokerConfig) -> None:
    async with MosquittoSupervisor(broker_config) as supervisor:
        pid = supervisor.pid
        assert pid is not None
    assert supervisor.pid is None
    assert not process_exists(pid)
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection(broker_config.bind_host, broker_config.port)
        writer.close()
        await writer.wait_closed()


async def test_missing_key_file_fails_start_with_the_brokers_reason(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    missing = tmp_path / "absent" / "server.key"
    config = make_broker_config(fleet_pki, tmp_path / "broker", key_file=missing)
    with pytest.raises(BrokerStartError, match="exited with code") as caught:
        async with MosquittoSupervisor(config):
            pytest.fail("mosquitto started without its key")
    assert str(missing) in str(caught.value)
    assert "Unable to load server key file" in str(caught.value)


async def test_missing_mosquitto_says_how_to_install_it(broker_config: BrokerConfig) -> None:
    supervisor = MosquittoSupervisor(broker_config, executable="mosquitto-not-installed")
    with pytest.raises(BrokerStartError, match="install the Debian package mosquitto"):
        async with supervisor:
            pytest.fail("started a broker that does not exist")
