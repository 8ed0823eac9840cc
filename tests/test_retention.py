"""Retention and rollups on a real service, SQLite and PostgreSQL: telemetry and results fold
into exact hourly min/mean/max (late data included), the hourly API and charts read them, and
raw rows past retention are deleted in the background while ingestion goes on."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet_protocol import ModelRuntime, ResultMessage, ResultSource, TelemetryMessage, TopicKind
from fleet_service.tables import (
    DeviceLog,
    InferenceResult,
    TelemetryHourly,
    TelemetrySample,
)
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.raw_device import RawDevice

RETENTION_ENV = {
    "EDGEFLEET_RETENTION_INTERVAL_S": "0.5",
    "EDGEFLEET_RETENTION_SETTLE_S": "0",
    "EDGEFLEET_RETENTION_CHUNK_ROWS": "500",
    "EDGEFLEET_RESULTS_RETENTION_DAYS": "30",  # the default (90) would keep the 40-day-old ones
}


@pytest.fixture
def fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    running = start_fleet(tmp_path, database_url, extra_env=RETENTION_ENV)
    try:
        yield running
    finally:
        running.close()


def telemetry(at: datetime, cpu: float, *, temperature: float | None = None) -> TelemetryMessage:
    return TelemetryMessage(
        timestamp=at, cpu_percent=cpu, load_1=cpu / 100, load_5=0, load_15=0,
        memory_percent=50, memory_used_bytes=1000, memory_total_bytes=4000, disk_percent=10,
        disk_used_bytes=1, disk_total_bytes=2, net_bytes_sent=int(cpu), net_bytes_recv=0,
        temperature_c=temperature, uptime_s=60, agent_version="test", architecture="x86_64",
        platform="test",
    )  # fmt: skip


def result(at: datetime, latency_ms: float, *, error: str | None = None) -> ResultMessage:
    return ResultMessage(
        timestamp=at, model="cls", version="1", release=1, sha256="0" * 64,
        runtime=ModelRuntime.ONNX, source=ResultSource.SCHEDULE, latency_ms=latency_ms,
        label=None if error else "cat", error=error,
    )  # fmt: skip


def hours(fleet: Fleet, device_id: str) -> list[dict[str, Any]]:
    since = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    response = fleet.api.get(f"/api/v1/devices/{device_id}/telemetry", params={"since": since})
    assert response.status_code == 200, response.text
    points: list[dict[str, Any]] = response.json()
    return points


def test_telemetry_and_results_fold_into_exact_hours_late_data_included(fleet: Fleet) -> None:
    device = RawDevice(fleet.enroll("folded"), fleet.mqtt_port)
    try:
        yesterday = (datetime.now(UTC) - timedelta(days=1)).replace(minute=0, second=0)
        first, second = yesterday, yesterday + timedelta(hours=1)
        for at, cpu, temp in (
            (first + timedelta(minutes=1), 10.0, None),
            (first + timedelta(minutes=2), 30.0, 40.0),
            (first + timedelta(minutes=3), 20.0, 50.0),
            (second + timedelta(minutes=5), 80.0, None),
        ):
            device.send(TopicKind.TELEMETRY, telemetry(at, cpu, temperature=temp))
        device.send(TopicKind.RESULTS, result(first, 10.0), model="cls")
        device.send(TopicKind.RESULTS, result(first + timedelta(minutes=9), 30.0), model="cls")
        device.send(TopicKind.RESULTS, result(first, 5.0, error="bad input"), model="cls")

        # A range past two days reads the hourly rollups: one point per hour, mid-hour.
        points = wait_until(
            lambda: (p := hours(fleet, device.device_id)) and len(p) == 2 and p,
            20,
            0.2,
            "two hourly points",
        )
        one, two = points
        assert one["timestamp"].startswith(first.replace(minute=30).isoformat()[:16])
        assert one["samples"] == 3
        assert (one["cpu_percent"], one["cpu_percent_min"], one["cpu_percent_max"]) == (
            20.0,
            10.0,
            30.0,
        )
        assert (one["temperature_c"], one["temperature_c_min"], one["temperature_c_max"]) == (
            45.0,
            40.0,
            50.0,
        )
        assert two["samples"] == 1 and two["cpu_percent"] == 80.0 and two["temperature_c"] is None
        assert one["net_bytes_sent"] == 30  # a counter: the hour's highest value

        # A backlog arriving late for an hour already folded merges into it exactly.
        device.send(TopicKind.TELEMETRY, telemetry(first + timedelta(minutes=50), 60.0))
        wait_until(
            lambda: hours(fleet, device.device_id)[0]["samples"] == 4, 20, 0.2, "the late sample"
        )
        late = hours(fleet, device.device_id)[0]
        assert (late["cpu_percent"], late["cpu_percent_max"]) == (30.0, 60.0)

        # The raw route still serves the samples themselves.
        raw = fleet.api.get(
            f"/api/v1/devices/{device.device_id}/telemetry",
            params={"since": (first - timedelta(minutes=1)).isoformat(), "resolution": "raw"},
        ).json()
        assert len(raw) == 5 and all(p["samples"] is None for p in raw)

        by_hour = fleet.api.get(
            "/api/v1/results/hourly", params={"model": "cls", "device_id": device.device_id}
        )
        assert by_hour.status_code == 200, by_hour.text
        (hour,) = by_hour.json()
        assert (hour["results"], hour["errors"]) == (3, 1)
        assert (hour["latency_min_ms"], hour["latency_max_ms"], hour["latency_mean_ms"]) == (
            5.0,
            30.0,
            15.0,
        )
    finally:
        device.close()


def test_bad_ranges_are_refused_with_a_reason(fleet: Fleet) -> None:
    now = datetime.now(UTC)
    backwards = fleet.api.get(
        "/api/v1/results/hourly",
        params={"since": now.isoformat(), "until": (now - timedelta(hours=1)).isoformat()},
    )
    assert backwards.status_code == 400 and "after until" in backwards.json()["detail"]
    huge = fleet.api.get(
        "/api/v1/results/hourly", params={"since": (now - timedelta(days=900)).isoformat()}
    )
    assert huge.status_code == 400 and "at most" in huge.json()["detail"]
    unknown = fleet.api.get(
        "/api/v1/devices/dev-000000000000/telemetry", params={"resolution": "hour"}
    )
    assert unknown.status_code == 404
    wrong = fleet.api.get(
        "/api/v1/devices/dev-000000000000/telemetry", params={"resolution": "minute"}
    )
    assert wrong.status_code == 422


OLD_ROWS = 3000


def _old_rows(device_id: str, received: datetime) -> Iterator[Any]:
    """Rows stored 40 days ago, as if the service had run that long (3 000 telemetry, 50
    results, 50 logs)."""
    for n in range(OLD_ROWS):
        at = received - timedelta(seconds=30 * (OLD_ROWS - n))
        yield TelemetrySample(
            device_id=device_id, message_id=f"old-t-{n:06d}", timestamp=at, received_at=received,
            cpu_percent=n % 100, load_1=1, load_5=1, load_15=1, memory_percent=5,
            memory_used_bytes=1, memory_total_bytes=2, disk_percent=1, disk_used_bytes=1,
            disk_total_bytes=2, net_bytes_sent=n, net_bytes_recv=n, uptime_s=n,
            agent_version="old", architecture="x86_64", platform="test",
        )  # fmt: skip
    for n in range(50):
        yield InferenceResult(
            device_id=device_id, message_id=f"old-r-{n:06d}", timestamp=received,
            received_at=received, model="cls", version="1", release=1, sha256="0" * 64,
            runtime="onnx", source="schedule", latency_ms=n,
        )  # fmt: skip
        yield DeviceLog(
            device_id=device_id, message_id=f"old-l-{n:06d}", timestamp=received,
            received_at=received, level="WARNING", level_no=30, logger="old", message="old",
        )  # fmt: skip


def count(fleet: Fleet, table: Any, **where: Any) -> int:
    with Session(fleet.engine) as session:
        query = select(func.count()).select_from(table)
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        return int(session.exec(query).one())


def test_old_rows_are_rolled_up_then_deleted_while_ingestion_goes_on(fleet: Fleet) -> None:
    device = RawDevice(fleet.enroll("old"), fleet.mqtt_port)
    try:
        received = datetime.now(UTC) - timedelta(days=40)
        with Session(fleet.engine) as session:
            session.add_all(_old_rows(device.device_id, received))
            session.commit()

        # Fresh telemetry keeps arriving while the backlog is folded and deleted.
        stop = threading.Event()
        sent: list[str] = []

        def keep_sending() -> None:
            while not stop.is_set() and len(sent) < 200:
                message = telemetry(datetime.now(UTC), 5.0)
                device.send(TopicKind.TELEMETRY, message)
                sent.append(message.message_id)
                stop.wait(0.02)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            wait_until(
                lambda: count(fleet, TelemetrySample, agent_version="old") == 0,
                60,
                0.2,
                "the old telemetry to be deleted",
            )
        finally:
            stop.set()
            sender.join(10)
        wait_until(lambda: count(fleet, InferenceResult) == 0, 30, 0.2, "old results deleted")
        wait_until(lambda: count(fleet, DeviceLog) == 0, 30, 0.2, "old logs deleted")
        # Everything sent meanwhile was stored, and none of it deleted (it is fresh).
        wait_until(
            lambda: count(fleet, TelemetrySample) == len(sent), 30, 0.2, "the fresh telemetry"
        )
        with Session(fleet.engine) as session:
            folded = session.exec(
                select(func.sum(TelemetryHourly.samples)).where(
                    col(TelemetryHourly.hour) < received + timedelta(hours=1)
                )
            ).one()
        assert folded == OLD_ROWS  # every deleted row is in an hour, once
    finally:
        device.close()


def test_rollups_past_their_retention_expire(fleet: Fleet) -> None:
    state = fleet.enroll("ancient")
    device_id = json.loads((state / "device.json").read_text())["device_id"]
    long_ago = (datetime.now(UTC) - timedelta(days=800)).replace(minute=0, second=0, microsecond=0)
    ancient = TelemetryHourly(
        device_id=device_id, hour=long_ago, samples=1, cpu_min=1, cpu_max=1, cpu_sum=1,
        memory_min=1, memory_max=1, memory_sum=1, disk_sum=1, load_min=1, load_max=1,
        load_sum=1, memory_used_sum=1, memory_total_max=1, net_sent_max=1, net_recv_max=1,
        uptime_max=1,
    )  # fmt: skip
    with Session(fleet.engine) as session:
        session.add(ancient)
        session.commit()
    wait_until(lambda: count(fleet, TelemetryHourly) == 0, 30, 0.2, "the 800-day-old rollup")
