"""Device certificate rotation against real processes: ``edgefleet up`` with one-minute device
certificates, real agents that renew over their MQTT session, and CSRs the service must refuse.

What a device generated is read from its own log (``telemetry stored message_id=<id>``) and
compared with what the database holds, as in tests/test_fault_agents.py: a switch of key and
certificate must lose nothing and store nothing twice.
"""

from __future__ import annotations

import json
import queue
import re
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from device_agent.errors import RenewalError
from device_agent.renewal import CertificateInfo, check_renewed_certificate, make_csr
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    CsrMessage,
    DeviceState,
    StatusMessage,
    TelemetryMessage,
    TopicKind,
    device_topic,
)
from fleet_service.pki import create_ca, sign_device_csr
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.test_fault_agents import (
    acks_of,
    agent_log,
    check_ids,
    logged,
    quiesce_drain_and_stop,
    wait_for_rows,
)

# The shortest lifetime the service allows; with a renewal at 3/4 of it remaining, an agent
# renews every ~11 s (the service backdates a certificate by a tenth of its lifetime).
TTL_S = 60
RENEW_ENV = {
    "EDGEFLEET_AGENT_CERT_RENEW_FRACTION": "0.75",
    "EDGEFLEET_AGENT_CERT_RENEW_TIMEOUT_S": "5",
    "EDGEFLEET_AGENT_CERT_RENEW_RETRY_MIN_S": "1",
    "EDGEFLEET_AGENT_CERT_RENEW_RETRY_MAX_S": "4",
    "EDGEFLEET_AGENT_RECEIPT_TIMEOUT_S": "3",
}
# Long enough for two renewals on a loaded two-core machine.
RENEWAL_WAIT_S = 45.0
SWITCHED = "switched to the renewed certificate serial="


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def rotating_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    """A fleet issuing one-minute device certificates, on SQLite and PostgreSQL."""
    fleet = start_fleet(
        tmp_path, database_url, extra_env={"EDGEFLEET_DEVICE_CERT_TTL_S": str(TTL_S)}
    )
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def rotating_sqlite_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The same on SQLite only, for tests about processes and refusals rather than storage."""
    fleet = start_fleet(tmp_path, None, extra_env={"EDGEFLEET_DEVICE_CERT_TTL_S": str(TTL_S)})
    try:
        yield fleet
    finally:
        fleet.close()


# -- helpers -------------------------------------------------------------------------------------


def disk_cert(state_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((state_dir / "device.crt").read_bytes())


def serial_of(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def db_device(fleet: Fleet, device_id: str) -> dict[str, Any]:
    with fleet.engine.connect() as conn:
        row = conn.execute(
            text("SELECT cert_serial, cert_not_after, latest_telemetry FROM device WHERE id = :d"),
            {"d": device_id},
        ).one()
    telemetry = row[2] if isinstance(row[2], dict | None) else json.loads(row[2])
    return {"cert_serial": row[0], "cert_not_after": row[1], "latest_telemetry": telemetry}


def issued(fleet: Fleet, device_id: str) -> list[dict[str, Any]]:
    """The device certificates recorded for ``device_id`` (not the service's single-use ones)."""
    with fleet.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT serial, kind, issued_at, not_after FROM issued_certificate "
                "WHERE identity = :d AND kind = 'device' ORDER BY issued_at"
            ),
            {"d": device_id},
        )
        return [dict(row._mapping) for row in rows]


def audit_outcomes(fleet: Fleet, device_id: str) -> list[tuple[str, str]]:
    with fleet.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT outcome, detail FROM audit_event WHERE action = 'certificate.renew' "
                "AND target = :d ORDER BY id"
            ),
            {"d": device_id},
        )
        return [
            (row[0], (row[1] if isinstance(row[1], dict) else json.loads(row[1])).get("reason", ""))
            for row in rows
        ]


def key_matches_cert(state_dir: Path) -> bool:
    key = serialization.load_pem_private_key((state_dir / "device.key").read_bytes(), None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        key.public_key().public_bytes(der, spki)
        == disk_cert(state_dir).public_key().public_bytes(der, spki)
    )


