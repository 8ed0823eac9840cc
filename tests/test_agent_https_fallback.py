"""Real agents whose MQTT is blocked fall back to HTTPS, and return to MQTT when it works again.

MQTT is blocked at one seam: the agent's ``device.json`` points at a TCP proxy in front of the
fleet's broker, and the proxy refuses connections (``cut``) until ``restore``; or, for an agent
driven in-process, at a port that refuses every connection. The service is the real one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from device_agent.agent import Agent
from device_agent.config import AgentSettings
from device_agent.https_transport import (
    HttpsRefusedError,
    HttpsTransport,
    HttpsUnreachableError,
)
from device_agent.outbox import Outbox, OutboxEntry
from device_agent.state import StateDir
from device_agent.telemetry import sample
from fleet_protocol import (
    LogLevel,
    LogMessage,
    ModelRuntime,
    ResultMessage,
    ResultSource,
    TopicKind,
)
from tests.fixtures.fleet import AgentProcess, Fleet, wait_until
from tests.fixtures.proxy import TcpProxy

POLL_INTERVAL_S = 0.3
FALLBACK_ENV = {
    "EDGEFLEET_AGENT_HTTPS_FALLBACK_AFTER_S": "1",
    "EDGEFLEET_AGENT_HTTPS_POLL_INTERVAL_S": str(POLL_INTERVAL_S),
}
FALLING_BACK = "falling back to HTTPS"
FALLBACK_STOPPED = "HTTPS fallback stopped"
POSTED_OVER_HTTPS = "over HTTPS"


def telemetry_ids(fleet: Fleet, device_id: str) -> list[str]:
    """Every telemetry message id stored for the device, duplicates included."""
    with fleet.engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT message_id FROM telemetry_sample WHERE device_id = :d"),
                {"d": device_id},
            ).scalars()
        )


def agent_log(agent: AgentProcess) -> str:
    return (agent.state_dir / "agent.log").read_text(errors="replace")


def behind_proxy(state_dir: Path, proxy: TcpProxy) -> None:
    """Point the enrolled agent's MQTT at ``proxy`` instead of the broker."""
    identity_path = StateDir(state_dir).identity_path
    identity = json.loads(identity_path.read_text())
    identity["mqtt_port"] = proxy.port
    identity_path.write_text(json.dumps(identity))


