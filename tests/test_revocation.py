"""Revoking and decommissioning devices against real processes: ``edgefleet up`` (its broker,
CRL and policy loop), real agents, the CLI; and the policy loop itself against a real broker."""

from __future__ import annotations

import asyncio
import json
import queue
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text
from sqlmodel import Session, select

from broker import MosquittoSupervisor
from fleet_protocol import device_topic
from fleet_service.authority import CertificateAuthority
from fleet_service.broker_policy import CLEARED_KINDS, BrokerPolicy, PolicySettings
from fleet_service.db import create_db_engine, migrate
from fleet_service.pki import load_crl
from fleet_service.revocation import BrokerTarget
from fleet_service.tables import Device, Integration, IssuedCertificate
from tests.fixtures.broker import make_broker_config
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.pki import FleetPki

# How long a check waits to be sure something does not happen (the agents retry every <= 2 s).
QUIET_S = 4.0
TAP = "tap"  # a service replica identity used as a read-everything probe (never started)


def probe(fleet: Fleet, cert: Path, key: Path, *, client_id: str = "probe") -> mqtt.Client | None:
    """A connected paho client presenting ``cert``, or None when the broker refuses it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(cafile=str(fleet.home.ca_cert))
    context.load_cert_chain(str(cert), str(key))
    client.tls_set_context(context)
    outcome: queue.Queue[bool] = queue.Queue()
    client.on_connect = lambda *args: outcome.put(args[3] == 0)
    client.on_disconnect = lambda *_args: outcome.put(False)
    client.on_connect_fail = lambda *_args: outcome.put(False)
    try:
        client.connect("127.0.0.1", fleet.mqtt_port)
    except OSError:  # a refused TLS 1.2 handshake fails here
        _close_socket(client)
        return None
    client.loop_start()
    try:
        accepted = outcome.get(timeout=10)
    except queue.Empty:
        accepted = False
    if not accepted:
        client.loop_stop()
        _close_socket(client)
        return None
    return client


def _close_socket(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is not None:
        sock.close()


def close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def retained(fleet: Fleet, topics: list[str]) -> dict[str, bytes]:
    """What the broker holds retained on ``topics``, read as the service replica ``tap``."""
    cert, key = fleet.home.service_files(f"edgefleet-service-{TAP}")
    client = probe(fleet, cert, key)
    assert client is not None, "the tap identity must connect"
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client.on_message = lambda _c, _u, m: seen.put((m.topic, bytes(m.payload)))
    try:
        for topic in topics:
            client.subscribe(topic, qos=1)
        found: dict[str, bytes] = {}
        deadline = time.monotonic() + 1.5  # retained messages come right after SUBACK
        while time.monotonic() < deadline:
            try:
                topic, payload = seen.get(timeout=0.2)
            except queue.Empty:
                continue
            found[topic] = payload
        return found
    finally:
        close(client)


def telemetry_count(fleet: Fleet, device_id: str) -> int:
    with fleet.engine.connect() as conn:
        count: int = conn.execute(
            text("SELECT count(*) FROM telemetry_sample WHERE device_id = :d"), {"d": device_id}
        ).scalar_one()
    return count


def certificates(fleet: Fleet, device_id: str) -> list[dict[str, Any]]:
    with fleet.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT serial, kind, revoked_at, reason FROM issued_certificate "
                "WHERE identity = :d ORDER BY issued_at"
            ),
            {"d": device_id},
        )
        return [dict(row._mapping) for row in rows]


def audit_actions(fleet: Fleet, target: str) -> list[tuple[str, str]]:
    with fleet.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT action, outcome FROM audit_event WHERE target = :t ORDER BY id"),
            {"t": target},
        )
        return [(row.action, row.outcome) for row in rows]


def crl_serials(fleet: Fleet) -> set[int]:
    return {entry.serial_number for entry in load_crl(fleet.home.broker_dir / "crl.pem")}


def online_agent(fleet: Fleet, name: str, token: str | None = None) -> tuple[Path, str]:
    state = fleet.enroll(name, token)
    agent = fleet.start_agent(state)
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", what="online")
    wait_until(lambda: telemetry_count(fleet, agent.device_id) > 0, what="telemetry")
    return state, agent.device_id


def anonymous(fleet: Fleet, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request without operator credentials (the client is closed after it)."""
    with fleet.anonymous() as client:
        return client.request(method, path, **kwargs)


def as_device(fleet: Fleet, token: str, path: str) -> httpx.Response:
    """GET ``path`` with a device token."""
    return anonymous(fleet, "GET", path, headers={"Authorization": f"Bearer {token}"})


def device_token(state: Path) -> str:
    return (state / "device_token").read_text().strip()