def ping(fleet: Fleet, device_id: str) -> str:
    response = fleet.api.post(
        f"/api/v1/devices/{device_id}/commands", json={"type": "ping", "expires_in_s": 300}
    )
    assert response.status_code == 201, response.text
    command_id: str = response.json()["id"]
    return command_id


class CsrSender:
    """A paho client holding a device's identity: sends raw CSRs and reads the answers."""

    def __init__(self, state_dir: Path, port: int) -> None:
        identity = json.loads((state_dir / "device.json").read_text())
        self.device_id: str = identity["device_id"]
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.receipts: queue.Queue[dict[str, Any]] = queue.Queue()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv5
        )
        context = ssl.create_default_context(cafile=str(state_dir / "ca.crt"))
        context.load_cert_chain(str(state_dir / "device.crt"), str(state_dir / "device.key"))
        self._client.tls_set_context(context)
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        for kind in (TopicKind.CERTIFICATE, TopicKind.RECEIPTS):
            # Sent before any CSR on this connection, so in place before an answer can come.
            self._client.subscribe(device_topic(self.device_id, kind), qos=1)
        self.publish(
            TopicKind.STATUS,
            StatusMessage(state=DeviceState.ONLINE, agent_version="raw").to_payload(),
            retain=True,
        )

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        target = self.answers if message.topic.endswith("/certificate") else self.receipts
        target.put(body)

    def publish(self, kind: TopicKind, payload: bytes, *, retain: bool = False) -> None:
        topic = device_topic(self.device_id, kind)
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def ask(self, request: CsrMessage) -> dict[str, Any]:
        """Send ``request`` and return the service's answer to it."""
        self.publish(TopicKind.CSR, request.to_payload())
        deadline = time.monotonic() + 15
        while True:
            answer = self.answers.get(timeout=max(0.1, deadline - time.monotonic()))
            if answer["request_id"] == request.message_id:
                return answer

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def switched_serials(state_dir: Path) -> list[str]:
    """Serials of the certificates the agent switched to, in order."""
    return re.findall(SWITCHED + r"([0-9a-f]+)", agent_log(state_dir))


