"""Ingest benchmark: telemetry rows the service commits per second, as a ratio to a baseline.

Simulated devices (real MQTT clients, each enrolled through the real API with its own key and
certificate) publish telemetry at QoS 1 as fast as the broker acknowledges. In the same run a
bare paho-mqtt subscriber (a read-only "tap" identity on the same broker) receives the same
stream. The figure that matters is the ratio: service rows committed per second divided by the
tap's messages received per second. 1.0 means ingestion keeps up with the broker's fan-out.

    .venv/bin/python bench/ingest.py [--devices 50] [--seconds 10] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from common import (
    Device,
    enroll_devices,
    issue_identity,
    progress,
    progress_done,
    scratch_database,
    start_service,
)
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from fleet_protocol import TelemetryMessage, TopicKind, device_topic, subscription_for
from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine

TAP_IDENTITY = "bench-tap"
# Publishes a device keeps in flight before waiting for PUBACKs; like a busy agent's outbox.
IN_FLIGHT_PER_DEVICE = 20


class Tap:
    """The baseline: a bare paho-mqtt subscriber counting telemetry messages as they arrive."""

    def __init__(self, settings: ServiceSettings, cert: Path, key: Path) -> None:
        self.count = 0
        self.last_at = 0.0
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        context = ssl.create_default_context(cafile=str(settings.home / "ca.crt"))
        context.load_cert_chain(str(cert), str(key))
        self._client.tls_set_context(context)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", settings.mqtt_port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise SystemExit("the tap could not subscribe")

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(subscription_for(TopicKind.TELEMETRY), qos=1)

    def _on_message(self, *_: Any) -> None:
        self.count += 1
        self.last_at = time.monotonic()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def telemetry_payload() -> bytes:
    return TelemetryMessage(
        cpu_percent=12.5,
        load_1=0.4,
        load_5=0.3,
        load_15=0.2,
        memory_percent=40.0,
        memory_used_bytes=400_000_000,
        memory_total_bytes=1_000_000_000,
        disk_percent=50.0,
        disk_used_bytes=8_000_000_000,
        disk_total_bytes=16_000_000_000,
        net_bytes_sent=123_456,
        net_bytes_recv=654_321,
        temperature_c=48.0,
        uptime_s=3600,
        agent_version="bench",
        architecture="aarch64",
        platform="Linux-bench",
    ).to_payload()


async def publish_as(
    device: Device, settings: ServiceSettings, until: float, sent: list[int]
) -> None:
    context = ssl.create_default_context(cafile=str(settings.home / "ca.crt"))
    context.load_cert_chain(str(device.cert), str(device.key))
    topic = device_topic(device.device_id, TopicKind.TELEMETRY)
    async with aiomqtt.Client(
        "127.0.0.1",
        settings.mqtt_port,
        identifier=device.device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        max_inflight_messages=IN_FLIGHT_PER_DEVICE,
    ) as client:
        client.pending_calls_threshold = IN_FLIGHT_PER_DEVICE + 1  # our window, not a leak
        while time.monotonic() < until:
            batch = [
                client.publish(topic, telemetry_payload(), qos=1)
                for _ in range(IN_FLIGHT_PER_DEVICE)
            ]
            await asyncio.gather(*batch)
            sent[0] += len(batch)


async def publish_all(devices: list[Device], settings: ServiceSettings, seconds: float) -> int:
    sent = [0]
    until = time.monotonic() + seconds
    tasks = [asyncio.create_task(publish_as(d, settings, until, sent)) for d in devices]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1)
        progress(f"publishing: {sent[0]} messages sent")
    for task in tasks:
        task.result()
    progress_done()
    return sent[0]


def committed_rows(settings: ServiceSettings) -> int:
    engine = create_db_engine(settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            rows: int = conn.execute(text("SELECT count(*) FROM telemetry_sample")).scalar_one()
            return rows
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL",
        help="PostgreSQL server to run against (a scratch database is made); default SQLite",
    )
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp,
        scratch_database(args.postgres) as database_url,
    ):
        work = Path(tmp)
        settings, password, service = start_service(work, database_url, [TAP_IDENTITY])
        try:
            tap_cert, tap_key = issue_identity(settings, TAP_IDENTITY, work)
            devices = enroll_devices(settings, password, args.devices, work)
            tap = Tap(settings, tap_cert, tap_key)
            rows_before = committed_rows(settings)
            started = time.monotonic()
            sent = asyncio.run(publish_all(devices, settings, args.seconds))

            # Wait for both sides to drain what was sent, then time each to its last message.
            deadline = time.monotonic() + 120
            rows = committed_rows(settings) - rows_before
            rows_done_at = time.monotonic()
            while (tap.count < sent or rows < sent) and time.monotonic() < deadline:
                time.sleep(0.2)
                now_rows = committed_rows(settings) - rows_before
                if now_rows != rows:
                    rows, rows_done_at = now_rows, time.monotonic()
                progress(f"draining: tap {tap.count}/{sent}, service {rows}/{sent}")
            progress_done()
            tap.close()
        finally:
            service.terminate()
            service.wait(timeout=30)

    tap_rate = tap.count / (tap.last_at - started)
    service_rate = rows / (rows_done_at - started)
    result = {
        "devices": args.devices,
        "database": "postgresql" if args.postgres else "sqlite",
        "messages_sent": sent,
        "tap_received": tap.count,
        "service_rows": rows,
        "tap_msgs_per_s": round(tap_rate, 1),
        "service_rows_per_s": round(service_rate, 1),
        "ratio_service_to_tap": round(service_rate / tap_rate, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
