"""Command benchmark: REST call to device ack stored, p50/p99, next to a bare MQTT round trip.

Service path, timed per command in this process: ``POST /api/v1/devices/{id}/commands`` is sent
-> the service stores the command and its dispatcher publishes it on ``devices/{id}/commands``
-> the simulated device receives it and publishes ``AckMessage(status=succeeded)`` on
``devices/{id}/acks`` -> the service commits the ack -> the ``command`` event with status
``succeeded`` arrives on the SSE stream ``/api/v1/events`` that this process holds open. The
event is sent only after the ack is committed, so its arrival is "ack stored, visible to an
operator". Accepted/running acks are skipped: this measures the core path.

Baseline, in the same run against the same broker: bare MQTT hops over the same topics, QoS 1,
TLS and ACL, with no REST, database or batching. A true ping-pong is not possible within the
ACL: a device may write only its own reports and read only what is addressed to it, a reader
identity (``EDGEFLEET_BROKER_READERS``) may only read, and the one identity allowed to write
``devices/{id}/commands`` is the control plane's own, which the broker also uses as the client id
(``use_username_as_clientid``), so a second client under it disconnects the service. So the
baseline measures one hop, device -> broker -> subscriber: a simulated device publishes an
``AckMessage`` on its own ``acks`` topic at QoS 1 and a read-only ``bench-tap`` client receives
it. A round trip is two hops, so each baseline round-trip sample is the sum of two one-hop
samples taken one after the other (consecutive pings for N=1; the same device in two
consecutive rounds for N=100). That models the outbound hop (service -> device) by a hop in the
other direction, and is a sum of two real hops rather than one hop doubled, so its p99 is not
inflated. The one-hop p50/p99 are reported as well. Every client here sets TCP_NODELAY, as the
agent, the service and the broker do (with Nagle on, an answer right after a PUBACK waited
~40 ms for a delayed ACK). The service also receives these pings (it subscribes to every
ack) and stores them as acks of unknown commands; that work runs beside the baseline and, if
anything, slows it.

``--ingest-batch-interval`` runs the service with an extra batch-gathering wait (default 0:
commit as soon as the previous commit is done), which is then part of every round trip. For
N=1, one device answers commands sent one after another; for N=100 one command goes to each of
100 devices at once, for several rounds. All simulated devices and both clients run on one
asyncio loop in this process.

    .venv/bin/python bench/commands.py [--devices 100] [--rounds 4] [--sequential 200]
        [--postgres URL] [--ingest-batch-interval S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
from common import (
    Device,
    admin_token,
    api_base,
    enroll_devices,
    issue_identity,
    progress,
    progress_done,
    scratch_database,
    server_context,
    start_service,
)

from fleet_protocol import (
    AckMessage,
    AckStatus,
    CommandMessage,
    DeviceState,
    StatusMessage,
    TopicKind,
    decode,
    device_topic,
    subscription_for,
)
from fleet_service.config import ServiceSettings

NO_DELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

COMMAND_TYPE = "bench-ping"
TAP_IDENTITY = "bench-tap"
SAMPLE_TIMEOUT_S = 30.0
WARMUP_SEQUENTIAL = 10
# Pause between the baseline and the service phase so the service has committed the baseline's
# pings (one batch interval) before its own commands are timed.
SETTLE_S = 1.0


class BenchError(RuntimeError):
    """The run cannot produce figures (a command never answered, a client failed)."""


class Arrivals:
    """When each command's answer arrived; an answer may arrive before anyone waits for it."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._waiting: dict[str, asyncio.Future[float]] = {}

    def arrived(self, command_id: str) -> None:
        at = time.perf_counter()
        future = self._waiting.pop(command_id, None)
        if future is None:
            self._seen[command_id] = at
        elif not future.done():
            future.set_result(at)

    async def wait(self, command_id: str) -> float:
        """The ``perf_counter`` time the answer to ``command_id`` arrived."""
        if command_id in self._seen:
            return self._seen.pop(command_id)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        try:
            return await asyncio.wait_for(future, SAMPLE_TIMEOUT_S)
        except TimeoutError:
            raise BenchError(f"no answer to {command_id} within {SAMPLE_TIMEOUT_S:.0f} s") from None
        finally:
            self._waiting.pop(command_id, None)


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode()


