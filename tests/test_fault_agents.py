"""Fault tests on the device side, against real processes: a killed broker, an agent offline or
killed with a full outbox, commands that wait or expire while the device is away, and a
half-open connection. Each one checks message ids end to end.

The ground truth of what a device generated is its own log: the agent writes ``telemetry stored
message_id=<id>`` at DEBUG once a sample is durably in its outbox. Every test compares those ids
with ``telemetry_sample.message_id``: ``lost`` (generated, never stored) and ``stored twice``
(rows minus distinct ids) must both be 0. ``duplicated on the wire`` is the service's ingest
``duplicates`` counter: an id it saw again and dropped, which at-least-once delivery allows.
Each test prints one ``FAULT <name>: ...`` line with the three numbers (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import bindparam, text

from tests.fixtures.fleet import AgentProcess, Fleet, start_fleet, wait_until
from tests.fixtures.proxy import TcpProxy

_GENERATED = re.compile(r"telemetry stored message_id=(\S+)")
_SESSION_ENDED = re.compile(r"^(\S+ \S+) .*MQTT session with \S+ ended", re.MULTILINE)
_CONNECTED = "connected to 127.0.0.1:"
_CONFIG_CHANGED = "runtime config changed from"
# Written in the agent's log format (logging's default asctime), local time.
_LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"

# Quiescing: a desired telemetry interval this long means no further sample during the test.
_QUIET_INTERVAL_S = 86_400
DRAIN_TIMEOUT_S = 30.0


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def fast_reconnect_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    """A fleet whose service reconnects to a restarted broker within 2 s, not up to 30 s."""
    fleet = start_fleet(tmp_path, database_url, extra_env={"EDGEFLEET_MQTT_RECONNECT_MAX_S": "2"})
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def proxies() -> Iterator[Callable[[int], TcpProxy]]:
    """Makes TCP proxies to a port; all of them are closed after the test."""
    made: list[TcpProxy] = []

    def make(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


# -- helpers -------------------------------------------------------------------------------------


def agent_log(state_dir: Path) -> str:
    return (state_dir / "agent.log").read_text(errors="replace")


def generated_ids(state_dir: Path) -> list[str]:
    """Telemetry ids the agent put in its outbox, in the order it did (every run of it)."""
    return _GENERATED.findall(agent_log(state_dir))


def stored_ids(fleet: Fleet, device_ids: list[str]) -> list[str]:
    """``telemetry_sample.message_id`` of these devices, in insertion (primary key) order."""
    query = text(
        "SELECT message_id FROM telemetry_sample WHERE device_id IN :devices ORDER BY id"
    ).bindparams(bindparam("devices", expanding=True))
    with fleet.engine.connect() as conn:
        return [row[0] for row in conn.execute(query, {"devices": device_ids})]


def acks_of(fleet: Fleet, command_id: str) -> list[str]:
    with fleet.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT status FROM command_ack WHERE command_id = :c ORDER BY id"),
            {"c": command_id},
        )
        return [row[0] for row in rows]


def outbox_depth(state_dir: Path, kind: str | None = None) -> int:
    """Entries waiting in the agent's outbox (of one kind), read without writing anything."""
    uri = f"file:{state_dir / 'outbox.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        if kind is None:
            row = conn.execute("SELECT count(*) FROM outbox").fetchone()
        else:
            row = conn.execute("SELECT count(*) FROM outbox WHERE kind = ?", (kind,)).fetchone()
    count: int = row[0]
    return count


def route_through(state_dir: Path, proxy: TcpProxy) -> None:
    """Point the agent of ``state_dir`` at ``proxy`` (the broker's cert names 127.0.0.1)."""
    path = state_dir / "device.json"
    identity: dict[str, Any] = json.loads(path.read_text())
    identity["mqtt_port"] = proxy.port
    path.write_text(json.dumps(identity))


