"""Site bridges against real processes: ``edgefleet up``, a second ``mosquitto`` run from the
bundle ``edgefleet sites create`` writes, a real agent behind it, and a device of another site
that the central broker refuses to hear from through the bridge."""

from __future__ import annotations

import getpass
import json
import os
import queue
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from sqlalchemy import text

from broker import BrokerConfig, ReadGrant, SiteBrokerConfig, render_acl, render_site_files
from fleet_protocol import TopicKind
from tests.fixtures.fleet import Fleet, free_tcp_port, start_fleet, wait_until
from tests.fixtures.raw_device import RawDevice
from tests.test_integrations import Reader

TAP = "tap"  # a service replica identity (never started) that watches the central broker
POLL_S = 1  # the primary's broker policy poll, shrunk so grants follow enrollments fast
QUIET_S = 2.0  # long enough to be sure a message is not coming across two local brokers
SITE_START_S = 15.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A SQLite fleet (as ``sqlite_fleet``) with a ``tap`` identity and a 1 s policy poll."""
    fleet = start_fleet(
        tmp_path, None, replicas=(TAP,), extra_env={"EDGEFLEET_BROKER_POLICY_POLL_S": str(POLL_S)}
    )
    try:
        yield fleet
    finally:
        fleet.close()


@dataclass
class SiteBroker:
    """A ``mosquitto -c <bundle>/mosquitto.conf`` process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def site_broker(bundle: Path, port: int) -> Iterator[SiteBroker]:
    """Run the site broker from its bundle until the block ends; fail with its log if it dies."""
    log_path = bundle.parent / f"{bundle.name}-mosquitto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["mosquitto", "-c", str(bundle / "mosquitto.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    broker = SiteBroker(process, port, log_path)
    try:

        def listening() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the site mosquitto exited on start:\n{broker.log()}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, SITE_START_S, 0.05, "the site broker to listen")
        yield broker
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def central_log(fleet: Fleet) -> str:
    return (fleet.home.broker_dir / "mosquitto.log").read_text(errors="replace")


def connections_as(log: str, identity: str) -> int:
    """How many times the central broker accepted a connection for ``identity``."""
    return len(
        re.findall(rf"New (?:client|bridge) connected from \S+ as {re.escape(identity)} ", log)
    )


def central_acl(fleet: Fleet) -> str:
    return (fleet.home.broker_dir / "acl").read_text()


def telemetry_rows(fleet: Fleet, device_id: str) -> int:
    with fleet.engine.connect() as conn:
        count: int = conn.execute(
            text("SELECT count(*) FROM telemetry_sample WHERE device_id = :d"), {"d": device_id}
        ).scalar_one()
    return count


def tap(fleet: Fleet) -> Reader:
    cert, key = fleet.home.service_files(f"edgefleet-service-{TAP}")
    reader = Reader(fleet.home.ca_cert, cert, key, fleet.mqtt_port)
    assert reader.connected
    return reader


def collect(reader: Reader, seconds: float) -> list[tuple[str, bytes]]:
    """Everything ``reader`` received for ``seconds`` (the agent never goes quiet)."""
    seen = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            seen.append(reader.messages.get(timeout=left))
        except queue.Empty:
            break
    return seen


def device_id_of(state_dir: Path) -> str:
    device_id: str = json.loads((state_dir / "device.json").read_text())["device_id"]
    return device_id