@pytest.fixture
def proxy(sqlite_fleet: Fleet) -> Iterator[TcpProxy]:
    """A proxy to the fleet's broker, closed after the test."""
    proxy = TcpProxy(sqlite_fleet.mqtt_port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening.

    Unlike a port found free, it cannot be picked as a client's own ephemeral port, so a
    connection to it is never its own peer (TCP self-connect).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


def test_agent_with_mqtt_blocked_from_the_start_works_over_https_then_returns_to_mqtt(
    sqlite_fleet: Fleet, proxy: TcpProxy
) -> None:
    fleet = sqlite_fleet
    state_dir = fleet.enroll("blocked")
    behind_proxy(state_dir, proxy)
    proxy.cut()
    agent = fleet.start_agent(state_dir, telemetry_interval=0.3, extra_env=FALLBACK_ENV)

    wait_until(lambda: FALLING_BACK in agent_log(agent), what="the switch to HTTPS")
    wait_until(lambda: len(telemetry_ids(fleet, agent.device_id)) >= 3, what="HTTPS telemetry")

    created = fleet.api.post(
        f"/api/v1/devices/{agent.device_id}/commands", json={"type": "ping"}
    ).json()
    command = wait_until(
        lambda: (
            (c := fleet.api.get(f"/api/v1/commands/{created['id']}").json())["status"]
            == "succeeded"
            and c
        ),
        what="the command's final ack over HTTPS",
    )
    assert command["result"] is not None

    desired_url = f"/api/v1/devices/{agent.device_id}/desired"
    updated = fleet.api.put(desired_url, json={"config": {"log_forward_level": "ERROR"}}).json()
    wait_until(
        lambda: fleet.device(agent.device_id)["reported_generation"] == updated["generation"],
        what="the desired state reported over HTTPS",
    )
    assert fleet.device(agent.device_id)["reported_applied"] is True
    assert proxy.connections_made == 0, "nothing may have gone over MQTT yet"
    assert FALLBACK_STOPPED not in agent_log(agent)

    proxy.restore()
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", what="online over MQTT")
    wait_until(lambda: FALLBACK_STOPPED in agent_log(agent), what="the fallback to stop")
    posts_when_stopped = agent_log(agent).count(POSTED_OVER_HTTPS)
    stored_when_stopped = len(telemetry_ids(fleet, agent.device_id))
    wait_until(
        lambda: len(telemetry_ids(fleet, agent.device_id)) >= stored_when_stopped + 5,
        what="telemetry over MQTT",
    )
    time.sleep(3 * POLL_INTERVAL_S)  # rounds that would still run would post by now

    log = agent_log(agent)
    assert log.count(POSTED_OVER_HTTPS) == posts_when_stopped, "HTTPS rounds went on"
    assert log.count(FALLING_BACK) == 1
    ids = telemetry_ids(fleet, agent.device_id)
    assert len(ids) == len(set(ids))
    assert fleet.api.get(f"/api/v1/commands/{created['id']}").json()["status"] == "succeeded"
    assert agent.stop() == 0


def test_agent_that_loses_its_session_falls_back_after_the_delay_and_loses_nothing(
    sqlite_fleet: Fleet, proxy: TcpProxy
) -> None:
    fleet = sqlite_fleet
    state_dir = fleet.enroll("cut-off")
    behind_proxy(state_dir, proxy)
    # Short receipt timeout: entries the broker took just before the cut, whose receipts never
    # came, are sent again over HTTPS.
    env = {**FALLBACK_ENV, "EDGEFLEET_AGENT_RECEIPT_TIMEOUT_S": "1"}
    agent = fleet.start_agent(state_dir, telemetry_interval=0.2, extra_env=env)
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", what="online")
    wait_until(lambda: len(telemetry_ids(fleet, agent.device_id)) >= 3, what="MQTT telemetry")
    assert FALLING_BACK not in agent_log(agent)

    proxy.cut()
    cut_at = time.monotonic()
    wait_until(lambda: FALLING_BACK in agent_log(agent), what="the switch to HTTPS")
    assert time.monotonic() - cut_at >= 0.9, "fell back before https_fallback_after_s"
    stored_while_cut = len(telemetry_ids(fleet, agent.device_id))
    wait_until(
        lambda: len(telemetry_ids(fleet, agent.device_id)) >= stored_while_cut + 5,
        what="telemetry over HTTPS while MQTT is cut",
    )
    assert "no MQTT session with" in agent_log(agent)

    proxy.restore()
    wait_until(lambda: FALLBACK_STOPPED in agent_log(agent), what="the fallback to stop")
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", what="online over MQTT")
    assert agent.stop() == 0

    ids = telemetry_ids(fleet, agent.device_id)
    assert len(ids) == len(set(ids))
    assert len(ids) >= stored_while_cut + 5


async def test_transport_takes_what_the_endpoint_takes_and_names_its_failures(
    sqlite_fleet: Fleet, dead_port: int
) -> None:
    fleet = sqlite_fleet
    state = StateDir(fleet.enroll("direct"))
    identity = state.load_identity()
    settings = AgentSettings(state_dir=state.root, http_timeout_s=5, connect_timeout_s=2)
    now = datetime.now(UTC)
    telemetry = sample(None, disk_path=state.root)
    log = LogMessage(level=LogLevel.ERROR, logger="t", message="over https")
    result = _result("m", 0)
    stored = [
        (telemetry.message_id, TopicKind.TELEMETRY, telemetry.to_payload()),
        (result.message_id, TopicKind.RESULTS, result.to_payload()),
        ("results-0001", TopicKind.RESULTS, b'{"x": 1}'),
        ("not-json-001", TopicKind.LOGS, b"{not json"),
        ("bad-ack-0001", TopicKind.ACKS, b'{"surprise": 1}'),
        (log.message_id, TopicKind.LOGS, log.to_payload()),
    ]
    entries = [
        OutboxEntry(
            seq, message_id, kind, "m" if kind is TopicKind.RESULTS else None, payload, False, 0
        )
        for seq, (message_id, kind, payload) in enumerate(stored, start=1)
    ]

    async with HttpsTransport.open(identity, state, settings) as transport:
        receipt = await transport.send(entries)
        assert receipt.stored == {telemetry.message_id, result.message_id, log.message_id}
        assert set(receipt.rejected) == {"results-0001", "not-json-001", "bad-ack-0001"}
        assert (await transport.fetch_desired()).generation == 0

        created = fleet.api.post(
            f"/api/v1/devices/{identity.device_id}/commands", json={"type": "ping"}
        ).json()
        polled = await transport.poll_commands()
        assert [c.id for c in polled] == [created["id"]]
        assert polled[0].expires_at > now + timedelta(seconds=1)

    state.token_path.write_text("efd_forged\n")
    async with HttpsTransport.open(identity, state, settings) as transport:
        with pytest.raises(HttpsRefusedError, match="revoked") as refused:
            await transport.poll_commands()
    assert refused.value.status == 401

    dead = identity.model_copy(update={"service_url": f"https://127.0.0.1:{dead_port}"})
    async with HttpsTransport.open(dead, state, settings) as transport:
        with pytest.raises(HttpsUnreachableError, match="cannot reach"):
            await transport.fetch_desired()


def _result(model: str, n: int) -> ResultMessage:
    return ResultMessage(
        model=model, version="1", release=1, sha256="a" * 64, runtime=ModelRuntime.ONNX,
        source=ResultSource.SCHEDULE, input_ref=f"frame-{n}", latency_ms=1.0, label="cat",
        confidence=0.9,
    )  # fmt: skip


async def test_results_travel_over_https_while_mqtt_is_blocked_and_are_stored_once(
    sqlite_fleet: Fleet, dead_port: int
) -> None:
    fleet = sqlite_fleet
    state = StateDir(fleet.enroll("results-first"))
    identity = state.load_identity().model_copy(update={"mqtt_port": dead_port})
    results = [_result("detector", n) for n in range(5)]
    with Outbox.in_state_dir(state.root) as outbox:
        # More results at the head of the outbox than one read of pump_batch entries returns.
        outbox.put_many((TopicKind.RESULTS, result, "detector", False) for result in results)
    settings = AgentSettings(
        state_dir=state.root,
        telemetry_interval_s=0.2,
        pump_batch=2,
        https_fallback_after_s=0.2,
        https_poll_interval_s=0.1,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
        connect_timeout_s=2,
    )
    agent = Agent(settings, identity)
    stop = asyncio.Event()
    root_level = logging.getLogger().level

    def stored_results() -> list[str]:
        answer = fleet.api.get("/api/v1/results", params={"device_id": identity.device_id})
        return sorted(r["message_id"] for r in answer.json())

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(agent.run(stop), name="agent")
            deadline = time.monotonic() + 20
            while len(stored_results()) < len(results):
                assert time.monotonic() < deadline, "results did not arrive over HTTPS"
                await asyncio.sleep(0.1)
            stop.set()
    finally:
        logging.getLogger().setLevel(root_level)

    assert stored_results() == sorted(r.message_id for r in results)
    with Outbox.in_state_dir(state.root) as outbox:
        left = outbox.due(100, resend_after_s=0.0, now=math.inf)
    assert not [entry for entry in left if entry.kind is TopicKind.RESULTS], "receipted, deleted"
