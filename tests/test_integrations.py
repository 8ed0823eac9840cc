"""Third-party integrations against a real ``edgefleet up``: the bundle read with the real
``mosquitto_sub`` and with paho-mqtt, the ACL it gets, revocation, and the CA key staying home."""

from __future__ import annotations

import json
import os
import queue
import shlex
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet_protocol import TopicKind
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.raw_device import RawDevice

TAP = "tap"  # a service replica identity (never started) that reads everything under the prefix
QUIET_S = 1.5  # long enough to be sure a message is not coming from a local broker
POLL_S = 1  # the primary's broker policy poll, shrunk so tag grants follow enrollments fast


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A SQLite fleet with a ``tap`` service identity to watch the broker."""
    fleet = start_fleet(
        tmp_path, None, replicas=(TAP,), extra_env={"EDGEFLEET_BROKER_POLICY_POLL_S": str(POLL_S)}
    )
    try:
        yield fleet
    finally:
        fleet.close()


class Reader:
    """A paho client with a certificate: collects what it receives, remembers disconnects."""

    def __init__(self, ca: Path, cert: Path, key: Path, port: int) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnected: queue.Queue[object] = queue.Queue()
        self._connected: queue.Queue[bool] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        self.client.tls_set_context(context)
        self.client.on_connect = lambda *args: self._connected.put(args[3] == 0)
        self.client.on_connect_fail = lambda *_args: self._connected.put(False)
        self.client.on_disconnect = lambda *args: self.disconnected.put(args[3])
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.reconnect_delay_set(60, 60)  # report a cut; never reconnect by itself
        self.connected = False
        try:
            self.client.connect("127.0.0.1", port)
        except OSError:  # a refused TLS 1.2 handshake fails here
            self._close_socket()
            return
        self.client.loop_start()
        try:
            self.connected = self._connected.get(timeout=10)
        except queue.Empty:
            self.connected = False
        if not self.connected:
            self.close()

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe and wait for the SUBACK; the reason codes."""
        granted: queue.Queue[list[int]] = queue.Queue()
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.put(
            [c.value for c in codes]
        )
        self.client.subscribe([(t, 1) for t in topics])
        return granted.get(timeout=10)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1, waiting for the broker's PUBACK (which it sends even when it drops it)."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def drain(self, quiet: float = QUIET_S) -> list[tuple[str, bytes]]:
        """Everything received until nothing came for ``quiet`` seconds."""
        seen = []
        while True:
            try:
                seen.append(self.messages.get(timeout=quiet))
            except queue.Empty:
                return seen

    def _close_socket(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._close_socket()


def tap(fleet: Fleet) -> Reader:
    cert, key = fleet.home.service_files(f"edgefleet-service-{TAP}")
    reader = Reader(fleet.home.ca_cert, cert, key, fleet.mqtt_port)
    assert reader.connected
    return reader


def raw_device(fleet: Fleet, name: str, tags: dict[str, str]) -> RawDevice:
    state = fleet.enroll(name, fleet.create_key(tags=tags)["join_token"])
    return RawDevice(state, fleet.mqtt_port)


def write_bundle_files(directory: Path, bundle: dict[str, Any]) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True)
    ca, cert, key = directory / "ca.crt", directory / "client.crt", directory / "client.key"
    ca.write_text(bundle["ca_pem"])
    cert.write_text(bundle["cert_pem"])
    key.write_text(bundle["key_pem"])
    key.chmod(0o600)
    return ca, cert, key