def test_site_bridge_carries_its_devices_over_one_uplink_refuses_others_and_is_cut_off(
    fleet: Fleet, tmp_path: Path
) -> None:
    site_port = free_tcp_port()
    bundle = tmp_path / "site-lab"

    code, out, err = run_cli(
        fleet,
        *("sites", "create", "lab", "--san", "127.0.0.1", "--out", str(bundle)),
        *("--port", str(site_port), "--bind", "127.0.0.1", "--run-as", getpass.getuser()),
    )

    assert code == 0, err
    assert "the broker grants its bridge now" in out, out
    assert {p.name for p in bundle.iterdir()} == {
        "mosquitto.conf",
        "acl",
        "ca.crt",
        "crl.pem",
        "server.crt",
        "server.key",
        "bridge.crt",
        "bridge.key",
        "site.json",
        "README.md",
        "persistence",
    }
    for key in ("server.key", "bridge.key"):
        assert (bundle / key).stat().st_mode & 0o777 == 0o600
    ca_key_body = "".join(fleet.home.ca_key.read_text().splitlines()[1:-1])
    for path in bundle.iterdir():
        if path.is_file():
            assert ca_key_body not in path.read_text(), path
    conf = (bundle / "mosquitto.conf").read_text()
    assert "bridge_protocol_version mqttv311" in conf and "cleansession false" in conf
    assert f"address 127.0.0.1:{fleet.mqtt_port}" in conf
    assert "user site-lab\n" in central_acl(fleet)
    # A test-speed reconnect backoff, so that several of the bridge's refused attempts after
    # the revocation fall within one wait (mosquitto logs why only on some of them).
    assert "restart_timeout 2 60\n" in conf
    (bundle / "mosquitto.conf").write_text(
        conf.replace("restart_timeout 2 60", "restart_timeout 1 2")
    )

    lab_key = fleet.create_key(tags={"site": "lab"}, max_uses=5)["join_token"]
    office_key = fleet.create_key(tags={"site": "office"})["join_token"]
    watcher = tap(fleet)
    watcher.subscribe("fleet/v1/#")
    with site_broker(bundle, site_port) as site:
        wait_until(
            lambda: connections_as(central_log(fleet), "site-lab") == 1,
            what="the site's bridge to connect to the central broker",
        )
        lab_state = fleet.enroll("lab-agent", lab_key)
        lab_id = device_id_of(lab_state)
        # Enrollment wakes the central broker policy: the bridge's grant follows at once.
        wait_until(
            lambda: f"topic write fleet/v1/devices/{lab_id}/telemetry\n" in central_acl(fleet),
            what="the central ACL to grant the bridge the new lab device",
        )
        # Pointed at the site broker as its owner would: the agent's mqtt_port setting.
        agent = fleet.start_agent(
            lab_state,
            extra_env={
                "EDGEFLEET_AGENT_HTTPS_FALLBACK_AFTER_S": "3600",
                "EDGEFLEET_AGENT_MQTT_PORT": str(site_port),
            },
        )

        # Through the site broker and the bridge: online, telemetry stored, a command acked.
        wait_until(
            lambda: fleet.device(lab_id)["status"] == "online", timeout=30, what="lab online"
        )
        wait_until(lambda: telemetry_rows(fleet, lab_id) >= 2, what="lab telemetry stored")
        command = fleet.api.post(f"/api/v1/devices/{lab_id}/commands", json={"type": "ping"})
        assert command.status_code == 201, command.text
        command_id = command.json()["id"]
        wait_until(
            lambda: fleet.api.get(f"/api/v1/commands/{command_id}").json()["status"] == "succeeded",
            what="the ping to be acked through the bridge",
        )
        # The desired state goes down the bridge and the reported state comes back up.
        put = fleet.api.put(
            f"/api/v1/devices/{lab_id}/desired", json={"config": {"telemetry_interval_s": 1}}
        )
        assert put.status_code == 200, put.text
        generation = put.json()["generation"]
        wait_until(
            lambda: fleet.device(lab_id)["reported_generation"] == generation,
            what="the lab agent to report the desired state it got through the bridge",
        )
        # The central broker saw the site's one uplink, never the device itself.
        log = central_log(fleet)
        assert connections_as(log, "site-lab") == 1
        assert connections_as(log, lab_id) == 0
        assert f"as {lab_id} " in site.log()

        # A device of another site, with a valid fleet certificate, connected to this site
        # broker: its messages are bridged, and the central broker refuses them.
        office_state = fleet.enroll("office-device", office_key)
        office_id = json.loads((office_state / "device.json").read_text())["device_id"]
        office = RawDevice(office_state, site_port)
        try:
            office.send(TopicKind.TELEMETRY, b'{"forged": true}')
            office.send(TopicKind.LOGS, b"office-log")
            watcher.publish(f"fleet/v1/devices/{office_id}/commands", b"to-office")
            seen = collect(watcher, QUIET_S)
            topics = {topic for topic, _ in seen}
            assert not any(office_id in topic for topic in topics if "commands" not in topic), seen
            assert f"fleet/v1/devices/{lab_id}/telemetry" in topics
            assert office.inbox[TopicKind.COMMANDS].empty()
            assert telemetry_rows(fleet, office_id) == 0
            assert fleet.device(office_id)["status"] != "online"
            assert connections_as(central_log(fleet), office_id) == 0
        finally:
            office.close()

        # Revoked: the uplink is cut and refused; the device stays on its site broker.
        code, out, err = run_cli(fleet, "sites", "revoke", "lab", "--reason", "site closed")

        assert code == 0, err
        assert "refuses its bridge certificate and has dropped its uplink now" in out, out
        time.sleep(1.0)  # what was in flight before the revocation
        collect(watcher, 0.5)
        before = telemetry_rows(fleet, lab_id)
        late = fleet.api.post(f"/api/v1/devices/{lab_id}/commands", json={"type": "ping"})
        assert late.status_code == 201
        seen = collect(watcher, QUIET_S * 2)
        assert not any(
            topic.startswith(f"fleet/v1/devices/{lab_id}/")
            for topic, _ in seen
            if not topic.endswith("/commands")
        ), seen
        assert telemetry_rows(fleet, lab_id) == before
        status = fleet.api.get(f"/api/v1/commands/{late.json()['id']}").json()["status"]
        assert status != "succeeded"
        # The bridge keeps trying, and the central broker refuses its certificate each time.
        wait_until(
            lambda: "certificate revoked" in site.log(), timeout=40, what="the bridge to be refused"
        )
        assert agent.process.poll() is None
        code, out, _ = run_cli(fleet, "sites", "list")
        assert code == 0 and "lab" in out and "revoked" in out
        code, out, _ = run_cli(fleet, "integrations", "list")
        assert code == 0 and "site-lab" not in out
        code, _, err = run_cli(fleet, "sites", "create", "lab", "--san", "x", "--out", "/nope")
        assert code == 1 and "exists" in err
        code, _, err = run_cli(fleet, "sites", "revoke", "lab")
        assert code == 1 and "already revoked" in err
        code, _, err = run_cli(fleet, "sites", "create", "Bad Name", "--san", "x")
        assert code == 1 and "site name" in err
    watcher.close()


