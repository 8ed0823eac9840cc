"""Ingest benchmark: telemetry rows the service commits per second, as a ratio to a baseline.

Simulated devices (real MQTT clients, each enrolled through the real API with its own key and
certificate) publish telemetry at QoS 1 as fast as the broker acknowledges. In the same run a
bare paho-mqtt subscriber (a read-only "tap" identity on the same broker) receives the same
stream. The figure that matters is the ratio: service rows committed per second divided by the
tap's messages received per second. 1.0 means ingestion keeps up with the broker's fan-out.

Phases (``--phases``, default all three), one JSON line each on stdout:

``single``
    One ``edgefleet up``; every message is new. Rows committed per second against the tap.
``dedup``
    Same service, after ``single``: each device publishes new messages mixed with byte-for-byte
    copies of messages it published earlier (``--replay-share`` of them, default half), oldest
    first, as an agent's outbox replays after a lost receipt. Reported: new rows committed per
    second, messages handled per second (stored + counted as duplicate, from
    ``GET /api/v1/ingest/stats``) and the tap's rate; then ``stored_twice`` (rows minus distinct
    ids) must be 0 and the rows must hold every distinct id sent, or the run fails. Without
    ``single`` an unreported burst first gives the devices something to replay.
``replicas``
    A second fleet: the primary starts with one replica added (so its broker ACL grants it),
    then ``edgefleet up --replica`` runs beside it; both split the stream through an MQTT v5
    shared subscription. The same burst; reported: rows per second committed by both, each
    process's share (``stored`` in each one's ingest stats), the tap's rate and the ratio. The
    stored ids must be exactly the ids sent, none twice, or the run fails. Both processes, the
    broker, the database and the simulated devices share this machine's cores, so a second
    replica need not be faster; the figure says what it is.

    .venv/bin/python bench/ingest.py [--devices 50] [--seconds 10] [--postgres URL]
        [--phases single,dedup,replicas] [--replay-share 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import paho.mqtt.client as mqtt
from common import (
    Device,
    admin_token,
    api_base,
    enroll_devices,
    issue_identity,
    note,
    progress,
    progress_done,
    scratch_database,
    server_context,
    start_replica,
    start_service,
    stop_process,
)
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, text

from fleet_protocol import TelemetryMessage, TopicKind, device_topic, subscription_for
from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine

TAP_IDENTITY = "bench-tap"
REPLICA = "second"
PHASES = ("single", "dedup", "replicas")
# Publishes a device keeps in flight before waiting for PUBACKs; like a busy agent's outbox.
IN_FLIGHT_PER_DEVICE = 20
DRAIN_TIMEOUT_S = 120.0


class BenchError(RuntimeError):
    """The run cannot produce figures, or what was stored is wrong."""


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

    def reset(self) -> None:
        """Start counting afresh (between bursts, once the last one has drained)."""
        self.count = 0
        self.last_at = 0.0

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def telemetry_message() -> TelemetryMessage:
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
    )


@dataclass
class Outbox:
    """What one simulated device has published, oldest first: what it can replay."""

    device: Device
    ids: list[str] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)


@dataclass
class Sent:
    """Messages a burst published (and the broker acknowledged)."""

    new: int = 0
    replayed: int = 0

    @property
    def total(self) -> int:
        return self.new + self.replayed


async def publish_as(
    outbox: Outbox, settings: ServiceSettings, until: float, sent: Sent, replay_share: float
) -> None:
    """Publish until ``until``: new messages, and copies of ones published before this burst
    for ``replay_share`` of them (spread evenly, oldest first, wrapping round)."""
    device = outbox.device
    context = ssl.create_default_context(cafile=str(settings.home / "ca.crt"))
    context.load_cert_chain(str(device.cert), str(device.key))
    topic = device_topic(device.device_id, TopicKind.TELEMETRY)
    replayable = len(outbox.payloads)
    share = replay_share if replayable else 0.0
    owed, cursor = 0.0, 0
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
            payloads, replays = [], 0
            for _ in range(IN_FLIGHT_PER_DEVICE):
                owed += share
                if owed >= 1:
                    owed -= 1
                    payloads.append(outbox.payloads[cursor % replayable])
                    cursor += 1
                    replays += 1
                else:
                    message = telemetry_message()
                    payload = message.to_payload()
                    outbox.ids.append(message.message_id)
                    outbox.payloads.append(payload)
                    payloads.append(payload)
            await asyncio.gather(*(client.publish(topic, p, qos=1) for p in payloads))
            sent.new += len(payloads) - replays
            sent.replayed += replays


async def publish_all(
    outboxes: list[Outbox], settings: ServiceSettings, seconds: float, replay_share: float = 0.0
) -> Sent:
    sent = Sent()
    until = time.monotonic() + seconds
    tasks = [
        asyncio.create_task(publish_as(o, settings, until, sent, replay_share)) for o in outboxes
    ]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1)
        progress(f"publishing: {sent.total} messages sent ({sent.replayed} replays)")
    for task in tasks:
        task.result()
    progress_done()
    return sent


def committed_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        rows: int = conn.execute(text("SELECT count(*) FROM telemetry_sample")).scalar_one()
        return rows


def stored_ids(engine: Engine) -> tuple[int, set[str]]:
    """(rows, distinct message ids) in ``telemetry_sample``."""
    with engine.connect() as conn:
        ids = list(conn.execute(text("SELECT message_id FROM telemetry_sample")).scalars())
    return len(ids), set(ids)


class Stats:
    """``GET /api/v1/ingest/stats`` on one service process, as the admin."""

    def __init__(self, settings: ServiceSettings, token: str) -> None:
        self._client = httpx.Client(
            base_url=api_base(settings),
            verify=server_context(settings),
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    def get(self) -> dict[str, Any]:
        answer = self._client.get("/ingest/stats")
        answer.raise_for_status()
        stats: dict[str, Any] = answer.json()
        return stats

    def handled(self) -> int:
        """Messages the writer has dealt with: stored or recognised as already stored."""
        stats = self.get()
        handled: int = stats["stored"] + stats["duplicates"]
        return handled

    def close(self) -> None:
        self._client.close()


@dataclass
class Watch:
    """A counter that should reach ``target``; ``done_at`` is when it last moved."""

    name: str
    read: Callable[[], int]
    target: int
    value: int = 0
    done_at: float = 0.0


def drain(tap: Tap, sent: int, watches: list[Watch]) -> None:
    """Wait until the tap and every watch have seen all that was sent, timing each to its
    last change (polled every 0.2 s; the tap times itself per message)."""
    now = time.monotonic()
    for watch in watches:
        watch.value, watch.done_at = watch.read(), now
    deadline = now + DRAIN_TIMEOUT_S
    while tap.count < sent or any(w.value < w.target for w in watches):
        if time.monotonic() > deadline:
            progress_done()
            state = ", ".join(f"{w.name} {w.value}/{w.target}" for w in watches)
            raise BenchError(
                f"not drained in {DRAIN_TIMEOUT_S:.0f} s: tap {tap.count}/{sent}, {state}"
            )
        time.sleep(0.2)
        for watch in watches:
            value = watch.read()
            if value != watch.value:
                watch.value, watch.done_at = value, time.monotonic()
        state = ", ".join(f"{w.name} {w.value}/{w.target}" for w in watches)
        progress(f"draining: tap {tap.count}/{sent}, {state}")
    progress_done()


def rate(count: int, started: float, done_at: float) -> float:
    return count / (done_at - started) if done_at > started else 0.0


@dataclass
class Fleet:
    """A running service (and its replicas) with enrolled devices and the tap."""

    settings: ServiceSettings
    engine: Engine
    tap: Tap
    outboxes: list[Outbox]
    stats: dict[str, Stats]  # by process: "primary", then each replica's name


@contextlib.contextmanager
def running_fleet(
    work: Path, database_url: str | None, devices: int, replicas: tuple[str, ...] = ()
) -> Iterator[Fleet]:
    """``edgefleet up`` (with ``replicas`` added first and then run beside it), ``devices``
    enrolled and the tap subscribed; the service's logs are kept in the temp dir on failure."""
    settings, password, service = start_service(
        work, database_url, [TAP_IDENTITY], replicas=replicas
    )
    processes = [service]
    engine = create_db_engine(settings.resolved_database_url)
    stats: dict[str, Stats] = {}
    tap: Tap | None = None
    try:
        with httpx.Client(verify=server_context(settings), timeout=30) as client:
            token = admin_token(client, settings, password)
        stats["primary"] = Stats(settings, token)
        for name in replicas:
            note(f"starting replica {name}")
            replica, process = start_replica(work, settings, name)
            processes.append(process)
            stats[name] = Stats(replica, token)
        tap_cert, tap_key = issue_identity(settings, TAP_IDENTITY, work)
        outboxes = [Outbox(d) for d in enroll_devices(settings, password, devices, work)]
        tap = Tap(settings, tap_cert, tap_key)
        yield Fleet(settings, engine, tap, outboxes, stats)
    except BaseException:
        kept = Path(tempfile.gettempdir())
        for log in work.glob("*.log"):
            shutil.copyfile(log, kept / f"edgefleet-bench-ingest-{log.name}")
        note(f"the service logs are kept as {kept}/edgefleet-bench-ingest-*.log")
        raise
    finally:
        if tap is not None:
            tap.close()
        for one in stats.values():
            one.close()
        for process in reversed(processes):
            stop_process(process)
        engine.dispose()