async def simulate_device(
    device: Device,
    settings: ServiceSettings,
    connected: Callable[[str, aiomqtt.Client], None],
) -> None:
    """A device that announces itself online, then answers every command on its topic with
    a succeeded ack, in order."""
    context = server_context(settings)
    context.load_cert_chain(str(device.cert), str(device.key))
    acks = device_topic(device.device_id, TopicKind.ACKS)
    async with aiomqtt.Client(
        "127.0.0.1",
        settings.mqtt_port,
        identifier=device.device_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        socket_options=[NO_DELAY],  # as the agent does (device_agent/connection.py)
    ) as client:
        await client.subscribe(device_topic(device.device_id, TopicKind.COMMANDS), qos=1)
        # Like an agent's birth message: the service publishes commands only to devices that
        # have announced themselves.
        birth = StatusMessage(state=DeviceState.ONLINE, agent_version="bench")
        status = device_topic(device.device_id, TopicKind.STATUS)
        await client.publish(status, birth.to_payload(), qos=1, retain=True)
        connected(device.device_id, client)
        async for message in client.messages:
            command = decode(CommandMessage, _payload_bytes(message.payload))
            ack = AckMessage(command_id=command.id, status=AckStatus.SUCCEEDED)
            await client.publish(acks, ack.to_payload(), qos=1)


