"""Fault tests on the service side: a SIGKILLed service and an unavailable database. Each
checks message ids: nothing lost, nothing stored twice."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from fleet_protocol import LogLevel, LogMessage, TopicKind
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.raw_device import RawDevice

DEVICES = 3
MESSAGES_PER_DEVICE = 400


@pytest.fixture
def slow_batch_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    # Batches a second apart: many messages are committed-but-unacknowledged at any moment,
    # which is the window a kill must not turn into loss or duplicates.
    fleet = start_fleet(
        tmp_path, database_url, extra_env={"EDGEFLEET_INGEST_BATCH_INTERVAL_S": "1.0"}
    )
    try:
        yield fleet
    finally:
        fleet.close()


def stored_log_ids(fleet: Fleet) -> list[str]:
    with fleet.engine.connect() as conn:
        return [row[0] for row in conn.execute(text("SELECT message_id FROM device_log"))]


def burst(devices: list[RawDevice]) -> set[str]:
    """Each device publishes its share at QoS 1; returns the ids the broker acknowledged."""
    sent: set[str] = set()
    try:
        for n in range(MESSAGES_PER_DEVICE):
            for device in devices:
                message = LogMessage(level=LogLevel.INFO, logger="burst", message=f"#{n}")
                device.send(TopicKind.LOGS, message)
                sent.add(message.message_id)
    finally:
        for device in devices:
            device.close()
    return sent


def test_service_killed_mid_ingest_loses_nothing_and_stores_nothing_twice(
    slow_batch_fleet: Fleet,
) -> None:
    fleet = slow_batch_fleet
    # Paused while the burst arrives, the service then takes it in as a backlog whose first
    # batch commits a second before the next: the kill lands between commits and acks.
    devices = [RawDevice(fleet.enroll(f"k{n}"), fleet.mqtt_port) for n in range(DEVICES)]
    fleet.process.send_signal(signal.SIGSTOP)
    try:
        sent = burst(devices)
    finally:
        fleet.process.send_signal(signal.SIGCONT)
    wait_until(lambda: len(stored_log_ids(fleet)) > 0, what="the first batch committed")

    fleet.kill_service()
    stored_at_kill = len(stored_log_ids(fleet))
    fleet.restart_service()

    wait_until(lambda: len(stored_log_ids(fleet)) >= len(sent), timeout=60, what="all stored")
    ids = stored_log_ids(fleet)
    lost = sent - set(ids)
    stored_twice = len(ids) - len(set(ids))
    assert (len(lost), stored_twice) == (0, 0), f"lost={len(lost)} stored_twice={stored_twice}"
    assert stored_at_kill < len(sent), "the kill must land mid-ingest for this test to mean much"


def test_database_outage_acknowledges_nothing_reports_degraded_and_drains_after(
    fleet: Fleet,
) -> None:
    if fleet.settings.database_url is None:
        # An embedded SQLite file has no outage short of deleting it; the server case is the
        # one an owner meets (PostgreSQL restarting or unreachable).
        pytest.skip("a database outage needs a database server: runs on PostgreSQL")

    url = fleet.settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    device = RawDevice(fleet.enroll("patient"), fleet.mqtt_port)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        sent: set[str] = set()
        for n in range(50):
            message = LogMessage(level=LogLevel.INFO, logger="outage", message=f"#{n}")
            device.send(TopicKind.LOGS, message)
            sent.add(message.message_id)
        with fleet.anonymous() as client:
            wait_until(
                lambda: client.get("/api/v1/health").json()["status"] == "degraded",
                what="health to say degraded",
            )
        assert device.inbox[TopicKind.RECEIPTS].empty(), "receipted without a commit"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    receipted: set[str] = set()

    def all_receipted() -> bool:
        receipted.update(device.receipted_ids())
        return receipted >= sent

    wait_until(all_receipted, timeout=60, what="the backlog receipted after recovery")
    device.close()
    ids = stored_log_ids(fleet)
    assert set(ids) == sent
    assert len(ids) == len(set(ids))
    with fleet.anonymous() as client:
        wait_until(lambda: client.get("/api/v1/health").json()["status"] == "ok", what="ok again")