def burst(fleet: Fleet, seconds: float, replay_share: float = 0.0) -> tuple[float, Sent]:
    """Publish for ``seconds``; returns when it started and what was sent."""
    fleet.tap.reset()
    started = time.monotonic()
    sent = asyncio.run(publish_all(fleet.outboxes, fleet.settings, seconds, replay_share))
    return started, sent


def measure_single(fleet: Fleet, seconds: float) -> dict[str, Any]:
    rows_before = committed_rows(fleet.engine)
    started, sent = burst(fleet, seconds)
    rows = Watch("service", lambda: committed_rows(fleet.engine) - rows_before, sent.total)
    drain(fleet.tap, sent.total, [rows])
    tap_rate = rate(fleet.tap.count, started, fleet.tap.last_at)
    service_rate = rate(rows.value, started, rows.done_at)
    return {
        "messages_sent": sent.total,
        "tap_received": fleet.tap.count,
        "service_rows": rows.value,
        "tap_msgs_per_s": round(tap_rate, 1),
        "service_rows_per_s": round(service_rate, 1),
        "ratio_service_to_tap": round(service_rate / tap_rate, 3),
    }


def measure_dedup(fleet: Fleet, seconds: float, replay_share: float) -> dict[str, Any]:
    stats = fleet.stats["primary"]
    rows_before, before = committed_rows(fleet.engine), stats.get()
    started, sent = burst(fleet, seconds, replay_share)
    rows = Watch("new rows", lambda: committed_rows(fleet.engine) - rows_before, sent.new)
    handled_before = before["stored"] + before["duplicates"]
    handled = Watch("handled", lambda: stats.handled() - handled_before, sent.total)
    drain(fleet.tap, sent.total, [rows, handled])
    after = stats.get()

    total_rows, ids = stored_ids(fleet.engine)
    sent_ids = {i for o in fleet.outboxes for i in o.ids}
    stored_twice = total_rows - len(ids)
    missing = len(sent_ids - ids)
    if stored_twice or missing or ids != sent_ids:
        raise BenchError(
            f"dedup: {total_rows} rows for {len(ids)} distinct ids (stored_twice="
            f"{stored_twice}); {missing} of {len(sent_ids)} ids sent are not stored, "
            f"{len(ids - sent_ids)} stored were never sent"
        )
    tap_rate = rate(fleet.tap.count, started, fleet.tap.last_at)
    handled_rate = rate(handled.value, started, handled.done_at)
    return {
        "replay_share": replay_share,
        "messages_sent": sent.total,
        "new_sent": sent.new,
        "replayed_sent": sent.replayed,
        "tap_received": fleet.tap.count,
        "service_handled": handled.value,
        "service_duplicates": after["duplicates"] - before["duplicates"],
        "new_rows": rows.value,
        "tap_msgs_per_s": round(tap_rate, 1),
        "service_handled_per_s": round(handled_rate, 1),
        "service_new_rows_per_s": round(rate(rows.value, started, rows.done_at), 1),
        "ratio_handled_to_tap": round(handled_rate / tap_rate, 3),
        "distinct_ids_sent": len(sent_ids),
        "rows_stored": total_rows,
        "stored_twice": stored_twice,
    }


