"""Scale benchmark: 1k, 5k and 10k simulated devices against the embedded default fleet.

One ``edgefleet up`` (its supervised Mosquitto, SQLite) serves every step; ``edgefleet-sim``
runs the devices in its own process (real enrollment through the API, one real mTLS MQTT
session each, telemetry every 30 s from a random phase, a result now and then). The state dir
is shared between steps, so a larger step enrolls only the devices the smaller one lacked.
Per step (``--sizes``, default 1000,5000,10000), one JSON line on stdout and a row of the table:

resources
    After every device is connected and one telemetry interval has spread them out, CPU% and
    RSS of the broker, the service and the simulator over a ``--steady`` window (psutil on
    their pids: CPU is the mean over the window, RSS the largest sample), and per 1k devices.
ingest lag
    Telemetry timestamp to the service's commit, p50/p99: the simulator times each telemetry
    message until the service's receipt names it, which the service publishes only after the
    row's transaction committed (one broker hop back included). Next to it, from the rows
    themselves, timestamp to ``received_at`` (the arrival part of that lag).
reconnect storm
    The broker is SIGKILLed; ``edgefleet up`` restarts it, and every device reconnects with the
    agents' jittered backoff. Timed from the broker accepting TCP again until every device
    has a session again (the simulator's counters, one-second resolution), as devices per
    second, next to the broker's own TLS + CONNECT handshake rate measured in the same run (a
    tight loop of raw handshakes with one certificate, one at a time, before the storm). The
    ratio says how close the fleet's reconnect gets to what the broker can accept at all.

Writes everything to ``bench/results/scale-<date>.json`` too.

    PYTHONPATH=. .venv/bin/python bench/scale.py [--sizes 1000,5000,10000] [--steady 60]
        [--telemetry-interval 30] [--handshake-seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import (
    admin_token,
    api_base,
    issue_identity,
    note,
    progress,
    progress_done,
    server_context,
    start_service,
    stop_process,
)
from sqlmodel import Session, col, select

from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine
from fleet_service.tables import TelemetrySample

DEFAULT_SIZES = (1000, 5000, 10000)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HANDSHAKE_IDENTITY = "bench-handshake"
# Enrollment is rate-limited per address (20/minute by default); every simulated device comes
# from this one address, so the bench's service lifts the limit.
ENROLL_RATE = "1000000/minute"
# The longest a step may take to enroll and connect its devices, per 1k devices.
CONNECT_TIMEOUT_PER_1K_S = 240.0
STORM_TIMEOUT_S = 600.0
RSS_SAMPLE_INTERVAL_S = 2.0


class BenchError(RuntimeError):
    """The run cannot produce figures."""


@dataclass
class Fleet:
    settings: ServiceSettings
    process: subprocess.Popen[bytes]
    token_file: Path
    work: Path

    def broker(self) -> psutil.Process:
        """The mosquitto ``edgefleet up`` supervises (a new pid after each restart)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if child.name() == "mosquitto":
                return child
        raise BenchError("edgefleet up runs no mosquitto child; see service.log")


class Sim:
    """An ``edgefleet-sim`` process and its stats file."""

    def __init__(
        self, fleet: Fleet, devices: int, telemetry_interval: float, lag_window: float
    ) -> None:
        self.stats_path = fleet.work / f"sim-{devices}.json"
        self.log_path = fleet.work / f"sim-{devices}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fleet_sim",
                    "--devices",
                    str(devices),
                    "--join-token-file",
                    str(fleet.token_file),
                    "--state-dir",
                    str(fleet.work / "sim-state"),
                    "--telemetry-interval",
                    str(telemetry_interval),
                    "--no-progress",
                    "--stats-file",
                    str(self.stats_path),
                    # The lag percentiles then cover exactly the measuring window.
                    "--lag-window",
                    str(lag_window),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stats(self) -> dict[str, Any]:
        if self.process.poll() is not None:
            raise BenchError(
                f"edgefleet-sim exited with {self.process.returncode}; see {self.log_path}"
            )
        try:
            snapshot: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return snapshot

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_fleet(work: Path, max_devices: int) -> Fleet:
    settings, password, process = start_service(
        work, None, extra_env={"EDGEFLEET_ENROLL_RATE_PER_ADDRESS": ENROLL_RATE}
    )
    with httpx.Client(verify=server_context(settings), timeout=30) as client:
        token = admin_token(client, settings, password)
        answer = client.post(
            f"{api_base(settings)}/keys",
            json={"max_uses": max_devices, "expires_in_s": 86_400},
            headers={"Authorization": f"Bearer {token}"},
        )
        answer.raise_for_status()
    token_file = work / "join-token"
    token_file.write_text(answer.json()["join_token"])
    token_file.chmod(0o600)
    return Fleet(settings, process, token_file, work)


# --- the baseline: raw TLS + CONNECT handshakes ---------------------------------------------


