"""Two service processes split the device stream with MQTT v5 shared subscriptions: every
message is stored, none twice, and both replicas did part of the work."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from fleet_protocol import TelemetryMessage, TopicKind
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.raw_device import RawDevice

DEVICES = 4
MESSAGES_PER_DEVICE = 150


@pytest.fixture
def replicated_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    fleet = start_fleet(tmp_path, database_url, replicas=("b",))
    try:
        yield fleet
    finally:
        fleet.close()


def telemetry(n: int) -> TelemetryMessage:
    return TelemetryMessage(
        cpu_percent=n % 100, load_1=0, load_5=0, load_15=0, memory_percent=1,
        memory_used_bytes=1, memory_total_bytes=2, disk_percent=1, disk_used_bytes=1,
        disk_total_bytes=2, net_bytes_sent=n, net_bytes_recv=n, uptime_s=n,
        agent_version="test", architecture="x86_64", platform="test",
    )  # fmt: skip


def ingest_stats(fleet: Fleet, url: str) -> dict[str, int]:
    context = ssl.create_default_context(cafile=str(fleet.home.ca_cert))
    with httpx.Client(base_url=url, verify=context, headers=fleet.api.headers) as client:
        stats: dict[str, int] = client.get("/api/v1/ingest/stats").json()
    return stats


def test_two_replicas_store_every_message_once_and_share_the_work(
    replicated_fleet: Fleet,
) -> None:
    fleet = replicated_fleet
    replica_url = fleet.start_replica("b")
    devices = [RawDevice(fleet.enroll(f"burst-{n}"), fleet.mqtt_port) for n in range(DEVICES)]
    sent: set[str] = set()
    try:
        for n in range(MESSAGES_PER_DEVICE):
            for device in devices:
                message = telemetry(n)
                device.send(TopicKind.TELEMETRY, message)
                sent.add(message.message_id)
    finally:
        for device in devices:
            device.close()

    def stored_ids() -> list[str]:
        with fleet.engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT message_id FROM telemetry_sample"))]

    wait_until(lambda: len(stored_ids()) >= len(sent), timeout=60, what="every message stored")
    ids = stored_ids()
    assert len(ids) == len(set(ids)), "a message was stored twice"
    assert set(ids) == sent, "a message was lost"
    primary, replica = ingest_stats(fleet, fleet.url), ingest_stats(fleet, replica_url)
    assert primary["stored"] > 0
    assert replica["stored"] > 0
    births = DEVICES  # each raw device announces itself once
    assert primary["stored"] + replica["stored"] == len(sent) + births