def measure_replicas(fleet: Fleet, seconds: float) -> dict[str, Any]:
    before = {name: s.get()["stored"] for name, s in fleet.stats.items()}
    rows_before = committed_rows(fleet.engine)
    started, sent = burst(fleet, seconds)
    rows = Watch("service", lambda: committed_rows(fleet.engine) - rows_before, sent.total)
    drain(fleet.tap, sent.total, [rows])
    stored_by = {name: s.get()["stored"] - before[name] for name, s in fleet.stats.items()}

    total_rows, ids = stored_ids(fleet.engine)
    sent_ids = {i for o in fleet.outboxes for i in o.ids}
    stored_twice = total_rows - len(ids)
    missing, unexpected = len(sent_ids - ids), len(ids - sent_ids)
    if stored_twice or missing or unexpected:
        raise BenchError(
            f"replicas: {total_rows} rows for {len(ids)} distinct ids (stored_twice="
            f"{stored_twice}); {missing} of {len(sent_ids)} ids sent are not stored, "
            f"{unexpected} stored were never sent"
        )
    tap_rate = rate(fleet.tap.count, started, fleet.tap.last_at)
    service_rate = rate(rows.value, started, rows.done_at)
    counted = sum(stored_by.values())
    return {
        "processes": len(fleet.stats),
        "messages_sent": sent.total,
        "tap_received": fleet.tap.count,
        "service_rows": rows.value,
        "tap_msgs_per_s": round(tap_rate, 1),
        "service_rows_per_s": round(service_rate, 1),
        "ratio_service_to_tap": round(service_rate / tap_rate, 3),
        "stored_by": stored_by,
        "share": {name: round(n / counted, 3) if counted else 0.0 for name, n in stored_by.items()},
        "missing": missing,
        "stored_twice": stored_twice,
    }