def broker_accepts(fleet: Fleet, state_dir: Path, cert: Path, key: Path) -> bool:
    """Whether the broker lets a client in with ``cert`` (under a client id of its own)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(cafile=str(state_dir / "ca.crt"))
    context.load_cert_chain(str(cert), str(key))
    client.tls_set_context(context)
    outcome: queue.Queue[bool] = queue.Queue()
    client.on_connect = lambda *args: outcome.put(args[3] == 0)
    client.on_disconnect = lambda *_args: outcome.put(False)
    client.on_connect_fail = lambda *_args: outcome.put(False)
    try:
        client.connect("127.0.0.1", fleet.mqtt_port)
    except OSError:  # ssl.SSLError included: a TLS 1.2 handshake fails here
        return False
    client.loop_start()
    try:
        return outcome.get(timeout=10)
    except queue.Empty:  # no CONNACK at all is no admission either
        return False
    finally:
        client.loop_stop()
        client.disconnect()


def new_csr() -> str:
    return make_csr(ec.generate_private_key(ec.SECP256R1()))


# -- renewal ---------------------------------------------------------------------------------


def test_agent_renews_before_expiry_and_switches_without_losing_or_doubling_messages(
    rotating_fleet: Fleet,
) -> None:
    # On both databases: the renewal writes issued_certificate, device and audit_event rows.
    fleet = rotating_fleet
    state_dir = fleet.enroll("rotor")
    first = disk_cert(state_dir)
    first_key = (state_dir / "device.key").read_bytes()
    lifetime = first.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(seconds=TTL_S - 10) < lifetime <= timedelta(seconds=TTL_S), lifetime
    agent = fleet.start_agent(state_dir, telemetry_interval=0.2, extra_env=RENEW_ENV)
    device_id = agent.device_id
    wait_for_rows(fleet, [agent], more_than=3)

    # Commands keep arriving while the agent renews and reconnects; each must run once.
    commands: list[str] = []

    def renewed() -> bool:
        commands.append(ping(fleet, device_id))
        return SWITCHED in agent_log(state_dir)

    wait_until(renewed, timeout=RENEWAL_WAIT_S, interval=0.5, what="the agent to renew")
    assert datetime.now(UTC) < first.not_valid_after_utc, "renewed only after expiry"
    (renewed_serial, *_) = switched_serials(state_dir)
    for _ in range(3):
        commands.append(ping(fleet, device_id))
    # Samples taken after the switch report the new certificate, over the new connection.
    wait_until(
        lambda: (
            (db_device(fleet, device_id)["latest_telemetry"] or {}).get("cert_serial")
            in switched_serials(state_dir)
        ),
        what="telemetry from the renewed connection",
    )

    # Every ping answered before the agent stops: one still on its way to the device when
    # SIGTERM lands would wait for the next run, which is not what this test is about.
    wait_until(
        lambda: all(acks_of(fleet, c)[-1:] == ["succeeded"] for c in commands),
        timeout=60,
        what="every ping sent across the switch to be acked",
    )
    quiesce_drain_and_stop(fleet, [agent])
    check_ids(fleet, "certificate renewal mid-stream", [agent])
    for command_id in commands:
        statuses = acks_of(fleet, command_id)
        assert statuses and statuses[-1] == "succeeded", (command_id, statuses)
        assert len(statuses) == len(set(statuses)), f"{command_id} acked twice: {statuses}"

    # The device holds a new key and the certificate it switched to last, which the service
    # issued and recorded for it.
    current = disk_cert(state_dir)
    assert serial_of(current) == switched_serials(state_dir)[-1]
    assert serial_of(current) != serial_of(first)
    assert key_matches_cert(state_dir)
    assert (state_dir / "device.key").read_bytes() != first_key
    rows = issued(fleet, device_id)
    renewed_rows = [r for r in rows if r["serial"] != serial_of(first)]
    assert {r["serial"] for r in renewed_rows} >= set(switched_serials(state_dir))
    assert renewed_serial in {r["serial"] for r in renewed_rows}
    device = db_device(fleet, device_id)
    assert device["cert_serial"] == renewed_rows[-1]["serial"]
    if device["cert_serial"] != serial_of(current):
        # Only when the agent stopped with a later renewal answered but not yet installed.
        log = agent_log(state_dir)
        assert log.rfind("certificate renewal requested") > log.rfind(SWITCHED)
    else:
        assert not (state_dir / "renewal.key").exists()
    assert current.not_valid_after_utc - current.not_valid_before_utc <= timedelta(
        seconds=TTL_S * 1.1
    )
    assert ("success", "") in audit_outcomes(fleet, device_id)
    # The new certificate chains to the fleet CA and names the device.
    ca = x509.load_pem_x509_certificate(fleet.home.ca_cert.read_bytes())
    current.verify_directly_issued_by(ca)
    assert current.subject.rfc4514_string() == f"CN={device_id}"


def test_agent_keeps_publishing_after_its_enrollment_certificate_expired(
    rotating_sqlite_fleet: Fleet,
) -> None:
    fleet = rotating_sqlite_fleet
    state_dir = fleet.enroll("outlives")
    first = disk_cert(state_dir)
    old_key, old_cert = state_dir / "old.key", state_dir / "old.crt"
    old_key.write_bytes((state_dir / "device.key").read_bytes())
    old_key.chmod(0o600)
    old_cert.write_bytes((state_dir / "device.crt").read_bytes())
    agent = fleet.start_agent(state_dir, telemetry_interval=0.5, extra_env=RENEW_ENV)
    wait_for_rows(fleet, [agent], more_than=2)

    # Observed, not slept: the first certificate's expiry passes while the agent publishes.
    wait_until(
        lambda: datetime.now(UTC) > first.not_valid_after_utc + timedelta(seconds=1),
        timeout=TTL_S + 10,
        interval=1,
        what="the enrollment certificate to expire",
    )
    wait_for_rows(fleet, [agent], more_than=3)
    # A fresh connection from disk now, and the restarted agent goes on renewing.
    assert agent.stop() == 0
    renewals = len(switched_serials(state_dir))
    restarted = fleet.start_agent(state_dir, telemetry_interval=0.5, extra_env=RENEW_ENV)
    wait_for_rows(fleet, [restarted], more_than=3)
    wait_until(
        lambda: len(switched_serials(state_dir)) > renewals,
        timeout=RENEWAL_WAIT_S,
        what="a renewal after the restart",
    )
    assert "expired at" not in agent_log(state_dir)
    quiesce_drain_and_stop(fleet, [restarted])
    check_ids(fleet, "enrollment certificate expired, agent renewed", [agent, restarted])
    # With the agent gone (a probe may not take its session): the broker takes what the
    # device holds now and refuses the certificate it enrolled with.
    assert broker_accepts(fleet, state_dir, state_dir / "device.crt", state_dir / "device.key")
    assert not broker_accepts(fleet, state_dir, old_cert, old_key)


# -- refusals ------------------------------------------------------------------------------------


def rsa_1024_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505  (the point)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_bad_renewal_requests_are_refused_and_the_device_keeps_its_certificate(
    rotating_sqlite_fleet: Fleet,
) -> None:
    fleet = rotating_sqlite_fleet
    state_dir = fleet.enroll("asker")
    before = disk_cert(state_dir)
    sender = CsrSender(state_dir, fleet.mqtt_port)
    device_id = sender.device_id
    try:
        # A renewal right after enrollment: a device asking this soon is broken or hostile.
        # Asked before anything else, so a loaded machine cannot stretch "right after" past
        # the tenth of the lifetime.
        answer = sender.ask(CsrMessage(device_id=device_id, csr_pem=new_csr()))
        assert "ask again after" in answer["refused"], answer
        other_dir = fleet.enroll("other")
        other_id = json.loads((other_dir / "device.json").read_text())["device_id"]
        wrong_id = sender.ask(CsrMessage(device_id=other_id, csr_pem=new_csr()))
        assert "came on the csr topic of" in wrong_id["refused"], wrong_id
        # Observed, not slept: the service lets a device renew a tenth of a lifetime on.
        enrolled_at = issued(fleet, device_id)[0]["issued_at"]
        wait_until(
            lambda: datetime.now(UTC) > _aware(enrolled_at) + timedelta(seconds=TTL_S / 10 + 0.5),
            what="a tenth of the lifetime to pass",
        )
        current_key = serialization.load_pem_private_key(
            (state_dir / "device.key").read_bytes(), None
        )
        assert isinstance(current_key, ec.EllipticCurvePrivateKey)
        cases = [
            (CsrMessage(device_id=device_id, csr_pem="hello"), "not a PEM certificate signing"),
            (CsrMessage(device_id=device_id, csr_pem=rsa_1024_csr()), "at least 2048 bits"),
            (CsrMessage(device_id=device_id, csr_pem=make_csr(current_key)), "rotates the key"),
        ]
        for request, reason in cases:
            answer = sender.ask(request)
            assert reason in answer["refused"], answer
            assert answer.get("certificate_pem") is None
        # Not a CSR message: refused by the id it carries, or only logged when it has none.
        sender.publish(TopicKind.CSR, b"garbage")
        sender.publish(TopicKind.CSR, b'{"message_id": "not-a-request-1"}')
        malformed = sender.answers.get(timeout=15)
        assert malformed["request_id"] == "not-a-request-1"
        assert "not a CSR message" in malformed["refused"]

        # The same identity still works: its telemetry is stored and receipted.
        sample = TelemetryMessage.model_validate(_telemetry())
        sender.publish(TopicKind.TELEMETRY, sample.to_payload())
        wait_until(
            lambda: sample.message_id in sender.receipts.get(timeout=15)["message_ids"],
            what="a receipt for telemetry sent after the refusals",
        )
    finally:
        sender.close()

    assert [r["serial"] for r in issued(fleet, device_id)] in ([], [serial_of(before)])
    assert db_device(fleet, device_id)["cert_serial"] == serial_of(before)
    assert disk_cert(state_dir).serial_number == before.serial_number
    log = fleet.log()
    reasons = ["too-soon", "device-id", "csr", "csr", "key-reused", "malformed", "malformed"]
    for reason in reasons:
        assert f"certificate renewal refused device_id={device_id} " in log
        assert f"reason={reason}:" in log
    assert audit_outcomes(fleet, device_id) == [("denied", reason) for reason in reasons]


def test_revoked_device_gets_no_new_certificate_and_keeps_its_old_one(
    rotating_sqlite_fleet: Fleet,
) -> None:
    fleet = rotating_sqlite_fleet
    state_dir = fleet.enroll("revoked")
    before = disk_cert(state_dir)
    device_id = json.loads((state_dir / "device.json").read_text())["device_id"]
    # Revoked in the registry only, not its certificate: the service drops its session once,
    # but the broker lets it back in, so the device asks for a renewal and must be told no.
    with fleet.engine.begin() as conn:
        conn.execute(
            text("UPDATE device SET revoked_at = :t, revoked_by = 'test' WHERE id = :d"),
            {"t": datetime.now(UTC), "d": device_id},
        )
    agent = fleet.start_agent(state_dir, telemetry_interval=0.5, extra_env=RENEW_ENV)
    wait_until(
        partial(logged, state_dir, "the service refused it: device"),
        timeout=RENEWAL_WAIT_S,
        what="the agent to be refused",
    )
    log = agent_log(state_dir)
    assert "certificate renewal failed attempt=1 retry_in_s=" in log
    assert "was revoked" in log
    assert f"certificate renewal refused device_id={device_id}" in fleet.log()
    assert "reason=revoked" in fleet.log()
    assert disk_cert(state_dir).serial_number == before.serial_number
    assert key_matches_cert(state_dir)
    assert [r["serial"] for r in issued(fleet, device_id)] in ([], [serial_of(before)])
    assert db_device(fleet, device_id)["cert_serial"] == serial_of(before)
    assert SWITCHED not in log
    assert not (state_dir / "device.key.new").exists()
    assert agent.stop() == 0


# -- the agent's checks and the journaled swap, without a fleet -----------------------------------

DEVICE_ID = "dev-0123456789ab"


def _pem(value: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(value, x509.Certificate):
        return value.public_bytes(serialization.Encoding.PEM)
    return value.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return create_ca("rotation test CA", valid_days=2)


def _issue(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
    *,
    device_id: str = DEVICE_ID,
    ttl_s: int = 3600,
) -> x509.Certificate:
    return sign_device_csr(
        ca[0], ca[1], make_csr(key).encode(), device_id, timedelta(seconds=ttl_s)
    )


def test_short_certificates_are_backdated_by_a_tenth_and_renew_at_the_fraction(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    cert = _issue(ca, ec.generate_private_key(ec.SECP256R1()), ttl_s=TTL_S)
    info = CertificateInfo.of(cert)
    assert info.not_after - info.not_before == timedelta(seconds=TTL_S * 1.1)
    assert info.renew_at(0.5) == info.not_after - timedelta(seconds=TTL_S * 0.55)
    assert not info.expired(datetime.now(UTC))
    assert info.expired(info.not_after)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other key", "another key"),
        ("other CA", "not issued by the pinned fleet CA"),
        ("other device", "not device"),
        ("server cert", "client authentication"),
        ("not newer", "no later than the current one"),
    ],
)
def test_agent_refuses_a_renewed_certificate_it_cannot_use(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], case: str, message: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    current = CertificateInfo.of(_issue(ca, ec.generate_private_key(ec.SECP256R1())))
    if case == "other key":
        cert = _issue(ca, ec.generate_private_key(ec.SECP256R1()), ttl_s=7200)
    elif case == "other CA":
        cert = _issue(create_ca("another fleet", valid_days=2), key, ttl_s=7200)
    elif case == "other device":
        cert = _issue(ca, key, device_id="dev-ba9876543210", ttl_s=7200)
    elif case == "server cert":
        cert = _server_only(ca, key)
    else:
        cert = _issue(ca, key, ttl_s=60)
    with pytest.raises(RenewalError, match=message):
        check_renewed_certificate(
            cert, key=key, ca=ca[1], device_id=DEVICE_ID, current=current, now=datetime.now(UTC)
        )
    good = _issue(ca, key, ttl_s=7200)
    check_renewed_certificate(
        good, key=key, ca=ca[1], device_id=DEVICE_ID, current=current, now=datetime.now(UTC)
    )


def _server_only(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """A certificate right in every way but its usage: TLS server, not client."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, DEVICE_ID)]))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(minutes=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    return builder.sign(ca[0], hashes.SHA256())


