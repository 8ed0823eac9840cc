"""The fleet security audit: each check fires on what it should and nothing else, over REST, the
CLI, the periodic loop and a real broker's log."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session

from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine, migrate, session_scope
from fleet_service.home import FleetHome
from fleet_service.pki import (
    create_ca,
    issue_client_cert,
    issue_server_cert,
    load_certificate,
    load_private_key,
    write_certificate,
    write_private_key,
)
from fleet_service.security_audit import (
    AuditPolicy,
    SecurityFindings,
    Severity,
    parse_broker_log,
    run_audit,
)
from fleet_service.sites import SITE_IDENTITY_PREFIX
from fleet_service.tables import ApiToken, Device, Integration, User
from tests.fixtures.broker import RunningBroker, mqtt_client
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.pki import Identity

FINDING_KEYS = {"kind", "severity", "target", "detail", "fix"}


# --- arranging rows ---


def device_row(device_id: str, now: datetime, **fields: Any) -> Device:
    """A healthy device (seen now, cert valid for months) with ``fields`` changed."""
    values: dict[str, Any] = {
        "id": device_id,
        "hostname": device_id,
        "enrolled_at": now - timedelta(days=1),
        "token_hash": secrets.token_hex(32),
        "cert_serial": secrets.token_hex(8),
        "cert_not_after": now + timedelta(days=300),
        "status": "online",
        "status_changed_at": now,
        "last_seen": now,
    }
    values.update(fields)
    return Device(**values)


def integration_row(name: str, now: datetime, **fields: Any) -> Integration:
    """A live integration reading results of tagged devices, with ``fields`` changed."""
    values: dict[str, Any] = {
        "id": f"int-{name}"[:32],
        "name": name,
        "identity": f"integration-{name}",
        "grants": ["results"],
        "tag": "site=lab",
        "cert_serial": secrets.token_hex(8),
        "cert_not_after": now + timedelta(days=300),
        "created_by": "admin",
        "created_at": now - timedelta(days=1),
    }
    values.update(fields)
    return Integration(**values)


def user_row(username: str, role: str, now: datetime, **fields: Any) -> User:
    values: dict[str, Any] = {
        "username": username,
        "password_hash": "not-a-hash",
        "role": role,
        "created_at": now,
    }
    values.update(fields)
    return User(**values)


def token_row(token_id: str, now: datetime, **fields: Any) -> ApiToken:
    values: dict[str, Any] = {
        "id": token_id,
        "name": token_id,
        "token_hash": secrets.token_hex(32),
        "role": "viewer",
        "created_by": "admin",
        "created_at": now - timedelta(days=1),
        "expires_at": now + timedelta(days=30),
        "last_used_at": now,
    }
    values.update(fields)
    return ApiToken(**values)


def add_rows(engine: Engine, *rows: Any) -> None:
    with session_scope(engine) as session:
        for row in rows:
            session.add(row)


# --- connecting to a real broker ---


def write_identity(ca_key_file: Path, ca_file: Path, name: str, directory: Path) -> Identity:
    """A client certificate of the fleet CA for ``name``, written to ``directory``."""
    key, cert = issue_client_cert(load_private_key(ca_key_file), load_certificate(ca_file), name)
    directory.mkdir(parents=True, exist_ok=True)
    identity = Identity(name, directory / f"{name}.crt", directory / f"{name}.key", ca_file)
    write_certificate(identity.cert_file, cert)
    write_private_key(identity.key_file, key)
    return identity


async def connect_in_turn(host: str, port: int, identity: Identity, times: int) -> None:
    """Connect ``times`` clients presenting one certificate, each without closing the last: the
    broker closes the older connection every time, as when two machines share one key."""
    clients: list[aiomqtt.Client] = []
    try:
        for _ in range(times):
            client = mqtt_client(host, port, identity, ca_file=identity.ca_file)
            await client.__aenter__()
            clients.append(client)
    finally:
        for client in reversed(clients):
            with suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)


def log_count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0


def keyed(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(f["kind"], f["target"], f["severity"]) for f in report["findings"]}


# --- a whole fleet: every check, over REST and the CLI ---


def test_each_check_fires_once_over_rest_and_cli_and_a_clean_fleet_has_no_high_findings(
    fleet: Fleet,
) -> None:
    clean = fleet.api.get("/api/v1/security/findings")
    assert clean.status_code == 200, clean.text
    assert set(clean.json()) == {"generated_at", "findings"}
    assert datetime.fromisoformat(clean.json()["generated_at"]).tzinfo is not None
    assert not [f for f in clean.json()["findings"] if f["severity"] == "high"]
    clean_cli = fleet.cli("audit")
    out, err = clean_cli.communicate(timeout=60)
    assert clean_cli.returncode == 0, out + err

    now = datetime.now(UTC)
    long_key = fleet.create_key(expires_in_s=30 * 86_400, max_uses=1)["id"]
    busy_key = fleet.create_key(expires_in_s=3600, max_uses=50)["id"]
    add_rows(
        fleet.engine,
        device_row("dev-fine", now),
        device_row("dev-expired", now, cert_not_after=now - timedelta(days=2)),
        device_row("dev-expiring", now, cert_not_after=now + timedelta(days=2)),
        device_row("dev-revoked", now, revoked_at=now - timedelta(hours=1), revoked_by="admin"),
        device_row("dev-silent", now, status="offline", last_seen=now - timedelta(days=30)),
        device_row("dev-twin", now),
        integration_row("soon-partner", now, cert_not_after=now + timedelta(days=1)),
        integration_row(
            "everything-reader", now, tag=None, grants=["results", "telemetry", "status"]
        ),
        integration_row("gone-partner", now, revoked_at=now - timedelta(hours=1)),
        user_row(
            "olduser",
            "operator",
            now,
            created_at=now - timedelta(days=400),
            last_login_at=now - timedelta(days=200),
        ),
        user_row("recent-viewer", "viewer", now, last_login_at=now - timedelta(days=1)),
        *(user_row(f"admin{i}", "admin", now) for i in range(2, 5)),
        user_row("ex-admin", "admin", now - timedelta(days=500), disabled_at=now),
        token_row("tok-fine", now),
        token_row("tok-long", now, expires_at=now + timedelta(days=800)),
        token_row("tok-idle", now, created_at=now - timedelta(days=200), last_used_at=None),
        token_row("tok-revoked", now, expires_at=now + timedelta(days=900), revoked_at=now),
    )
    # Two machines with one device's key, and a revoked integration's key still accepted.
    certs = fleet.tmp / "clients"
    twin = write_identity(fleet.home.ca_key, fleet.home.ca_cert, "dev-twin", certs)
    gone = write_identity(fleet.home.ca_key, fleet.home.ca_cert, "integration-gone-partner", certs)
    asyncio.run(connect_in_turn("127.0.0.1", fleet.mqtt_port, twin, 4))
    asyncio.run(connect_in_turn("127.0.0.1", fleet.mqtt_port, gone, 1))
    log = fleet.home.broker_dir / "mosquitto.log"
    wait_until(
        lambda: log_count(log, "Client dev-twin already connected, closing old connection.") >= 3,
        what="the broker to log three takeovers of dev-twin",
    )

    response = fleet.api.get("/api/v1/security/findings")

    assert response.status_code == 200, response.text
    report = response.json()
    assert set(report) == {"generated_at", "findings"}
    for finding in report["findings"]:
        assert set(finding) == FINDING_KEYS
        assert finding["severity"] in {"high", "medium", "low"}
        assert finding["detail"] and finding["fix"]
    expected = {
        ("cert-expired", "device:dev-expired", "high"),
        ("cert-expiring", "device:dev-expiring", "medium"),
        ("cert-expiring", "integration:soon-partner", "medium"),
        ("revoked-connected", "device:dev-revoked", "high"),
        ("revoked-connected", "integration:gone-partner", "high"),
        ("duplicate-connection", "device:dev-twin", "high"),
        ("silent-device", "device:dev-silent", "medium"),
        ("key-long-lived", f"key:{long_key}", "medium"),
        ("key-many-uses", f"key:{busy_key}", "medium"),
        ("integration-broad", "integration:everything-reader", "medium"),
        ("login-stale", "user:olduser", "low"),
        ("token-long-lived", "token:tok-long", "low"),
        ("token-unused", "token:tok-idle", "low"),
        ("too-many-admins", "users", "low"),
    }
    assert keyed(report) == expected
    assert [f["severity"] for f in report["findings"]] == sorted(
        (f["severity"] for f in report["findings"]), key=lambda s: -Severity(s).rank
    ), "most urgent first"
    by_target = {f["target"]: f for f in report["findings"]}
    twin_finding = by_target["device:dev-twin"]
    assert "3 connections" in twin_finding["detail"]
    assert "127.0.0.1" in twin_finding["detail"]
    assert "revoke" in twin_finding["fix"]
    assert "edgefleet keys revoke" in by_target[f"key:{busy_key}"]["fix"]
    assert "admin, admin2, admin3, admin4" in by_target["users"]["detail"]
    assert "ex-admin" not in by_target["users"]["detail"]

    as_json = fleet.cli("audit", "--json")
    out, err = as_json.communicate(timeout=60)
    assert as_json.returncode == 1, "high findings fail cron and CI"
    assert keyed(json.loads(out)) == expected
    table = fleet.cli("audit")
    out, err = table.communicate(timeout=60)
    assert table.returncode == 1
    lines = out.splitlines()
    assert lines[0].split() == ["SEVERITY", "KIND", "TARGET", "DETAIL"]
    assert any(
        line.split()[:3] == ["high", "duplicate-connection", "device:dev-twin"] for line in lines
    )
    assert any(line.strip().startswith("fix: ") for line in lines)
    assert lines[-1] == "14 finding(s): 4 high, 6 medium, 4 low"


def test_cli_fail_on_sets_the_threshold_and_rejects_an_unknown_severity(
    sqlite_fleet: Fleet,
) -> None:
    sqlite_fleet.create_key(expires_in_s=30 * 86_400)  # one medium finding, nothing high

    default = sqlite_fleet.cli("audit", "--json")
    out, _ = default.communicate(timeout=60)
    strict = sqlite_fleet.cli("audit", "--fail-on", "medium")
    strict_out, _ = strict.communicate(timeout=60)
    wrong = sqlite_fleet.cli("audit", "--fail-on", "urgent")
    _, wrong_err = wrong.communicate(timeout=60)

    assert default.returncode == 0
    assert [f["kind"] for f in json.loads(out)["findings"]] == ["key-long-lived"]
    assert strict.returncode == 1
    assert "key-long-lived" in strict_out
    assert wrong.returncode == 2
    assert "use high, medium or low" in " ".join(wrong_err.replace("│", " ").split())


def test_periodic_audit_logs_findings_and_publishes_a_security_event(tmp_path: Path) -> None:
    fleet = start_fleet(tmp_path, None, extra_env={"EDGEFLEET_SECURITY_AUDIT_INTERVAL_S": "0.5"})
    try:
        now = datetime.now(UTC)
        add_rows(fleet.engine, device_row("dev-old-cert", now, cert_not_after=now - timedelta(1)))
        event = next_security_event(fleet, lambda data: data["high"] >= 1)
        assert set(event) == {"generated_at", "high", "medium", "low"}
        assert event["high"] == 1
        wait_until(
            lambda: (
                "security finding kind=cert-expired severity=high target=device:dev-old-cert"
                in fleet.log()
            ),
            what="the periodic audit to log the finding",
        )
        assert "security audit done findings=1 high=1 medium=0 low=0" in fleet.log()
    finally:
        fleet.close()


def next_security_event(fleet: Fleet, matches: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The first ``security`` event on the dashboard stream whose data ``matches``."""
    deadline = time.monotonic() + timeout
    with fleet.api.stream("GET", "/api/v1/events") as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                break
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "security":
                data: dict[str, Any] = json.loads(line.partition(":")[2])
                if matches(data):
                    return data
    pytest.fail(f"no matching security event within {timeout} s")