@contextlib.asynccontextmanager
async def simulated_devices(
    devices: list[Device], settings: ServiceSettings
) -> AsyncIterator[dict[str, aiomqtt.Client]]:
    """Every device connected and subscribed to its commands until the context exits; yields
    each device's MQTT client by device id."""
    clients: dict[str, aiomqtt.Client] = {}
    all_connected = asyncio.Event()

    def connected(device_id: str, client: aiomqtt.Client) -> None:
        clients[device_id] = client
        progress(f"connected {len(clients)}/{len(devices)} devices")
        if len(clients) == len(devices):
            all_connected.set()

    tasks = [asyncio.create_task(simulate_device(d, settings, connected)) for d in devices]
    try:
        waiter = asyncio.create_task(all_connected.wait())
        await asyncio.wait([waiter, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not all_connected.is_set():
            waiter.cancel()
            raise BenchError(f"only {len(clients)}/{len(devices)} devices could subscribe")
        progress_done()
        yield clients
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_online(settings: ServiceSettings, token: str, devices: list[Device]) -> None:
    """Until the service has stored every device's birth message."""
    wanted = {d.device_id for d in devices}
    async with httpx.AsyncClient(
        base_url=api_base(settings),
        verify=server_context(settings),
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        deadline = time.monotonic() + SAMPLE_TIMEOUT_S
        while time.monotonic() < deadline:
            answer = await http.get("/devices")
            answer.raise_for_status()
            online = {d["id"] for d in answer.json() if d["status"] == "online"} & wanted
            progress(f"service sees {len(online)}/{len(wanted)} devices online")
            if online == wanted:
                progress_done()
                return
            await asyncio.sleep(0.2)
    raise BenchError(f"the service saw {len(online)}/{len(wanted)} devices come online")


async def _collect_acks(client: aiomqtt.Client, arrivals: Arrivals) -> None:
    async for message in client.messages:
        arrivals.arrived(decode(AckMessage, _payload_bytes(message.payload)).command_id)


@contextlib.asynccontextmanager
async def tap(
    settings: ServiceSettings, cert: Path, key: Path, devices: dict[str, aiomqtt.Client]
) -> AsyncIterator[Callable[[str], Awaitable[float]]]:
    """The baseline: a read-only MQTT client on every device's acks; yields ``hop(device_id)``
    returning the seconds from the device publishing a message to the tap receiving it."""
    context = server_context(settings)
    context.load_cert_chain(str(cert), str(key))
    arrivals = Arrivals()
    async with aiomqtt.Client(
        "127.0.0.1",
        settings.mqtt_port,
        identifier=TAP_IDENTITY,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        socket_options=[NO_DELAY],
    ) as client:
        await client.subscribe(subscription_for(TopicKind.ACKS), qos=1)
        collector = asyncio.create_task(_collect_acks(client, arrivals))

        async def hop(device_id: str) -> float:
            started = time.perf_counter()
            ping = AckMessage(command_id="ping-" + secrets.token_hex(8), status=AckStatus.SUCCEEDED)
            topic = device_topic(device_id, TopicKind.ACKS)
            await devices[device_id].publish(topic, ping.to_payload(), qos=1)
            return await arrivals.wait(ping.command_id) - started

        try:
            yield hop
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)


async def _watch_events(
    http: httpx.AsyncClient, arrivals: Arrivals, connected: asyncio.Event
) -> None:
    async with http.stream("GET", "/events", timeout=httpx.Timeout(30, read=None)) as response:
        response.raise_for_status()
        connected.set()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:") and event == "command":
                body = json.loads(line.removeprefix("data:"))
                if body["status"] == "succeeded":
                    arrivals.arrived(body["id"])
            elif not line:
                event = ""


@contextlib.asynccontextmanager
async def service_commander(
    settings: ServiceSettings, token: str, connections: int
) -> AsyncIterator[Callable[[str], Awaitable[float]]]:
    """The service path; yields ``command(device_id)`` returning the seconds from sending the
    REST call to receiving the command's ``succeeded`` event."""
    arrivals = Arrivals()
    async with httpx.AsyncClient(
        base_url=api_base(settings),
        verify=server_context(settings),
        headers={"Authorization": f"Bearer {token}"},
        timeout=SAMPLE_TIMEOUT_S,
        # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them: a
        # request racing the server's close fails with "Server disconnected".
        limits=httpx.Limits(
            max_connections=connections + 1, max_keepalive_connections=None, keepalive_expiry=4.0
        ),
    ) as http:
        connected = asyncio.Event()
        watcher = asyncio.create_task(_watch_events(http, arrivals, connected))
        await asyncio.wait(
            [watcher, asyncio.create_task(connected.wait())],
            timeout=10,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if watcher.done():
            watcher.result()  # raises what went wrong
        if not connected.is_set():
            raise BenchError("could not open the event stream")

        async def command(device_id: str) -> float:
            started = time.perf_counter()
            answer = await http.post(
                f"/devices/{device_id}/commands",
                json={"type": COMMAND_TYPE, "expires_in_s": 60},
            )
            answer.raise_for_status()
            return await arrivals.wait(answer.json()["id"]) - started

        try:
            yield command
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


async def sequential(
    label: str, call: Callable[[str], Awaitable[float]], device: Device, count: int
) -> list[list[float]]:
    """``count`` round trips to one device, one after another; one sample per round."""
    rounds = []
    for n in range(count):
        rounds.append([await call(device.device_id)])
        progress(f"{label}: {n + 1}/{count}")
    return rounds


async def concurrent(
    label: str, call: Callable[[str], Awaitable[float]], devices: list[Device], rounds: int
) -> list[list[float]]:
    """``rounds`` times: one round trip to every device at once; samples by round and device."""
    samples = []
    for n in range(rounds):
        samples.append(list(await asyncio.gather(*(call(d.device_id) for d in devices))))
        progress(f"{label}: round {n + 1}/{rounds}")
    return samples


def pair_sums(hops: list[list[float]]) -> list[float]:
    """Round trips from one-hop samples: round 2k plus round 2k+1, device by device."""
    return [
        out + back
        for first, second in zip(hops[::2], hops[1::2], strict=True)
        for out, back in zip(first, second, strict=True)
    ]


def _percentiles_ms(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return round(cuts[49] * 1000, 2), round(cuts[98] * 1000, 2)


def summary(devices: int, service: list[list[float]], hops: list[list[float]]) -> dict[str, Any]:
    service_p50, service_p99 = _percentiles_ms([s for r in service for s in r])
    baseline_p50, baseline_p99 = _percentiles_ms(pair_sums(hops))
    hop_p50, hop_p99 = _percentiles_ms([s for r in hops for s in r])
    return {
        "devices": devices,
        "samples": sum(len(r) for r in service),
        "service_p50_ms": service_p50,
        "service_p99_ms": service_p99,
        "baseline_p50_ms": baseline_p50,
        "baseline_p99_ms": baseline_p99,
        "ratio_p50": round(service_p50 / baseline_p50, 1),
        "ratio_p99": round(service_p99 / baseline_p99, 1),
        "one_hop_p50_ms": hop_p50,
        "one_hop_p99_ms": hop_p99,
    }


async def measure(
    settings: ServiceSettings,
    password: str,
    devices: list[Device],
    work: Path,
    rounds: int,
    count: int,
) -> list[dict[str, Any]]:
    with httpx.Client(verify=server_context(settings), timeout=30) as client:
        token = admin_token(client, settings, password)
    tap_cert, tap_key = issue_identity(settings, TAP_IDENTITY, work)
    one = devices[0]
    label = f"N={len(devices)}"
    results = []
    async with simulated_devices(devices, settings) as clients:
        await wait_online(settings, token, devices)
        # N=1: commands one after another to a single device (the others stay idle).
        async with tap(settings, tap_cert, tap_key, clients) as hop:
            await sequential("N=1 baseline warm-up", hop, one, WARMUP_SEQUENTIAL)
            hops = await sequential("N=1 baseline", hop, one, 2 * count)
        await asyncio.sleep(SETTLE_S)
        async with service_commander(settings, token, 1) as command:
            await sequential("N=1 service warm-up", command, one, WARMUP_SEQUENTIAL)
            service = await sequential("N=1 service", command, one, count)
        results.append(summary(1, service, hops))
        progress_done()

        # N=devices: one command to every device at once, per round; the first is warm-up.
        async with tap(settings, tap_cert, tap_key, clients) as hop:
            await concurrent(f"{label} baseline warm-up", hop, devices, 1)
            hops = await concurrent(f"{label} baseline", hop, devices, 2 * rounds)
        await asyncio.sleep(SETTLE_S)
        async with service_commander(settings, token, len(devices)) as command:
            await concurrent(f"{label} service warm-up", command, devices, 1)
            service = await concurrent(f"{label} service", command, devices, rounds)
        results.append(summary(len(devices), service, hops))
        progress_done()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="devices for the N>1 case")
    parser.add_argument(
        "--rounds", type=int, default=4, help="measured rounds of one command per device"
    )
    parser.add_argument(
        "--sequential", type=int, default=200, help="commands sent one by one for N=1"
    )
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL",
        help="PostgreSQL server to run against (a scratch database is made); default SQLite",
    )
    parser.add_argument(
        "--ingest-batch-interval",
        type=float,
        default=None,
        metavar="S",
        help="run the service with this EDGEFLEET_INGEST_BATCH_INTERVAL_S (default: its own)",
    )
    args = parser.parse_args()
    extra_env = {}
    if args.ingest_batch_interval is not None:
        extra_env["EDGEFLEET_INGEST_BATCH_INTERVAL_S"] = str(args.ingest_batch_interval)

    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp,
        scratch_database(args.postgres) as database_url,
    ):
        work = Path(tmp)
        settings, password, service = start_service(
            work, database_url, [TAP_IDENTITY], extra_env=extra_env
        )
        try:
            devices = enroll_devices(settings, password, args.devices, work)
            results = asyncio.run(
                measure(settings, password, devices, work, args.rounds, args.sequential)
            )
        except (BenchError, httpx.HTTPError) as exc:
            kept = Path(tempfile.gettempdir()) / "edgefleet-bench-commands-service.log"
            shutil.copyfile(work / "service.log", kept)
            raise SystemExit(f"benchmark failed: {exc}; the service's log is in {kept}") from None
        finally:
            service.terminate()
            service.wait(timeout=30)

    batch_interval = (
        args.ingest_batch_interval
        if args.ingest_batch_interval is not None
        else ServiceSettings.model_fields["ingest_batch_interval_s"].default
    )
    print(
        json.dumps(
            {
                "database": "postgresql" if args.postgres else "sqlite",
                "ingest_batch_interval_s": batch_interval,
                "baseline": "two-mqtt-hops-device-to-tap",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
