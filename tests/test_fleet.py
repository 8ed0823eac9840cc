"""Real agent processes against a real fleet: telemetry lands, bad payloads are counted and
dropped, Last Will marks a killed agent offline, and a killed broker comes back by itself."""

from __future__ import annotations

import json
import os
import signal
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from tests.fixtures.fleet import Fleet, wait_until


def telemetry_rows(fleet: Fleet, device_id: str) -> int:
    with fleet.engine.connect() as conn:
        count: int = conn.execute(
            text("SELECT count(*) FROM telemetry_sample WHERE device_id = :d"), {"d": device_id}
        ).scalar_one()
    return count


def wait_for_status(fleet: Fleet, device_id: str, status: str, timeout: float = 30) -> None:
    wait_until(
        lambda: fleet.device(device_id)["status"] == status,
        timeout=timeout,
        what=f"{device_id} {status}",
    )


def wait_for_rows(fleet: Fleet, device_id: str, more_than: int, timeout: float = 20) -> None:
    wait_until(
        lambda: telemetry_rows(fleet, device_id) > more_than,
        timeout=timeout,
        what=f"more than {more_than} telemetry rows from {device_id}",
    )


def broker_processes(fleet: Fleet) -> list[psutil.Process]:
    """The mosquitto children of ``edgefleet up``; one that exits while we look is skipped."""
    found = []
    for child in psutil.Process(fleet.process.pid).children():
        try:
            if child.name() == "mosquitto":
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def device_client(fleet: Fleet, state_dir: Path) -> mqtt.Client:
    """A raw MQTT client holding a device's own identity, as a buggy firmware would."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(cafile=str(state_dir / "ca.crt"))
    context.load_cert_chain(str(state_dir / "device.crt"), str(state_dir / "device.key"))
    client.tls_set_context(context)
    client.connect("127.0.0.1", fleet.mqtt_port)
    client.loop_start()
    return client


def test_two_agents_send_telemetry_that_lands_in_the_database(fleet: Fleet) -> None:
    agents = [fleet.start_agent(fleet.enroll(name)) for name in ("pi-a", "pi-b")]

    for agent in agents:
        wait_for_rows(fleet, agent.device_id, more_than=2)
        device = fleet.device(agent.device_id)
        assert device["status"] == "online"
        assert device["telemetry"]["memory_total_bytes"] > 0
        assert device["last_seen"] is not None
    history = fleet.api.get(f"/api/v1/devices/{agents[0].device_id}/telemetry").json()
    assert len(history) >= 3
    assert history == sorted(history, key=lambda point: point["timestamp"])


def test_malformed_telemetry_is_counted_and_good_telemetry_keeps_flowing(fleet: Fleet) -> None:
    good = fleet.start_agent(fleet.enroll("good"))
    buggy_dir = fleet.enroll("buggy")
    buggy_id = json.loads((buggy_dir / "device.json").read_text())["device_id"]
    wait_until(lambda: telemetry_rows(fleet, good.device_id) >= 1, what="first telemetry")

    client = device_client(fleet, buggy_dir)
    topic = f"fleet/v1/devices/{buggy_id}/telemetry"
    try:
        client.publish(topic, b"{not json", qos=1).wait_for_publish(5)
        client.publish(topic, json.dumps({"cpu_percent": 900}), qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()

    stats = wait_until(
        lambda: (s := fleet.stats())["rejected"].get("schema") and s, what="rejection counted"
    )
    assert stats["rejected"]["json"] == 1
    assert stats["rejected"]["schema"] == 1
    assert telemetry_rows(fleet, buggy_id) == 0
    before = telemetry_rows(fleet, good.device_id)
    wait_until(lambda: telemetry_rows(fleet, good.device_id) > before + 2, what="more telemetry")
    assert f"rejected telemetry from device {buggy_id}" in fleet.log()


def test_killed_agent_goes_offline_by_last_will_and_stopped_agent_says_goodbye(
    fleet: Fleet,
) -> None:
    killed = fleet.start_agent(fleet.enroll("killed"))
    stopped = fleet.start_agent(fleet.enroll("stopped"))
    for agent in (killed, stopped):
        wait_for_status(fleet, agent.device_id, "online")

    killed.kill()
    assert stopped.stop() == 0

    for agent in (killed, stopped):
        wait_for_status(fleet, agent.device_id, "offline")


def test_up_restarts_a_killed_broker_and_agents_reconnect(fleet: Fleet) -> None:
    agent = fleet.start_agent(fleet.enroll("survivor"))
    wait_until(lambda: telemetry_rows(fleet, agent.device_id) >= 1, what="first telemetry")
    (broker,) = broker_processes(fleet)

    os.kill(broker.pid, signal.SIGKILL)

    new_brokers = wait_until(
        lambda: [p for p in broker_processes(fleet) if p.pid != broker.pid],
        what="a new mosquitto process",
    )
    assert new_brokers[0].is_running()
    before = telemetry_rows(fleet, agent.device_id)
    wait_until(
        lambda: telemetry_rows(fleet, agent.device_id) > before + 2,
        timeout=40,
        what="telemetry after the broker restart",
    )
    wait_until(lambda: fleet.stats()["connected"], what="service reconnected")
    assert fleet.device(agent.device_id)["status"] == "online"


def test_up_stops_cleanly_on_sigterm_and_takes_its_broker_down(sqlite_fleet: Fleet) -> None:
    (broker,) = broker_processes(sqlite_fleet)

    sqlite_fleet.process.send_signal(signal.SIGTERM)

    assert sqlite_fleet.process.wait(timeout=30) == 0
    wait_until(lambda: not broker.is_running(), what="mosquitto to stop")
    assert "edgefleet stopped" in sqlite_fleet.log()


def test_up_after_a_kill_9_takes_over_the_broker_it_left_behind(sqlite_fleet: Fleet) -> None:
    (orphan,) = broker_processes(sqlite_fleet)

    sqlite_fleet.kill_service()
    assert orphan.is_running(), "mosquitto runs in its own session and outlives a SIGKILL"
    sqlite_fleet.restart_service()

    wait_until(lambda: not orphan.is_running(), what="the leftover broker to stop")
    (fresh,) = broker_processes(sqlite_fleet)
    assert fresh.pid != orphan.pid
    assert "left running by a previous supervisor" in sqlite_fleet.log()