def test_findings_are_for_admins_only(sqlite_fleet: Fleet) -> None:
    for username, role in (("vera", "viewer"), ("otto", "operator")):
        created = sqlite_fleet.api.post(
            "/api/v1/users", json={"username": username, "role": role, "password": "pw-" * 6}
        )
        assert created.status_code in (200, 201), created.text
        with sqlite_fleet.anonymous() as client:
            token = sqlite_fleet.login(client, username, "pw-" * 6)
            refused = client.get(
                "/api/v1/security/findings", headers={"Authorization": f"Bearer {token}"}
            )
        assert refused.status_code == 403, (role, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
    with sqlite_fleet.anonymous() as client:
        assert client.get("/api/v1/security/findings").status_code == 401


# --- a real broker: one identity from two places ---


@pytest.fixture
def audit_db(tmp_path: Path) -> Iterator[Engine]:
    """A migrated SQLite database of its own."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    migrate(url)
    engine = create_db_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


async def test_repeated_takeovers_of_one_certificate_on_a_real_broker_are_flagged(
    broker: RunningBroker, audit_db: Engine
) -> None:
    now = datetime.now(UTC)
    add_rows(
        audit_db,
        device_row("dev-cloned", now),
        device_row("dev-flaky", now),
        integration_row("cut-off", now, identity="cut-off-reader", revoked_at=now - timedelta(1)),
    )
    log = broker.config.log_path

    # Four connections with one key: each of the last three closes the one before.
    await connect_in_turn(broker.host, broker.port, broker.pki.client("dev-cloned"), 4)
    # A device back before the broker noticed it had gone: one takeover, not a clone.
    await connect_in_turn(broker.host, broker.port, broker.pki.client("dev-flaky"), 2)
    await connect_in_turn(broker.host, broker.port, broker.pki.client("cut-off-reader"), 1)
    await asyncio.to_thread(
        wait_until,
        lambda: log_count(log, "Client dev-cloned already connected, closing old connection.") >= 3,
        10.0,
        0.05,
        "the broker to log three takeovers of dev-cloned",
    )

    policy = AuditPolicy(broker_logs=(log,), takeover_threshold=3)
    with Session(audit_db) as session:
        report = run_audit(session, policy)

    assert {(f.kind, f.target, f.severity) for f in report.findings} == {
        ("duplicate-connection", "device:dev-cloned", Severity.HIGH),
        ("revoked-connected", "integration:cut-off", Severity.HIGH),
    }
    cloned = next(f for f in report.findings if f.kind == "duplicate-connection")
    assert "3 connections as dev-cloned" in cloned.detail
    assert "127.0.0.1" in cloned.detail
    assert (
        "cut-off-reader" in next(f for f in report.findings if f.kind == "revoked-connected").detail
    )

    # Outside the window, the same log is quiet.
    later = now + timedelta(hours=2)
    with Session(audit_db) as session:
        report = run_audit(session, policy, now=later)
    assert [f.kind for f in report.findings] == ["revoked-connected"]


def test_broker_log_parser_skips_other_lines_and_reads_both_timestamp_forms() -> None:
    activity = parse_broker_log(
        [
            "--- edgefleet: starting /usr/sbin/mosquitto ---\n",
            "2026-01-02T03:04:05: New client connected from 10.0.0.7:40000 as dev-a (p5).\n",
            "1767323045: Client dev-a already connected, closing old connection.\n",
            "1767323045: New client connected from ::1:5000 as dev-a (p5, c0, k60, u'dev-a').\n",
            "garbage: Client dev-a already connected, closing old connection.\n",
            "2026-01-02T03:04:05: Client already connected, closing old connection.\n",
            "\n",
        ]
    )
    assert list(activity.takeovers) == ["dev-a"]
    assert activity.takeovers["dev-a"] == [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)]
    assert activity.addresses("dev-a", datetime(2026, 1, 1, tzinfo=UTC)) == ["10.0.0.7", "::1"]


def test_revoked_device_is_flagged_only_for_activity_after_its_revocation(
    audit_db: Engine,
) -> None:
    now = datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)
    add_rows(
        audit_db,
        # Quiet since its revocation (its last messages came before): fine.
        device_row(
            "dev-quiet",
            now,
            status="offline",
            last_seen=hour_ago - timedelta(1),
            revoked_at=hour_ago,
        ),
        # Messages queued before the revocation landing moments after it: fine.
        device_row("dev-just-revoked", now, revoked_at=now - timedelta(seconds=5)),
        # Came online again after its revocation.
        device_row(
            "dev-back",
            now,
            status="online",
            status_changed_at=now,
            last_seen=hour_ago - timedelta(1),
            revoked_at=hour_ago,
        ),
        # Still sending after its revocation.
        device_row("dev-talking", now, status="offline", revoked_at=hour_ago),
    )
    with Session(audit_db) as session:
        report = run_audit(session, AuditPolicy())

    assert {(f.kind, f.target) for f in report.findings} == {
        ("revoked-connected", "device:dev-back"),
        ("revoked-connected", "device:dev-talking"),
    }
    details = {f.target: f.detail for f in report.findings}
    assert "reported online" in details["device:dev-back"]
    assert "last message arrived" in details["device:dev-talking"]


def test_device_certificates_are_flagged_once_their_renewal_is_overdue(audit_db: Engine) -> None:
    now = datetime.now(UTC)
    add_rows(
        audit_db,
        # One-day certificates renew at eight hours left: twelve hours left is normal.
        device_row("dev-on-time", now, cert_not_after=now + timedelta(hours=12)),
        device_row("dev-overdue", now, cert_not_after=now + timedelta(hours=5)),
        device_row("dev-lapsed", now, cert_not_after=now - timedelta(minutes=1)),
    )
    policy = AuditPolicy(cert_warn=timedelta(days=7), device_cert_ttl=timedelta(days=1))
    with Session(audit_db) as session:
        report = run_audit(session, policy)

    assert {(f.kind, f.target, f.severity) for f in report.findings} == {
        ("cert-expiring", "device:dev-overdue", Severity.MEDIUM),
        ("cert-expired", "device:dev-lapsed", Severity.HIGH),
    }
    overdue = next(f for f in report.findings if f.target == "device:dev-overdue")
    assert "expires in 5 hours" in overdue.detail


# --- the control plane's own certificates, and the settings ---


def test_expiring_and_expired_service_certificates_are_flagged(
    tmp_path: Path, audit_db: Engine
) -> None:
    ca_key, ca_cert = create_ca(valid_days=3)
    _, server_cert = issue_server_cert(
        ca_key, ca_cert, hostnames=["localhost"], ip_addresses=[], valid_days=1
    )
    home = FleetHome(tmp_path / "home")
    home.root.mkdir()
    write_certificate(home.ca_cert, ca_cert)
    write_certificate(home.server_cert, server_cert)
    (home.service_cert).write_text("not a certificate")  # unreadable ones are skipped
    settings = ServiceSettings(home=home.root, security_cert_warn_days=7)
    policy = AuditPolicy.from_settings(settings, home)

    with Session(audit_db) as session:
        soon = run_audit(session, policy)
        gone = run_audit(session, policy, now=datetime.now(UTC) + timedelta(days=2))

    assert {(f.kind, f.target, f.severity) for f in soon.findings} == {
        ("cert-expiring", "cert:ca", Severity.MEDIUM),
        ("cert-expiring", "cert:server", Severity.MEDIUM),
    }
    assert {(f.kind, f.target) for f in gone.findings} == {
        ("cert-expiring", "cert:ca"),
        ("cert-expired", "cert:server"),
    }
    assert isinstance(soon, SecurityFindings)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("security_audit_interval_s", 0),
        ("security_cert_warn_days", -1),
        ("security_takeover_threshold", 1),
        ("security_max_admins", 0),
    ],
)
def test_nonsense_audit_settings_are_refused_naming_the_setting(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        ServiceSettings.model_validate({field: value})


def test_site_bridges_are_named_as_sites_with_the_sites_cli_as_their_fix(
    audit_db: Engine,
) -> None:
    now = datetime.now(UTC)
    add_rows(
        audit_db,
        integration_row(
            f"{SITE_IDENTITY_PREFIX}lab",
            now,
            identity=f"{SITE_IDENTITY_PREFIX}lab",
            grants=["bridge"],
            cert_not_after=now - timedelta(hours=1),
        ),
        integration_row("soon-partner", now, cert_not_after=now - timedelta(hours=1)),
    )
    with Session(audit_db) as session:
        report = run_audit(session, AuditPolicy(cert_warn=timedelta(days=7)))

    fixes = {f.target: f.fix for f in report.findings if f.kind == "cert-expired"}
    assert set(fixes) == {"site:lab", "integration:soon-partner"}
    assert "`edgefleet sites revoke lab`" in fixes["site:lab"]
    assert "`edgefleet sites create` under a new name" in fixes["site:lab"]
    assert "/api/v1/integrations/" not in fixes["site:lab"]
    assert "POST /api/v1/integrations/int-soon-partner/revoke" in fixes["integration:soon-partner"]