def _mqtt_connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT, clean session, keepalive 60 (the smallest valid one)."""
    ident = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = len(ident).to_bytes(2, "big") + ident
    body = variable + payload
    return b"\x10" + bytes([len(body)]) + body


def handshake_rate(fleet: Fleet, seconds: float) -> float:
    """Raw TLS + CONNECT/CONNACK + DISCONNECT handshakes per second, one at a time."""
    cert, key = issue_identity(fleet.settings, HANDSHAKE_IDENTITY, fleet.work)
    context = server_context(fleet.settings)
    context.load_cert_chain(str(cert), str(key))
    connect = _mqtt_connect_packet(HANDSHAKE_IDENTITY)
    port = fleet.settings.mqtt_port
    count = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(connect)
            connack = tls.recv(4)
            if connack[:1] != b"\x20" or connack[3:4] != b"\x00":
                raise BenchError(f"the broker refused the handshake identity: {connack!r}")
            tls.sendall(b"\xe0\x00")
        count += 1
    return count / (time.monotonic() - started)


# --- one step --------------------------------------------------------------------------------


def sample_processes(
    processes: dict[str, psutil.Process], seconds: float
) -> dict[str, dict[str, float]]:
    """Mean CPU% over ``seconds`` and the largest RSS (MiB) of each process."""
    for process in processes.values():
        process.cpu_percent(None)
    rss = dict.fromkeys(processes, 0.0)
    started = time.monotonic()
    while (left := seconds - (time.monotonic() - started)) > 0:
        time.sleep(min(RSS_SAMPLE_INTERVAL_S, left))
        for name, process in processes.items():
            rss[name] = max(rss[name], process.memory_info().rss / 2**20)
        progress(f"steady window: {seconds - left:.0f}/{seconds:.0f} s")
    progress_done()
    return {
        name: {"cpu_percent": round(process.cpu_percent(None), 1), "rss_mib": round(rss[name], 1)}
        for name, process in processes.items()
    }


def arrival_lag(fleet: Fleet, since: datetime) -> dict[str, float | int | None]:
    """p50/p99 seconds from a telemetry row's timestamp to its ``received_at``."""
    engine = create_db_engine(fleet.settings.resolved_database_url)
    try:
        with Session(engine) as session:
            rows = session.exec(
                select(TelemetrySample.timestamp, TelemetrySample.received_at).where(
                    col(TelemetrySample.timestamp) >= since
                )
            ).all()
    finally:
        engine.dispose()
    lags = sorted((received - stamp).total_seconds() for stamp, received in rows)
    if not lags:
        return {"p50": None, "p99": None, "rows": 0}
    return {
        "p50": round(lags[len(lags) // 2], 4),
        "p99": round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 4),
        "rows": len(lags),
    }


def wait_connected(sim: Sim, devices: int, timeout: float, after_connects: int = 0) -> float:
    """Wait until all ``devices`` hold a session (and ``after_connects`` more sessions were
    made in total); returns the monotonic time it was seen."""

    def done() -> bool:
        stats = sim.stats()
        progress(
            f"enrolled {stats.get('enrolled_new', 0) + stats.get('enrolled_reused', 0)}"
            f"/{devices}, connected {stats.get('connected', 0)}/{devices}"
        )
        return (
            stats.get("connected") == devices
            and stats.get("connects", 0) >= after_connects + devices
        )

    wait_for(done, timeout, f"{devices} simulated devices connected")
    progress_done()
    return time.monotonic()


def reconnect_storm(fleet: Fleet, sim: Sim, devices: int) -> dict[str, float]:
    """Kill the broker; time from it listening again to every device reconnected."""
    connects_before = sim.stats()["connects"]
    broker = fleet.broker()
    killed_at = time.monotonic()
    broker.send_signal(signal.SIGKILL)
    broker.wait(30)

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", fleet.settings.mqtt_port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(listening, 60, "the broker to be restarted")
    up_at = time.monotonic()
    done_at = wait_connected(sim, devices, STORM_TIMEOUT_S, after_connects=connects_before)
    storm_s = done_at - up_at
    return {
        "broker_down_s": round(up_at - killed_at, 2),
        "reconnect_all_s": round(storm_s, 2),
        "reconnects_per_s": round(devices / storm_s, 1),
    }


def run_step(
    fleet: Fleet, devices: int, args: argparse.Namespace, handshakes_per_s: float
) -> dict[str, Any]:
    note(f"step {devices} devices: enrolling what is missing and connecting")
    sim = Sim(fleet, devices, args.telemetry_interval, args.steady)
    try:
        started = time.monotonic()
        wait_connected(sim, devices, CONNECT_TIMEOUT_PER_1K_S * max(1.0, devices / 1000))
        connect_s = time.monotonic() - started
        note(f"  all connected after {connect_s:.0f} s; one telemetry interval to settle")
        time.sleep(args.telemetry_interval)
        window_start = datetime.now(UTC)
        processes = {
            "broker": fleet.broker(),
            "service": psutil.Process(fleet.process.pid),
            "sim": psutil.Process(sim.process.pid),
        }
        usage = sample_processes(processes, args.steady)
        time.sleep(1.5)  # the stats file is rewritten every second
        stats = sim.stats()
        lag = stats["receipt_lag_s"]
        arrival = arrival_lag(fleet, window_start - timedelta(seconds=1))
        note("  reconnect storm: SIGKILL the broker")
        storm = reconnect_storm(fleet, sim, devices)
    finally:
        sim.stop()
    per_1k = devices / 1000
    return {
        "devices": devices,
        "telemetry_interval_s": args.telemetry_interval,
        "steady_window_s": args.steady,
        "enrolled_new": stats["enrolled_new"],
        "connect_all_s": round(connect_s, 1),
        "usage": usage,
        "per_1k_devices": {
            name: {
                "cpu_percent": round(u["cpu_percent"] / per_1k, 2),
                "rss_mib": round(u["rss_mib"] / per_1k, 1),
            }
            for name, u in usage.items()
        },
        "telemetry_msgs_per_s": round(devices / args.telemetry_interval, 1),
        "ingest_lag_s": {
            "p50": lag["p50"],
            "p99": lag["p99"],
            "samples": lag["samples"],
            "measured": "telemetry timestamp -> receipt (sent after commit)",
        },
        "arrival_lag_s": arrival,
        "storm": {
            **storm,
            "broker_handshakes_per_s": round(handshakes_per_s, 1),
            "ratio_reconnect_to_handshake": round(storm["reconnects_per_s"] / handshakes_per_s, 3),
        },
        "connection_losses_before_storm": stats["connection_losses"],
    }


def print_table(steps: list[dict[str, Any]]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    header = (
        f"{'devices':>8} {'broker cpu%/1k':>15} {'broker MiB/1k':>14} {'svc cpu%/1k':>12} "
        f"{'svc MiB/1k':>11} {'lag p50 ms':>11} {'lag p99 ms':>11} {'storm s':>8} "
        f"{'reconn/s':>9} {'hs/s':>7} {'ratio':>6}"
    )
    print(header)
    for step in steps:
        per = step["per_1k_devices"]
        storm = step["storm"]
        print(
            f"{step['devices']:>8} {per['broker']['cpu_percent']:>15} "
            f"{per['broker']['rss_mib']:>14} {per['service']['cpu_percent']:>12} "
            f"{per['service']['rss_mib']:>11} {ms(step['ingest_lag_s']['p50']):>11} "
            f"{ms(step['ingest_lag_s']['p99']):>11} {storm['reconnect_all_s']:>8} "
            f"{storm['reconnects_per_s']:>9} {storm['broker_handshakes_per_s']:>7} "
            f"{storm['ratio_reconnect_to_handshake']:>6}"
        )


def parse_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError("sizes are comma-separated device counts") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes are comma-separated positive device counts")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=DEFAULT_SIZES,
        help="comma-separated device counts, run smallest first (default 1000,5000,10000)",
    )
    parser.add_argument(
        "--steady", type=float, default=60.0, help="seconds of the measuring window (default 60)"
    )
    parser.add_argument(
        "--telemetry-interval", type=float, default=30.0, help="seconds (default 30)"
    )
    parser.add_argument(
        "--handshake-seconds",
        type=float,
        default=5.0,
        help="length of the raw handshake loop (default 5)",
    )
    args = parser.parse_args()
    needed = max(args.sizes) + 1024
    soft, hard = psutil.Process().rlimit(psutil.RLIMIT_NOFILE)
    if soft < needed:
        if hard != psutil.RLIM_INFINITY and hard < needed:
            raise SystemExit(
                f"{max(args.sizes)} devices need about {needed} open files per process (the "
                f"broker holds one per session) but the hard limit is {hard}; raise it"
            )
        psutil.Process().rlimit(psutil.RLIMIT_NOFILE, (needed, hard))

    steps: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-scale-") as tmp:
            note("starting edgefleet up (its mosquitto, SQLite)")
            fleet = start_fleet(Path(tmp), max(args.sizes))
            try:
                note("baseline: raw TLS + CONNECT handshakes against the broker")
                handshakes = handshake_rate(fleet, args.handshake_seconds)
                note(f"  {handshakes:.0f} handshakes/s")
                for devices in args.sizes:
                    step = run_step(fleet, devices, args, handshakes)
                    print(json.dumps(step), flush=True)
                    steps.append(step)
            finally:
                stop_process(fleet.process)
    except (BenchError, httpx.HTTPError, psutil.Error) as exc:
        raise SystemExit(f"benchmark failed: {exc}") from None
    finally:
        if steps:
            RESULTS_DIR.mkdir(exist_ok=True)
            out = RESULTS_DIR / f"scale-{datetime.now(UTC):%Y-%m-%d}.json"
            out.write_text(
                json.dumps(
                    {
                        "machine": {
                            "cpus": os.cpu_count(),
                            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                        },
                        "database": "sqlite",
                        "steps": steps,
                    },
                    indent=2,
                )
                + "\n"
            )
            note(f"wrote {out}")
    print_table(steps)


if __name__ == "__main__":
    main()