def test_site_acl_confines_devices_like_the_central_one_and_bridge_grants_write() -> None:
    site = SiteBrokerConfig(
        site_name="lab",
        bridge_identity="site-lab",
        central_host="fleet.example",
        central_port=8883,
        install_dir=PurePosixPath("/etc/edgefleet-site"),
        run_as_user="mosquitto",
    )
    rendered = render_site_files(site)
    central = BrokerConfig(
        bind_host="127.0.0.1",
        port=8883,
        ca_file=Path("/x/ca.crt"),
        cert_file=Path("/x/s.crt"),
        key_file=Path("/x/s.key"),
        data_dir=Path("/x"),
        read_grants=(ReadGrant("site-lab", ("fleet/v1/devices/dev-1/commands",), ("w/t",)),),
    )
    central_acl_text = render_acl(central)

    def patterns(acl: str) -> list[str]:
        return [line for line in acl.splitlines() if line.startswith("pattern ")]

    assert patterns(rendered.acl_text) == patterns(central_acl_text)
    assert "user site-lab\ntopic read fleet/v1/devices/dev-1/commands\ntopic write w/t\n" in (
        central_acl_text
    )
    assert "/etc/edgefleet-site/bridge.key" in rendered.conf_text
    assert "topic fleet/v1/devices/+/telemetry out 1" in rendered.conf_text
    assert "topic fleet/v1/devices/+/commands in 1" in rendered.conf_text
    with pytest.raises(ValueError, match="absolute"):
        SiteBrokerConfig(
            site_name="lab",
            bridge_identity="site-lab",
            central_host="fleet.example",
            central_port=8883,
            install_dir=PurePosixPath("relative"),
        )
