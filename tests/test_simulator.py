"""edgefleet-sim against a real fleet: real enrollment, real broker, real service, no mocks.

The simulator runs as its own process (as an operator runs it), so killing it is a real lost
connection and the broker's Last Will is what the service sees.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.fixtures.fleet import Fleet, wait_until

# Short intervals so a test sees every kind of message within seconds.
TELEMETRY_INTERVAL_S = 1.0
RESULTS_INTERVAL_S = 2.0


class Sim:
    """A running ``edgefleet-sim`` process and its stats file."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.stats_path = tmp / f"{name}-stats.json"
        self.log_path = tmp / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fleet_sim",
                    "--no-progress",
                    "--stats-file",
                    str(self.stats_path),
                    "--telemetry-interval",
                    str(TELEMETRY_INTERVAL_S),
                    "--results-interval",
                    str(RESULTS_INTERVAL_S),
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stats(self) -> dict[str, Any]:
        """The latest snapshot, or {} before the first one is written."""
        try:
            snapshot: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return snapshot

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM: every device announces offline, then the process exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: every session drops without a word; the broker publishes the Last Wills."""
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[list[Sim]]:
    """Simulators a test started; killed at the end if still running."""
    started: list[Sim] = []
    yield started
    for sim in started:
        if sim.process.poll() is None:
            sim.kill()


def start_sim(sims: list[Sim], tmp: Path, name: str, *args: str) -> Sim:
    sim = Sim(tmp, name, *args)
    sims.append(sim)
    return sim


def device_statuses(fleet: Fleet) -> dict[str, str]:
    devices = fleet.api.get("/api/v1/devices").json()
    return {device["id"]: device["status"] for device in devices}


def rows_per_device(fleet: Fleet, table: str) -> dict[str, int]:
    with fleet.engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT device_id, count(*) FROM {table} GROUP BY device_id")  # noqa: S608
        ).all()
    return {str(device_id): int(count) for device_id, count in rows}


def all_online(fleet: Fleet, count: int) -> dict[str, str] | None:
    statuses = device_statuses(fleet)
    if len(statuses) == count and set(statuses.values()) == {"online"}:
        return statuses
    return None


def test_simulated_devices_enroll_report_results_and_ack_commands(
    sqlite_fleet: Fleet, tmp_path: Path, sims: list[Sim]
) -> None:
    fleet = sqlite_fleet
    devices = 20
    token = fleet.create_key(max_uses=devices)["join_token"]
    token_file = tmp_path / "join-token"
    token_file.write_text(token + "\n")
    sim = start_sim(
        sims,
        tmp_path,
        "sim",
        "--devices",
        str(devices),
        "--join-token-file",
        str(token_file),
        "--state-dir",
        str(tmp_path / "sim-state"),
    )

    statuses = wait_until(
        lambda: all_online(fleet, devices), timeout=60, what=f"{devices} devices online"
    )
    wait_until(lambda: sim.stats().get("enrolled_new") == devices, what="the stats file")
    # Every device enrolled through the API: its own identity dir with its own key.
    keys = {p.read_bytes() for p in (tmp_path / "sim-state" / "devices").glob("*/device.key")}
    assert len(keys) == devices

    def every_device_has(table: str, at_least: int) -> bool:
        counts = rows_per_device(fleet, table)
        return set(counts) == set(statuses) and min(counts.values()) >= at_least

    wait_until(lambda: every_device_has("telemetry_sample", 3), timeout=30, what="telemetry")
    wait_until(lambda: every_device_has("inference_result", 1), timeout=60, what="results")
    assert fleet.stats()["rejected"] == {}

    target = sorted(statuses)[0]
    created = fleet.api.post(f"/api/v1/devices/{target}/commands", json={"type": "ping"})
    assert created.status_code == 201, created.text
    command_id = created.json()["id"]

    def command_done() -> dict[str, Any] | None:
        command: dict[str, Any] = fleet.api.get(f"/api/v1/commands/{command_id}").json()
        return command if command["status"] == "succeeded" else None

    command = wait_until(command_done, timeout=30, what="the ping to succeed")
    assert command["result"]["pong"] is True
    with fleet.engine.connect() as conn:
        acks = conn.execute(
            text("SELECT status FROM command_ack WHERE command_id = :id ORDER BY timestamp"),
            {"id": command_id},
        ).all()
    assert [status for (status,) in acks] == ["accepted", "running", "succeeded"]
    wait_until(lambda: sim.stats().get("acks", 0) >= 3, what="the acks counted")
    # Telemetry is receipted by the service, and the simulator measured how long that took.
    assert sim.stats()["receipt_lag_s"]["samples"] > 0

    assert sim.stop() == 0, sim.log()
    wait_until(
        lambda: set(device_statuses(fleet).values()) == {"offline"},
        timeout=20,
        what="every device offline after a clean stop",
    )


def test_a_second_run_reuses_identities_and_a_killed_sim_goes_offline(
    sqlite_fleet: Fleet, tmp_path: Path, sims: list[Sim]
) -> None:
    fleet = sqlite_fleet
    devices = 5
    token = fleet.create_key(max_uses=devices)["join_token"]
    state_dir = str(tmp_path / "sim-state")
    first = start_sim(
        sims, tmp_path, "first", "--devices", str(devices), "--join-token", token,
        "--state-dir", state_dir, "--duration", "3",
    )  # fmt: skip
    assert first.process.wait(timeout=60) == 0, first.log()
    assert first.stats()["enrolled_new"] == devices
    enrolled = set(device_statuses(fleet))
    assert len(enrolled) == devices

    # No join token this time (the key is used up anyway): every identity is reused.
    second = start_sim(
        sims, tmp_path, "second", "--devices", str(devices), "--state-dir", state_dir
    )
    wait_until(lambda: all_online(fleet, devices), timeout=30, what="the same devices online")
    wait_until(lambda: second.stats().get("enrolled_reused") == devices, what="the stats file")
    assert second.stats()["enrolled_new"] == 0
    assert set(device_statuses(fleet)) == enrolled

    second.kill()
    wait_until(
        lambda: set(device_statuses(fleet).values()) == {"offline"},
        timeout=30,
        what="the Last Wills to mark every device offline",
    )


def test_an_unenrolled_device_without_a_token_is_refused_naming_the_fix(
    tmp_path: Path, sims: list[Sim]
) -> None:
    sim = start_sim(sims, tmp_path, "lost", "--devices", "2", "--state-dir", str(tmp_path / "s"))
    assert sim.process.wait(timeout=30) == 2
    assert "pass --join-token or --join-token-file" in sim.log()