def run_cli(fleet: Fleet, *args: str) -> tuple[int, str, str]:
    """``edgefleet ARGS`` with the settings ``edgefleet up`` runs with (ports included)."""
    result = subprocess.run(
        [sys.executable, "-m", "fleet_service", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **fleet.env},
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def mosquitto_sub_line(bundle_dir: Path) -> list[str]:
    readme = (bundle_dir / "README.md").read_text()
    line = next(x.strip() for x in readme.splitlines() if x.strip().startswith("mosquitto_sub "))
    return shlex.split(line)


def test_cli_bundle_reads_its_tag_with_mosquitto_sub_and_is_cut_off_when_revoked(
    fleet: Fleet, tmp_path: Path
) -> None:
    lab = raw_device(fleet, "lab-1", {"site": "lab"})
    office = raw_device(fleet, "office-1", {"site": "office"})
    out_dir = tmp_path / "bundle"

    code, out, err = run_cli(
        fleet,
        *("integrations", "create", "lab-reader", "--read", "results,telemetry"),
        *("--tag", "site=lab", "--out", str(out_dir)),
    )

    assert code == 0, err
    assert "the broker grants it now" in out
    assert (out_dir / "client.key").stat().st_mode & 0o777 == 0o600
    assert {p.name for p in out_dir.iterdir()} == {
        "client.key",
        "client.crt",
        "ca.crt",
        "bundle.json",
        "README.md",
    }
    meta = json.loads((out_dir / "bundle.json").read_text())
    assert meta["topics"] == ["fleet/v1/devices/+/results/+", "fleet/v1/devices/+/telemetry"]
    command = mosquitto_sub_line(out_dir)
    assert command[0] == "mosquitto_sub" and "client.key" in command

    sub = subprocess.Popen(
        command,
        cwd=out_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert sub.stdout is not None
        for line in sub.stdout:
            lines.put(line.strip())

    reader = threading.Thread(target=pump, name="mosquitto_sub-stdout", daemon=True)
    reader.start()

    def received(quiet: float = QUIET_S) -> list[str]:
        seen = []
        while True:
            try:
                seen.append(lines.get(timeout=quiet))
            except queue.Empty:
                return seen

    try:
        time.sleep(1.0)  # connect and subscribe
        assert sub.poll() is None, sub.communicate()[1]
        office.send(TopicKind.TELEMETRY, b"office-t1")
        office.send(TopicKind.RESULTS, b"office-r1", model="detector")
        lab.send(TopicKind.STATUS, b"lab-status")  # not granted
        lab.send(TopicKind.TELEMETRY, b"lab-t1")
        lab.send(TopicKind.RESULTS, b"lab-r1", model="detector")
        assert received() == [
            f"{lab.topic(TopicKind.TELEMETRY)} lab-t1",
            f"{lab.topic(TopicKind.RESULTS, 'detector')} lab-r1",
        ]
        # A device enrolled later with the tag is readable too (the ACL follows the registry).
        later = raw_device(fleet, "lab-2", {"site": "lab"})
        expected = f"{later.topic(TopicKind.TELEMETRY)} lab2-t1"

        def later_arrives() -> bool:
            later.send(TopicKind.TELEMETRY, b"lab2-t1")
            return expected in received(0.5)

        wait_until(later_arrives, timeout=15, interval=0.1, what="the new lab device's data")

        code, out, err = run_cli(fleet, "integrations", "revoke", "lab-reader")

        assert code == 0, err
        assert "refuses its certificate and has dropped its session now" in out
        received(0.5)  # whatever was in flight before the revocation
        lab.send(TopicKind.TELEMETRY, b"lab-after")
        later.send(TopicKind.TELEMETRY, b"lab2-after")
        assert received() == []
        later.close()
    finally:
        sub.kill()
        reader.join(timeout=10)
        sub.wait(timeout=10)
        for pipe in (sub.stdout, sub.stderr):
            if pipe is not None:
                pipe.close()
    again = subprocess.run(
        [*command, "-W", "5"], cwd=out_dir, capture_output=True, text=True, timeout=30, check=False
    )
    assert again.returncode != 0 and "lab" not in again.stdout
    code, out, _ = run_cli(fleet, "integrations", "list")
    assert code == 0 and "lab-reader" in out and "revoked" in out
    lab.close()
    office.close()


def test_rest_bundle_reads_only_its_grant_publishes_nowhere_and_is_refused_after_revocation(
    fleet: Fleet, tmp_path: Path
) -> None:
    lab = raw_device(fleet, "lab-1", {"site": "lab"})
    office = raw_device(fleet, "office-1", {"site": "office"})
    response = fleet.api.post(
        "/api/v1/integrations", json={"name": "dashboard", "read": ["telemetry", "status"]}
    )
    assert response.status_code == 201, response.text
    created = response.json()
    integration, bundle = created["integration"], created["bundle"]
    assert integration["identity"] == "integration-dashboard"
    assert integration["read"] == ["status", "telemetry"] and integration["tag"] is None
    assert bundle["broker_port"] == fleet.mqtt_port
    assert bundle["mosquitto_sub"].startswith("mosquitto_sub ")
    listed = fleet.api.get("/api/v1/integrations").json()
    assert [i["id"] for i in listed] == [integration["id"]]
    assert "PRIVATE KEY" not in json.dumps(listed)
    ca, cert, key = write_bundle_files(tmp_path / "bundle", bundle)
    watcher = tap(fleet)
    watcher.subscribe("fleet/v1/#", "elsewhere/#")
    reader = Reader(ca, cert, key, fleet.mqtt_port)
    assert reader.connected
    try:
        # Everything it may not read: other topic kinds, the service's topics, $SYS, anything.
        reader.subscribe(
            "#",
            "$SYS/#",
            lab.topic(TopicKind.COMMANDS),
            lab.topic(TopicKind.DESIRED),
            lab.topic(TopicKind.RECEIPTS),
            "fleet/v1/devices/+/results/+",
        )
        # Retained statuses (granted) arrive at once.
        statuses = {topic for topic, _ in reader.drain()}
        assert statuses == {lab.topic(TopicKind.STATUS), office.topic(TopicKind.STATUS)}
        # It cannot publish anywhere: not as a device, not to a device, not outside the prefix.
        forged = [
            lab.topic(TopicKind.TELEMETRY),
            lab.topic(TopicKind.COMMANDS),
            lab.topic(TopicKind.DESIRED),
            office.topic(TopicKind.STATUS),
            "fleet/v1/devices/dev-000000000000/status",
            "elsewhere/x",
            "$SYS/broker/forged",
        ]
        for topic in forged:
            reader.publish(topic, b"forged", retain=topic.endswith("status"))
        # The service sends the lab device a desired state; the reader must not see it.
        put = fleet.api.put(
            f"/api/v1/devices/{lab.device_id}/desired",
            json={"config": {"telemetry_interval_s": 5}},
        )
        assert put.status_code == 200
        lab.next(TopicKind.DESIRED)
        lab.send(TopicKind.RESULTS, b"lab-r1", model="detector")
        office.send(TopicKind.TELEMETRY, b"office-t1")
        lab.send(TopicKind.TELEMETRY, b"lab-t1")
        seen = reader.drain()
        assert seen == [
            (office.topic(TopicKind.TELEMETRY), b"office-t1"),
            (lab.topic(TopicKind.TELEMETRY), b"lab-t1"),
        ]
        watched = watcher.drain()
        assert all(payload != b"forged" for _, payload in watched), watched
        assert (lab.topic(TopicKind.TELEMETRY), b"lab-t1") in watched
        assert lab.inbox[TopicKind.COMMANDS].empty()

        revoked = fleet.api.post(f"/api/v1/integrations/{integration['id']}/revoke")

        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["revoked_at"] is not None
        # Its connection was dropped before the answer, and it gets nothing more.
        assert reader.disconnected.get(timeout=10) is not None
        lab.send(TopicKind.TELEMETRY, b"lab-t2")
        assert all(payload != b"lab-t2" for _, payload in reader.drain())
    finally:
        reader.close()
        watcher.close()
    again = Reader(ca, cert, key, fleet.mqtt_port)
    assert not again.connected, "a revoked integration must be refused"
    assert fleet.api.post(f"/api/v1/integrations/{integration['id']}/revoke").status_code == 409
    lab.close()
    office.close()


def test_integration_requests_are_validated_and_the_ca_key_never_leaves(
    fleet: Fleet, tmp_path: Path
) -> None:
    created = fleet.api.post(
        "/api/v1/integrations",
        json={"name": "erp", "read": ["results"], "tag": "site=lab"},
    )
    assert created.status_code == 201
    ca_key = fleet.home.ca_key.read_text()
    ca_key_body = "".join(ca_key.splitlines()[1:-1])
    assert created.json()["bundle"]["key_pem"] != ca_key
    for body, status in [
        ({"name": "erp", "read": ["results"]}, 409),
        ({"name": "Bad Name", "read": ["results"]}, 422),
        ({"name": "x", "read": ["commands"]}, 422),
        ({"name": "x", "read": []}, 422),
        ({"name": "x", "read": ["results", "results"]}, 422),
        ({"name": "x", "read": ["results"], "tag": "lab"}, 422),
        ({"name": "x", "read": ["results"], "extra": 1}, 422),
    ]:
        response = fleet.api.post("/api/v1/integrations", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert fleet.api.post("/api/v1/integrations/int-nope/revoke").status_code == 404
    with fleet.anonymous() as anonymous:
        assert anonymous.get("/api/v1/integrations").status_code == 401
        assert anonymous.post("/api/v1/integrations", json={}).status_code == 401
    code, _, err = run_cli(fleet, "integrations", "create", "cli-x", "--read", "commands")
    assert code == 1 and "read" in err
    code, _, err = run_cli(fleet, "integrations", "create", "erp", "--read", "results")
    assert code == 1 and "exists" in err
    # The CA key is nowhere in what the API hands out: every parameterless GET, as an admin.
    spec = fleet.api.get("/api/v1/openapi.json").json()
    for path, operations in spec["paths"].items():
        if "get" not in operations or "{" in path or path.endswith("/events"):
            continue
        response = fleet.api.get(path)
        assert ca_key_body not in response.text, path
        assert "BEGIN PRIVATE KEY" not in response.text or path.endswith("/openapi.json"), path
    assert "PRIVATE KEY" not in fleet.api.get("/api/v1/ca").text
    # Devices never see it either: enrollment hands out the CA certificate only.
    state = fleet.enroll("dev")
    assert "PRIVATE KEY" not in (state / "ca.crt").read_text()