def csr_with_key(key_file: Path) -> str:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def tap_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A SQLite fleet with one extra service identity (``tap``) to read retained topics."""
    fleet = start_fleet(tmp_path, None, replicas=(TAP,))
    try:
        yield fleet
    finally:
        fleet.close()


def test_revoked_device_is_cut_off_keeps_its_history_and_cannot_come_back(fleet: Fleet) -> None:
    state, device_id = online_agent(fleet, "victim")
    _, bystander = online_agent(fleet, "bystander")
    token = device_token(state)
    assert as_device(fleet, token, "/api/v1/agent/desired").is_success

    response = fleet.api.post(f"/api/v1/devices/{device_id}/revoke", json={"reason": "stolen"})

    assert response.status_code == 200, response.text
    assert response.json()["revoked_at"] is not None
    # The broker reloaded its CRL before answering: the certificate is on it and refused.
    rows = certificates(fleet, device_id)
    device_serials = {int(r["serial"], 16) for r in rows if r["kind"] == "device"}
    assert all(r["revoked_at"] is not None for r in rows if r["kind"] == "device")
    assert device_serials <= crl_serials(fleet)
    assert probe(fleet, state / "device.crt", state / "device.key") is None
    # The live session was dropped (its Last Will says offline) and the agent stays off.
    wait_until(lambda: fleet.device(device_id)["status"] == "offline", what="offline")
    stored = telemetry_count(fleet, device_id)
    time.sleep(QUIET_S)
    assert telemetry_count(fleet, device_id) == stored
    assert "revoked" in (state / "agent.log").read_text(errors="replace")
    # Its token no longer opens the HTTPS fallback or artifact downloads.
    refused = as_device(fleet, token, "/api/v1/agent/desired")
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]
    # History stays: the device, its telemetry, the audit trail.
    assert fleet.device(device_id)["revoked_at"] is not None
    history = fleet.api.get(f"/api/v1/devices/{device_id}/telemetry")
    assert history.status_code == 200 and len(history.json()) == stored
    assert ("device.revoke", "success") in audit_actions(fleet, device_id)
    # Other devices are untouched.
    assert fleet.device(bystander)["status"] == "online"
    before = telemetry_count(fleet, bystander)
    wait_until(lambda: telemetry_count(fleet, bystander) > before, what="bystander telemetry")


def test_revoked_device_cannot_enroll_again_with_its_old_key(sqlite_fleet: Fleet) -> None:
    fleet = sqlite_fleet
    state = fleet.enroll("old")
    device_id = json.loads((state / "device.json").read_text())["device_id"]
    assert fleet.api.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
    key = fleet.create_key()

    response = anonymous(
        fleet,
        "POST",
        "/api/v1/enroll",
        json={"registration_key": key["key"], "csr_pem": csr_with_key(state / "device.key")},
    )

    assert response.status_code == 403, response.text
    assert device_id in response.json()["detail"]
    # Refused before anything was spent: the key still has its use.
    listed = {k["id"]: k for k in fleet.api.get("/api/v1/keys").json()}
    assert listed[key["id"]]["uses"] == 0


def test_revoking_refuses_bad_requests_clearly(sqlite_fleet: Fleet) -> None:
    fleet = sqlite_fleet
    state = fleet.enroll("twice")
    device_id = json.loads((state / "device.json").read_text())["device_id"]
    missing = fleet.api.post("/api/v1/devices/dev-000000000000/revoke")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    too_long = fleet.api.post(f"/api/v1/devices/{device_id}/revoke", json={"reason": "x" * 201})
    assert too_long.status_code == 422
    unknown_field = fleet.api.post(f"/api/v1/devices/{device_id}/revoke", json={"why": "x"})
    assert unknown_field.status_code == 422
    no_login = anonymous(fleet, "POST", f"/api/v1/devices/{device_id}/revoke")
    assert no_login.status_code == 401
    assert fleet.api.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
    again = fleet.api.post(f"/api/v1/devices/{device_id}/revoke")
    assert again.status_code == 409
    assert "already revoked" in again.json()["detail"]
    assert ("device.revoke", "failed") in audit_actions(fleet, device_id)


def test_decommissioning_clears_retained_topics_and_keeps_history(tap_fleet: Fleet) -> None:
    fleet = tap_fleet
    state, device_id = online_agent(fleet, "retiring")
    put = fleet.api.put(
        f"/api/v1/devices/{device_id}/desired", json={"config": {"telemetry_interval_s": 1}}
    )
    assert put.status_code == 200, put.text
    wait_until(lambda: fleet.device(device_id)["reported_generation"] == 1, what="reported")
    topics = [device_topic(device_id, kind) for kind in CLEARED_KINDS]
    assert set(retained(fleet, topics)) == set(topics), "control: all three are retained"

    response = fleet.api.delete(f"/api/v1/devices/{device_id}")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["revoked_at"] is not None and body["decommissioned_at"] is not None
    assert retained(fleet, topics) == {}
    assert probe(fleet, state / "device.crt", state / "device.key") is None
    assert fleet.api.get(f"/api/v1/devices/{device_id}").status_code == 200
    assert fleet.api.delete(f"/api/v1/devices/{device_id}").status_code == 200  # idempotent
    assert ("device.decommission", "success") in audit_actions(fleet, device_id)


def test_cli_revoke_is_applied_by_the_running_service(sqlite_fleet: Fleet) -> None:
    fleet = sqlite_fleet
    state, device_id = online_agent(fleet, "cli-victim")

    cli = fleet.cli("devices", "revoke", device_id, "--reason", "lost in transit")
    out, err = cli.communicate(timeout=60)

    assert cli.returncode == 0, err
    assert f"device {device_id} revoked" in out
    assert "the broker refuses its certificates and has dropped its session now" in out
    wait_until(lambda: fleet.device(device_id)["status"] == "offline", what="offline")
    assert probe(fleet, state / "device.crt", state / "device.key") is None
    refused = as_device(fleet, device_token(state), "/api/v1/agent/desired")
    assert refused.status_code == 401
    again = fleet.cli("devices", "revoke", device_id)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 1 and "already revoked" in err
    missing = fleet.cli("devices", "decommission", "dev-000000000000")
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 1 and "not enrolled" in err


# --- the policy loop against a real broker, without a whole fleet ---------------------------


def _add_device(session: Session, device_id: str, tags: dict[str, str]) -> None:
    now = datetime.now(UTC)
    session.add(
        Device(
            id=device_id,
            tags=tags,
            enrolled_at=now,
            token_hash=device_id,
            cert_serial="1",
            cert_not_after=now + timedelta(days=1),
        )
    )


async def test_policy_rewrites_files_only_on_change_and_follows_tags(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    await asyncio.to_thread(migrate, url)
    engine = create_db_engine(url)
    now = datetime.now(UTC)
    with Session(engine) as session:
        _add_device(session, "dev-lab0000001", {"site": "lab"})
        _add_device(session, "dev-office00001", {"site": "office"})
        session.add(
            Integration(
                id="int-1",
                name="lab",
                identity="integration-lab",
                grants=["telemetry"],
                tag="site=lab",
                cert_serial="2",
                cert_not_after=now + timedelta(days=1),
                created_by="test",
                created_at=now,
            )
        )
        session.commit()
    crl_file = tmp_path / "crl.pem"
    config = make_broker_config(fleet_pki, tmp_path / "broker", crl_file=crl_file)
    supervisor = MosquittoSupervisor(config)
    authority = CertificateAuthority(key=fleet_pki.ca_key, cert=fleet_pki.ca_cert)
    target = BrokerTarget(config.bind_host, config.port, fleet_pki.ca_file)
    policy = BrokerPolicy(
        supervisor,
        authority,
        target,
        PolicySettings(topic_prefix="fleet/v1", crl_lifetime=timedelta(days=2), poll_s=30),
    )
    try:
        await asyncio.to_thread(policy.prepare, engine)
        acl = config.acl_path.read_text()
        assert "topic read fleet/v1/devices/dev-lab0000001/telemetry" in acl
        assert "dev-office00001" not in acl
        assert list(load_crl(crl_file)) == []
        async with supervisor, policy.running(engine, None):
            assert await policy.apply_now(10)
            crl_mtime = crl_file.stat().st_mtime_ns
            acl_mtime = config.acl_path.stat().st_mtime_ns
            assert await policy.apply_now(10)
            assert config.acl_path.stat().st_mtime_ns == acl_mtime, "rewritten without change"
            assert crl_file.stat().st_mtime_ns == crl_mtime
            # A device enrolled later with the tag is granted; a revoked one leaves the grant.
            with Session(engine) as session:
                _add_device(session, "dev-lab0000002", {"site": "lab"})
                device = session.get(Device, "dev-lab0000001")
                assert device is not None
                device.revoked_at = datetime.now(UTC)
                session.add(device)
                session.add(
                    IssuedCertificate(
                        serial="abc123",
                        identity="dev-lab0000001",
                        kind="device",
                        issued_at=now,
                        not_after=now + timedelta(days=1),
                        revoked_at=now,
                    )
                )
                session.commit()
            assert await policy.apply_now(20)
            acl = config.acl_path.read_text()
            assert "devices/dev-lab0000002/telemetry" in acl
            assert "devices/dev-lab0000001/" not in acl
            assert 0xABC123 in {e.serial_number for e in load_crl(crl_file)}
            # The revoked device's session was dropped with a single-use certificate, recorded
            # revoked from the start.
            with Session(engine) as session:
                drops = session.exec(
                    select(IssuedCertificate).where(IssuedCertificate.kind == "session-drop")
                ).all()
            assert [d.identity for d in drops] == ["dev-lab0000001"]
            assert drops[0].revoked_at is not None
            assert drops[0].not_after - now < timedelta(minutes=10)
    finally:
        engine.dispose()
