"""Commands, receipts, logs and desired state against the real service, with a device played
over raw MQTT so every payload (good or bad) is under the test's control."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_protocol import (
    AckMessage,
    AckStatus,
    LogLevel,
    LogMessage,
    ReportedState,
    TopicKind,
)
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.raw_device import RawDevice


@pytest.fixture
def device(fleet: Fleet) -> Iterator[RawDevice]:
    raw = RawDevice(fleet.enroll("raw"), fleet.mqtt_port)
    yield raw
    raw.close()


def command_status(fleet: Fleet, command_id: str) -> str:
    status: str = fleet.api.get(f"/api/v1/commands/{command_id}").json()["status"]
    return status


def test_command_is_stored_published_and_follows_the_device_acks(
    fleet: Fleet, device: RawDevice
) -> None:
    response = fleet.api.post(
        f"/api/v1/devices/{device.device_id}/commands",
        json={"type": "ping", "params": {"n": 1}},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "pending"

    received = device.next(TopicKind.COMMANDS)
    assert (received["id"], received["type"], received["params"]) == (
        created["id"],
        "ping",
        {"n": 1},
    )
    for status in (AckStatus.ACCEPTED, AckStatus.RUNNING):
        device.send(TopicKind.ACKS, AckMessage(command_id=created["id"], status=status))
    wait_until(lambda: command_status(fleet, created["id"]) == "running", what="running")
    device.send(
        TopicKind.ACKS,
        AckMessage(command_id=created["id"], status=AckStatus.SUCCEEDED, result={"pong": True}),
    )

    wait_until(lambda: command_status(fleet, created["id"]) == "succeeded", what="succeeded")
    final = fleet.api.get(f"/api/v1/commands/{created['id']}").json()
    assert final["result"] == {"pong": True}
    assert final["published_at"] is not None


def test_a_late_or_replayed_ack_never_moves_a_final_command(
    fleet: Fleet, device: RawDevice
) -> None:
    created = fleet.api.post(
        f"/api/v1/devices/{device.device_id}/commands", json={"type": "ping"}
    ).json()
    done = AckMessage(command_id=created["id"], status=AckStatus.SUCCEEDED)
    device.send(TopicKind.ACKS, done)
    wait_until(lambda: command_status(fleet, created["id"]) == "succeeded", what="succeeded")

    device.send(TopicKind.ACKS, done)  # the same message again (outbox replay)
    device.send(TopicKind.ACKS, AckMessage(command_id=created["id"], status=AckStatus.RUNNING))
    device.send(TopicKind.ACKS, AckMessage(command_id=created["id"], status=AckStatus.FAILED))

    wait_until(lambda: fleet.stats()["duplicates"] >= 1, what="the replay counted")
    assert command_status(fleet, created["id"]) == "succeeded"


def test_command_to_an_offline_device_expires_and_is_marked(fleet: Fleet) -> None:
    state_dir = fleet.enroll("sleeper")
    device_id = json.loads((state_dir / "device.json").read_text())["device_id"]
    created = fleet.api.post(
        f"/api/v1/devices/{device_id}/commands", json={"type": "ping", "expires_in_s": 5}
    ).json()

    wait_until(lambda: command_status(fleet, created["id"]) == "expired", timeout=20, what="expiry")


def test_broadcast_by_tag_reaches_every_tagged_device(fleet: Fleet) -> None:
    key = fleet.create_key(max_uses=3, tags={"site": "lab"})["join_token"]
    devices = [RawDevice(fleet.enroll(f"lab-{n}", key), fleet.mqtt_port) for n in range(2)]
    try:
        created = fleet.api.post(
            "/api/v1/commands", json={"type": "ping", "tag": "site=lab"}
        ).json()
        assert sorted(c["device_id"] for c in created) == sorted(d.device_id for d in devices)
        for raw in devices:
            assert raw.next(TopicKind.COMMANDS)["type"] == "ping"
        missing = fleet.api.post("/api/v1/commands", json={"type": "ping", "tag": "site=mars"})
        assert missing.status_code == 404
    finally:
        for raw in devices:
            raw.close()


def test_every_stored_message_is_receipted_and_duplicates_are_stored_once(
    fleet: Fleet, device: RawDevice
) -> None:
    log = LogMessage(level=LogLevel.WARNING, logger="camera", message="lens fogged")
    device.send(TopicKind.LOGS, log)
    assert log.message_id in device.receipted_ids()

    device.send(TopicKind.LOGS, log)  # replayed by an outbox that missed the receipt
    assert log.message_id in device.receipted_ids()

    records = fleet.api.get(f"/api/v1/devices/{device.device_id}/logs").json()
    assert [r["message"] for r in records] == ["lens fogged"]


def test_logs_filter_by_level_and_text(fleet: Fleet, device: RawDevice) -> None:
    for level, text in ((LogLevel.INFO, "started"), (LogLevel.ERROR, "disk failing")):
        device.send(TopicKind.LOGS, LogMessage(level=level, logger="agent", message=text))
    wait_until(
        lambda: len(fleet.api.get(f"/api/v1/devices/{device.device_id}/logs").json()) == 2,
        what="two log records",
    )
    url = f"/api/v1/devices/{device.device_id}/logs"
    assert [r["message"] for r in fleet.api.get(url, params={"level": "WARNING"}).json()] == [
        "disk failing"
    ]
    assert [r["message"] for r in fleet.api.get(url, params={"q": "start"}).json()] == ["started"]
    assert fleet.api.get(url, params={"level": "LOUD"}).status_code == 422


def test_desired_state_is_retained_and_reported_generation_tracked(
    fleet: Fleet, device: RawDevice
) -> None:
    url = f"/api/v1/devices/{device.device_id}/desired"
    updated = fleet.api.put(url, json={"config": {"telemetry_interval_s": 10}}).json()
    assert updated["generation"] == 1

    desired = device.next(TopicKind.DESIRED)
    assert desired == {
        "generation": 1,
        "config": {"telemetry_interval_s": 10.0, "log_level": None, "log_forward_level": None},
        "models": [],
    }
    assert fleet.device(device.device_id)["reported_generation"] is None

    device.send(
        TopicKind.REPORTED,
        ReportedState(generation=1, applied=True, config={"telemetry_interval_s": 10}),
        retain=True,
    )
    wait_until(lambda: fleet.device(device.device_id)["reported_generation"] == 1, what="report")
    bad = fleet.api.put(url, json={"config": {"telemetry_interval_s": 0}})
    assert bad.status_code == 422
    assert fleet.api.get(url).json()["generation"] == 1


def test_a_device_that_connects_later_gets_the_latest_desired_state(fleet: Fleet) -> None:
    state_dir = fleet.enroll("late")
    device_id = json.loads((state_dir / "device.json").read_text())["device_id"]
    url = f"/api/v1/devices/{device_id}/desired"
    for interval in (10, 20, 30):
        fleet.api.put(url, json={"config": {"telemetry_interval_s": interval}})

    wait_until(lambda: fleet.api.get(url).json()["generation"] == 3, what="generation 3")
    raw = RawDevice(state_dir, fleet.mqtt_port)
    try:
        desired = wait_until(
            lambda: (d := raw.next(TopicKind.DESIRED))["generation"] == 3 and d, what="gen 3"
        )
        assert desired["config"]["telemetry_interval_s"] == 30
    finally:
        raw.close()


@pytest.mark.parametrize("kind", [TopicKind.ACKS, TopicKind.LOGS, TopicKind.REPORTED])
def test_malformed_messages_on_every_device_topic_are_rejected_and_counted(
    fleet: Fleet, device: RawDevice, kind: TopicKind
) -> None:
    device.send(kind, b"{not json")
    device.send(kind, json.dumps({"schema_version": 1, "surprise": True}).encode())
    good = LogMessage(level=LogLevel.ERROR, logger="t", message="still flowing")
    device.send(TopicKind.LOGS, good)

    assert good.message_id in device.receipted_ids()
    stats = fleet.stats()
    assert stats["rejected"]["json"] == 1
    assert stats["rejected"]["schema"] == 1
    with pytest.raises(queue.Empty):
        device.next(TopicKind.RECEIPTS, timeout=0.5)


def test_unknown_command_ack_is_counted_not_stored_against_anything(
    fleet: Fleet, device: RawDevice
) -> None:
    ack = AckMessage(command_id="cmd-doesnotexist", status=AckStatus.SUCCEEDED)
    device.send(TopicKind.ACKS, ack)
    assert ack.message_id in device.receipted_ids()
    assert fleet.stats()["rejected"]["unknown-command"] == 1


def test_cli_sends_a_command_and_prints_its_final_state(fleet: Fleet, device: RawDevice) -> None:
    cli = fleet.cli("devices", "command", device.device_id, "ping", "--param", "n=3")

    command = device.next(TopicKind.COMMANDS)
    assert command["params"] == {"n": 3}
    device.send(
        TopicKind.ACKS,
        AckMessage(command_id=command["id"], status=AckStatus.SUCCEEDED, result={"pong": True}),
    )
    out, err = cli.communicate(timeout=30)

    assert cli.returncode == 0, err
    assert f"{command['id']} {device.device_id}: succeeded" in out
    assert '"pong": true' in out


def test_cli_refuses_bad_params_and_unknown_devices(fleet: Fleet) -> None:
    bad = fleet.cli("devices", "command", "dev-000000000000", "ping", "--param", "oops")
    _, err = bad.communicate(timeout=30)
    assert bad.returncode == 2
    assert "key=value" in err
    unknown = fleet.cli("devices", "command", "dev-000000000000", "ping")
    _, err = unknown.communicate(timeout=30)
    assert unknown.returncode == 1
    assert "not enrolled" in err


def test_commands_beyond_the_device_queue_are_dropped_and_desired_state_still_converges(
    tmp_path: Path, database_url: str | None
) -> None:
    fleet = start_fleet(
        tmp_path,
        database_url,
        extra_env={"EDGEFLEET_COMMAND_QUEUE_MAX": "5", "EDGEFLEET_COMMAND_IN_FLIGHT_MAX": "2"},
    )
    try:
        state_dir = fleet.enroll("sleepy")
        first = RawDevice(state_dir, fleet.mqtt_port, persistent=True)
        wait_until(lambda: fleet.device(first.device_id)["status"] == "online", what="online")
        first.close()

        url = f"/api/v1/devices/{first.device_id}"
        created = [
            fleet.api.post(f"{url}/commands", json={"type": "ping", "params": {"n": n}}).json()
            for n in range(8)
        ]
        for interval in (10, 20, 30):
            fleet.api.put(f"{url}/desired", json={"config": {"telemetry_interval_s": interval}})

        dropped = [c for c in created if c["status"] == "dropped"]
        assert len(dropped) == 3
        counted = fleet.api.get(
            "/api/v1/commands", params={"device_id": first.device_id, "status": "dropped"}
        ).json()
        assert sorted(c["id"] for c in counted) == sorted(c["id"] for c in dropped)
        assert "already wait for this device" in dropped[0]["detail"]
        device = RawDevice(state_dir, fleet.mqtt_port, persistent=True)
        try:
            for _ in range(5):  # two at a time: each ack lets the next one out
                command = device.next(TopicKind.COMMANDS)
                device.send(
                    TopicKind.ACKS,
                    AckMessage(command_id=command["id"], status=AckStatus.SUCCEEDED),
                )
            desired = device.next(TopicKind.DESIRED)
            while desired["generation"] < 3:
                desired = device.next(TopicKind.DESIRED)
            assert desired["config"]["telemetry_interval_s"] == 30
        finally:
            device.close()
        kept = [c["id"] for c in created if c["status"] != "dropped"]
        wait_until(
            lambda: all(command_status(fleet, c) == "succeeded" for c in kept), what="all acked"
        )
        with pytest.raises(queue.Empty):
            device.next(TopicKind.COMMANDS, timeout=0.5)
    finally:
        fleet.close()