def broker_processes(fleet: Fleet) -> list[psutil.Process]:
    """The mosquitto children of ``edgefleet up``; one that exits while we look is skipped."""
    found = []
    for child in psutil.Process(fleet.process.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() == "mosquitto":
                found.append(child)
    return found


def has_rows(fleet: Fleet, device_id: str, more_than: int) -> bool:
    return len(stored_ids(fleet, [device_id])) > more_than


def wait_for_rows(fleet: Fleet, agents: list[AgentProcess], more_than: int) -> None:
    """Wait until each agent has more than ``more_than`` rows on top of what it has now."""
    for agent in agents:
        target = len(stored_ids(fleet, [agent.device_id])) + more_than
        wait_until(
            partial(has_rows, fleet, agent.device_id, target),
            what=f"more than {target} telemetry rows from {agent.device_id}",
        )


def logged(state_dir: Path, line: str) -> bool:
    return line in agent_log(state_dir)


def quiesce_drain_and_stop(fleet: Fleet, agents: list[AgentProcess]) -> None:
    """Stop sampling, wait until every outbox is empty and every sample stored, then SIGTERM.

    A sample taken during the SIGTERM would stay in the outbox for the next run, which is not a
    loss but would read as one here; so the agents are first told over desired state to sample
    no more, the way an operator slows a device down.
    """
    for agent in agents:
        response = fleet.api.put(
            f"/api/v1/devices/{agent.device_id}/desired",
            json={"config": {"telemetry_interval_s": _QUIET_INTERVAL_S}},
        )
        assert response.status_code == 200, response.text
    for agent in agents:
        wait_until(
            partial(logged, agent.state_dir, _CONFIG_CHANGED),
            what=f"{agent.device_id} to apply the quiet interval",
        )

    def drained() -> bool:
        if any(outbox_depth(agent.state_dir) for agent in agents):
            return False
        stored = set(stored_ids(fleet, [agent.device_id for agent in agents]))
        return all(set(generated_ids(agent.state_dir)) <= stored for agent in agents)

    wait_until(drained, timeout=DRAIN_TIMEOUT_S, what="every outbox drained and stored")
    for agent in agents:
        assert agent.stop() == 0, agent_log(agent.state_dir)[-3000:]


def check_ids(fleet: Fleet, name: str, agents: list[AgentProcess]) -> list[str]:
    """Print the FAULT line and assert nothing was lost or stored twice; returns stored ids."""
    generated = {i for agent in agents for i in generated_ids(agent.state_dir)}
    stored = stored_ids(fleet, [agent.device_id for agent in agents])
    lost = generated - set(stored)
    stored_twice = len(stored) - len(set(stored))
    duplicated_on_wire = fleet.stats()["duplicates"]
    print(
        f"FAULT {name}: lost={len(lost)} duplicated_on_wire={duplicated_on_wire} "
        f"stored_twice={stored_twice}"
    )
    assert generated, "the agents generated nothing: the test proves nothing"
    assert (len(lost), stored_twice) == (0, 0), (
        f"lost={sorted(lost)} stored_twice={stored_twice}; still in outboxes: "
        f"{[outbox_depth(agent.state_dir) for agent in agents]}"
    )
    return stored


def session_ended_times(state_dir: Path) -> list[float]:
    """Wall-clock times at which the agent logged that its MQTT session ended."""
    return [
        datetime.strptime(stamp, _LOG_TIME_FORMAT).timestamp()
        for stamp in _SESSION_ENDED.findall(agent_log(state_dir))
    ]


# -- tests ---------------------------------------------------------------------------------------


def test_broker_killed_mid_burst_loses_nothing_and_stores_nothing_twice(
    fast_reconnect_fleet: Fleet,
) -> None:
    # On both databases: the redelivered ids meet each database's unique constraint.
    fleet = fast_reconnect_fleet
    # Mosquitto persists by periodic snapshot, so a kill -9 forgets messages it already
    # PUBACKed; the agent sends those again when no receipt came within this long (30 s by
    # default, shrunk so the test does not wait it out).
    env = {"EDGEFLEET_AGENT_RECEIPT_TIMEOUT_S": "3"}
    agents = [
        fleet.start_agent(fleet.enroll(f"burst-{n}"), telemetry_interval=0.05, extra_env=env)
        for n in range(3)
    ]
    wait_for_rows(fleet, agents, more_than=20)
    (broker,) = broker_processes(fleet)

    os.kill(broker.pid, signal.SIGKILL)

    wait_until(
        lambda: [p for p in broker_processes(fleet) if p.pid != broker.pid],
        what="the supervisor to start a new mosquitto",
    )
    for agent in agents:
        wait_until(
            partial(session_ended_times, agent.state_dir),
            what=f"{agent.device_id} to notice the broker died",
        )
    wait_for_rows(fleet, agents, more_than=20)  # the burst goes on through the new broker
    quiesce_drain_and_stop(fleet, agents)
    check_ids(fleet, "broker kill -9 mid-burst (3 agents, 0.05 s)", agents)


def test_agent_offline_for_many_intervals_delivers_its_backlog_once_and_in_order(
    fleet: Fleet, proxies: Callable[[int], TcpProxy]
) -> None:
    # On both databases: the order check relies on each database's id assignment per batch.
    proxy = proxies(fleet.mqtt_port)
    state_dir = fleet.enroll("offline")
    route_through(state_dir, proxy)
    agent = fleet.start_agent(state_dir, telemetry_interval=0.2)
    wait_for_rows(fleet, [agent], more_than=2)

    proxy.cut()
    wait_until(lambda: session_ended_times(state_dir), what="the agent to notice the cut")
    # ~3 s offline at 0.2 s: observed as the backlog, not slept.
    wait_until(
        lambda: outbox_depth(state_dir, "telemetry") >= 15,
        what="15 telemetry samples buffered offline",
    )
    proxy.restore()

    quiesce_drain_and_stop(fleet, [agent])
    stored = check_ids(fleet, "agent offline ~3 s behind a cut proxy", [agent])
    generated = generated_ids(state_dir)
    in_generated = set(generated)
    assert [i for i in stored if i in in_generated] == generated, "stored out of order"


def test_agent_killed_with_a_full_outbox_delivers_it_after_restart(
    fleet: Fleet, proxies: Callable[[int], TcpProxy]
) -> None:
    # On both databases: entries sent before the kill may be sent again after it.
    proxy = proxies(fleet.mqtt_port)
    state_dir = fleet.enroll("killed")
    route_through(state_dir, proxy)
    first = fleet.start_agent(state_dir, telemetry_interval=0.1)
    wait_for_rows(fleet, [first], more_than=2)

    proxy.cut()
    wait_until(lambda: outbox_depth(state_dir, "telemetry") > 10, what="a backlog of > 10")
    first.kill()
    held = outbox_depth(state_dir)
    assert held > 10
    proxy.restore()
    second = fleet.start_agent(state_dir, telemetry_interval=0.1)

    quiesce_drain_and_stop(fleet, [second])
    check_ids(fleet, f"agent kill -9 holding {held} outbox entries, restarted", [first, second])


def test_commands_sent_while_offline_run_once_back_unless_they_expired_first(
    fleet: Fleet, proxies: Callable[[int], TcpProxy]
) -> None:
    # On both databases: expiry and ack history are stored state.
    proxy = proxies(fleet.mqtt_port)
    state_dir = fleet.enroll("away")
    route_through(state_dir, proxy)
    agent = fleet.start_agent(state_dir, telemetry_interval=0.5)
    # The service publishes commands only to devices that have connected once.
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", what="online")

    proxy.cut()
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "offline", what="Last Will")

    def send(expires_in_s: int) -> str:
        response = fleet.api.post(
            f"/api/v1/devices/{agent.device_id}/commands",
            json={"type": "ping", "expires_in_s": expires_in_s},
        )
        assert response.status_code == 201, response.text
        command_id: str = response.json()["id"]
        return command_id

    def command(command_id: str) -> dict[str, Any]:
        response = fleet.api.get(f"/api/v1/commands/{command_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    patient = send(300)
    hasty = send(5)
    wait_until(lambda: command(hasty)["status"] == "expired", what="the short command to expire")
    assert command(hasty)["published_at"] is not None, "never queued for the device"
    assert command(patient)["status"] == "pending"

    proxy.restore()

    wait_until(
        lambda: command(patient)["status"] == "succeeded", what="the long command to succeed"
    )
    # The agent runs commands one at a time in delivery order, and the broker hands over what
    # it queued before anything newer: once a command sent now has succeeded, the expired one
    # has been refused or was never delivered. Either is right; running it is not.
    marker = send(300)
    wait_until(lambda: command(marker)["status"] == "succeeded", what="a later command")
    assert set(acks_of(fleet, hasty)) <= {"rejected"}, acks_of(fleet, hasty)
    assert command(hasty)["status"] == "expired"
    assert f"running command command_id={hasty}" not in agent_log(state_dir)

    quiesce_drain_and_stop(fleet, [agent])
    check_ids(fleet, "commands queued while offline (one expires)", [agent])


# The agent must notice a half-open connection within 1.5 x its keepalive setting; it advertises
# a shorter MQTT keepalive to make that hold (device_agent.connection.mqtt_keepalive).
_KEEPALIVE_S = 4
_NOTICE_BOUND_S = 1.5 * _KEEPALIVE_S


def test_half_open_connection_is_noticed_by_keepalive_and_replaced_by_one_session(
    sqlite_fleet: Fleet, proxies: Callable[[int], TcpProxy]
) -> None:
    # SQLite only: this is about the agent process and the broker, not storage.
    fleet = sqlite_fleet
    proxy = proxies(fleet.mqtt_port)
    state_dir = fleet.enroll("half-open")
    route_through(state_dir, proxy)
    agent = fleet.start_agent(
        state_dir,
        telemetry_interval=0.2,
        extra_env={"EDGEFLEET_AGENT_KEEPALIVE_S": str(_KEEPALIVE_S)},
    )
    wait_for_rows(fleet, [agent], more_than=2)
    broker_log = fleet.home.broker_dir / "mosquitto.log"
    broker_log_start = broker_log.stat().st_size
    connected_before = agent_log(state_dir).count(_CONNECTED)

    frozen_at = time.time()
    proxy.freeze()

    (ended_at,) = wait_until(
        lambda: session_ended_times(state_dir), timeout=15, what="the agent to notice"
    )
    noticed_after = ended_at - frozen_at
    print(f"HALF-OPEN noticed {noticed_after:.2f} s after the freeze (keepalive {_KEEPALIVE_S} s)")
    assert noticed_after <= _NOTICE_BOUND_S

    wait_until(
        lambda: agent_log(state_dir).count(_CONNECTED) == connected_before + 1,
        what="the agent to reconnect through the proxy",
    )
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", what="online again")
    wait_for_rows(fleet, [agent], more_than=3)
    # Still online: a Last Will of the replaced connection did not land after the new birth.
    assert fleet.device(agent.device_id)["status"] == "online"
    # One session: the agent holds exactly one established connection to the proxy, and it
    # reconnected once.
    established = [
        c
        for c in psutil.Process(agent.process.pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == proxy.port and c.status == psutil.CONN_ESTABLISHED
    ]
    assert len(established) == 1
    assert agent_log(state_dir).count(_CONNECTED) == connected_before + 1
    assert len(session_ended_times(state_dir)) == 1
    with broker_log.open("rb") as log:
        log.seek(broker_log_start)
        since_freeze = log.read().decode(errors="replace")
    # The broker saw the identity connect once more: it replaced the half-open connection (or
    # had timed it out), since one identity holds one connection.
    assert since_freeze.count(f" as {agent.device_id} ") == 1, since_freeze

    quiesce_drain_and_stop(fleet, [agent])
    check_ids(fleet, "half-open connection (frozen proxy, keepalive 4 s)", [agent])
    wait_until(
        lambda: fleet.device(agent.device_id)["status"] == "offline",
        what="the clean stop of the one session to be announced",
    )