def emit(phase: str, common: dict[str, Any], figures: dict[str, Any]) -> None:
    print(json.dumps({"phase": phase, **common, **figures}), flush=True)


def parse_phases(value: str) -> tuple[str, ...]:
    phases = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise argparse.ArgumentTypeError(
            f"phases are a comma-separated subset of {','.join(PHASES)}"
        )
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each burst")
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL",
        help="PostgreSQL server to run against (a scratch database is made); default SQLite",
    )
    parser.add_argument(
        "--phases",
        type=parse_phases,
        default=PHASES,
        help=f"comma-separated, run in this order: {','.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--replay-share",
        type=float,
        default=0.5,
        metavar="F",
        help="fraction of the dedup burst that replays already stored messages (default 0.5)",
    )
    args = parser.parse_args()
    if not 0 <= args.replay_share <= 1:
        parser.error("--replay-share is between 0 and 1")
    common = {"devices": args.devices, "database": "postgresql" if args.postgres else "sqlite"}

    try:
        if "single" in args.phases or "dedup" in args.phases:
            with (
                tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp,
                scratch_database(args.postgres) as database_url,
            ):
                note("starting one service")
                with running_fleet(Path(tmp), database_url, args.devices) as fleet:
                    if "single" in args.phases:
                        note("phase single: every message new")
                    else:
                        note("seeding: a burst for the dedup phase to replay (not reported)")
                    figures = measure_single(fleet, args.seconds)
                    if "single" in args.phases:
                        emit("single", common, figures)
                    if "dedup" in args.phases:
                        note(f"phase dedup: {args.replay_share:.0%} replays of stored messages")
                        emit("dedup", common, measure_dedup(fleet, args.seconds, args.replay_share))
        if "replicas" in args.phases:
            with (
                tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp,
                scratch_database(args.postgres) as database_url,
            ):
                note(f"starting a primary with replica {REPLICA} added")
                with running_fleet(Path(tmp), database_url, args.devices, (REPLICA,)) as fleet:
                    note("phase replicas: primary + 1 replica on a shared subscription")
                    emit("replicas", common, measure_replicas(fleet, args.seconds))
    except (BenchError, httpx.HTTPError) as exc:
        raise SystemExit(f"benchmark failed: {exc}") from None


if __name__ == "__main__":
    main()