@pytest.fixture
def enrolled(
    tmp_path: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> tuple[StateDir, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A state dir with an identity, and a pending renewal key with its certificate."""
    state = StateDir(tmp_path / "state")
    old_key = ec.generate_private_key(ec.SECP256R1())
    state.write_enrollment(
        DeviceIdentity(
            device_id=DEVICE_ID,
            service_url="https://127.0.0.1:8443",
            mqtt_host="127.0.0.1",
            mqtt_port=8883,
            topic_prefix="fleet/v1",
            enrolled_at=datetime.now(UTC),
        ),
        key_pem=_pem(old_key),
        cert_pem=_pem(_issue(ca, old_key)),
        ca_pem=_pem(ca[1]),
        device_token="efd_token",
    )
    new_key = ec.generate_private_key(ec.SECP256R1())
    state.pending_key_path.write_bytes(_pem(new_key))
    state.pending_key_path.chmod(0o600)
    return state, new_key, _issue(ca, new_key, ttl_s=7200)


def _holds(state: StateDir, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    return state.key_path.read_bytes() == _pem(key) and state.cert_path.read_bytes() == _pem(cert)


def test_install_renewal_swaps_key_and_certificate_together(
    enrolled: tuple[StateDir, ec.EllipticCurvePrivateKey, x509.Certificate],
) -> None:
    state, new_key, new_cert = enrolled
    state.install_renewal(_pem(new_cert))
    assert _holds(state, new_key, new_cert)
    assert not state.pending_key_path.exists()
    assert state.key_path.stat().st_mode & 0o777 == 0o600
    assert (
        sorted(p.name for p in state.root.iterdir() if ".new" in p.name or p.suffix == ".tmp") == []
    )
    assert state.load_identity().device_id == DEVICE_ID


@pytest.mark.parametrize("crashed_after", ["key staged", "both staged", "key swapped"])
def test_a_swap_cut_short_is_finished_or_undone_on_the_next_load(
    enrolled: tuple[StateDir, ec.EllipticCurvePrivateKey, x509.Certificate], crashed_after: str
) -> None:
    state, new_key, new_cert = enrolled
    old = (state.key_path.read_bytes(), state.cert_path.read_bytes())
    key_new, cert_new = state.root / "device.key.new", state.root / "device.crt.new"
    # What install_renewal leaves behind when the power goes at each step.
    state.pending_key_path.replace(key_new)
    if crashed_after != "key staged":
        cert_new.write_bytes(_pem(new_cert))
    if crashed_after == "key swapped":
        key_new.replace(state.key_path)

    state.load_identity()

    if crashed_after == "key staged":
        # Undone: the old pair stays, the new key waits for its certificate again.
        assert (state.key_path.read_bytes(), state.cert_path.read_bytes()) == old
        assert state.pending_key_path.read_bytes() == _pem(new_key)
    else:
        assert _holds(state, new_key, new_cert)
    assert not key_new.exists()
    assert not cert_new.exists()


def _aware(value: datetime | str) -> datetime:
    """A timestamp column as read back (SQLite hands over text)."""
    stamp = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _telemetry() -> dict[str, Any]:
    return {
        "cpu_percent": 5.0,
        "load_1": 0.1,
        "load_5": 0.1,
        "load_15": 0.1,
        "memory_percent": 40.0,
        "memory_used_bytes": 1,
        "memory_total_bytes": 2,
        "disk_percent": 10.0,
        "disk_used_bytes": 1,
        "disk_total_bytes": 2,
        "net_bytes_sent": 0,
        "net_bytes_recv": 0,
        "uptime_s": 1.0,
        "agent_version": "raw",
        "architecture": "x86_64",
        "platform": "Linux",
    }
