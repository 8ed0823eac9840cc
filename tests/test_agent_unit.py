"""Unit tests of the device agent: settings, telemetry, backoff, state dir, CLI and CA pinning."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import re
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from typer.testing import CliRunner

from device_agent import __version__
from device_agent.__main__ import app
from device_agent.agent import Agent, Backoff, State
from device_agent.config import AgentSettings
from device_agent.connection import mqtt_keepalive
from device_agent.enrollment import CA_PATH, ENROLL_PATH, enroll, parse_token
from device_agent.errors import (
    AlreadyEnrolledError,
    CaFingerprintMismatchError,
    CorruptStateError,
    EnrollmentRefusedError,
    InvalidTokenError,
    NotEnrolledError,
    ServiceUnreachableError,
    UntrustedServerError,
)
from device_agent.state import DeviceIdentity, StateDir
from device_agent.telemetry import sample
from fleet_protocol import (
    EnrollRequest,
    EnrollResponse,
    JoinToken,
    TelemetryMessage,
    ca_fingerprint,
    decode,
)
from tests.fixtures.ports import free_tcp_port

REGISTRATION_KEY = "rk_" + "a" * 29


# --- a throwaway PKI ------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """A CA made for one test module."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(self.cert.public_bytes(Encoding.DER))

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        *,
        server: bool = False,
    ) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256())


def make_authority(name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


@pytest.fixture(scope="module")
def fleet_ca() -> Authority:
    return make_authority("edgefleet test fleet CA")


@pytest.fixture(scope="module")
def rogue_ca() -> Authority:
    return make_authority("somebody else's CA")


# --- a tiny fleet service over real HTTPS --------------------------------------------------


@dataclass
class StubService:
    """Answers ``/api/v1/ca`` and ``/api/v1/enroll`` like the fleet service, and records calls."""

    served_ca: Authority  # the CA returned by GET /api/v1/ca
    signer: Authority  # signs device CSRs
    refuse_with: str | None = None  # a problem detail to answer 403 with, instead of signing
    requests: list[tuple[str, str]] = field(default_factory=list)
    enroll_requests: list[EnrollRequest] = field(default_factory=list)
    issued_ids: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    stub: StubService  # set on a per-server subclass

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""

    def do_GET(self) -> None:
        self.stub.requests.append(("GET", self.path))
        if self.path == CA_PATH:
            self._reply(200, "application/x-pem-file", self.stub.served_ca.pem)
        else:
            self._problem(404, "not found", f"no route {self.path}")

    def do_POST(self) -> None:
        self.stub.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != ENROLL_PATH:
            self._problem(404, "not found", f"no route {self.path}")
            return
        request = EnrollRequest.model_validate_json(body)
        self.stub.enroll_requests.append(request)
        if self.stub.refuse_with is not None:
            self._problem(403, "registration key refused", self.stub.refuse_with)
            return
        csr = x509.load_pem_x509_csr(request.csr_pem.encode())
        public_key = csr.public_key()
        if len(csr.subject) or not isinstance(public_key, ec.EllipticCurvePublicKey):
            self._problem(422, "certificate signing request refused", "CSR chooses a subject")
            return
        device_id = f"dev-{len(self.stub.issued_ids):012x}"
        self.stub.issued_ids.append(device_id)
        cert = self.stub.signer.issue(public_key, device_id)
        response = EnrollResponse(
            device_id=device_id,
            certificate_pem=cert.public_bytes(Encoding.PEM).decode(),
            ca_certificate_pem=self.stub.signer.pem.decode(),
            device_token="efd_" + "t" * 40,
            mqtt_host="localhost",
            mqtt_port=8883,
            topic_prefix="fleet/v1",
            tags={"site": "lab"},
        )
        self._reply(200, "application/json", response.model_dump_json().encode())

    def _problem(self, status: int, title: str, detail: str) -> None:
        problem = {"type": "about:blank", "title": title, "status": status, "detail": detail}
        self._reply(status, "application/problem+json", json.dumps(problem).encode())

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class RunningService:
    stub: StubService
    url: str

    def token(self, *, ca: str | None = None) -> JoinToken:
        return JoinToken.model_validate(
            {"url": self.url, "key": REGISTRATION_KEY, "ca": ca or self.stub.served_ca.fingerprint}
        )


def _serve(stub: StubService, tls_ca: Authority, workdir: Path) -> Iterator[RunningService]:
    """Run ``stub`` over HTTPS on a free loopback port, with a server cert from ``tls_ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = tls_ca.issue(key.public_key(), "localhost", server=True)
    cert_file = workdir / "server.crt"
    key_file = workdir / "server.key"
    cert_file.write_bytes(cert.public_bytes(Encoding.PEM))
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)

    handler = type("BoundHandler", (_Handler,), {"stub": stub})
    server = HTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="stub-service"
    )
    thread.start()
    try:
        yield RunningService(stub, f"https://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def service(fleet_ca: Authority, tmp_path: Path) -> Iterator[RunningService]:
    """The fleet service of ``fleet_ca``: its CA, its signature, its TLS certificate."""
    yield from _serve(StubService(served_ca=fleet_ca, signer=fleet_ca), fleet_ca, tmp_path)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "agent-state"


# --- settings -------------------------------------------------------------------------------


def test_settings_refuse_a_non_positive_telemetry_interval(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="telemetry_interval_s"):
        AgentSettings(state_dir=tmp_path, telemetry_interval_s=0)
    with pytest.raises(ValidationError, match="telemetry_interval_s"):
        AgentSettings(state_dir=tmp_path, telemetry_interval_s=-5)


def test_settings_refuse_a_backoff_minimum_above_its_maximum(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"reconnect_min_s \(10.0\) must not exceed"):
        AgentSettings(state_dir=tmp_path, reconnect_min_s=10, reconnect_max_s=5)


def test_settings_refuse_unknown_log_levels_and_accept_lower_case(tmp_path: Path) -> None:
    assert AgentSettings(state_dir=tmp_path, log_level="debug").log_level == "DEBUG"
    with pytest.raises(ValidationError, match="log_level"):
        AgentSettings(state_dir=tmp_path, log_level="chatty")


def test_settings_keep_a_week_long_persistent_session_by_default(tmp_path: Path) -> None:
    settings = AgentSettings(state_dir=tmp_path)
    assert settings.session_expiry_s == 7 * 24 * 3600
    assert settings.reconnect_min_s <= settings.reconnect_max_s
    with pytest.raises(ValidationError, match="session_expiry_s"):
        AgentSettings(state_dir=tmp_path, session_expiry_s=0)


def test_settings_are_frozen_and_read_from_prefixed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S", "2.5")
    monkeypatch.setenv("EDGEFLEET_AGENT_STATE_DIR", str(tmp_path))
    settings = AgentSettings()
    assert settings.telemetry_interval_s == 2.5
    assert settings.state_dir == tmp_path
    with pytest.raises(ValidationError, match="frozen"):
        settings.telemetry_interval_s = 1  # type: ignore[misc]


# --- telemetry ------------------------------------------------------------------------------


async def test_telemetry_sample_of_this_machine_is_valid_and_round_trips(tmp_path: Path) -> None:
    first = await asyncio.to_thread(sample, None, disk_path=tmp_path)
    second = await asyncio.to_thread(sample, first, disk_path=tmp_path)
    for message in (first, second):
        assert decode(TelemetryMessage, message.to_payload()) == message
        assert message.agent_version == __version__
        assert message.memory_total_bytes > 0
        assert message.disk_total_bytes > 0
        assert 0 <= message.cpu_percent <= 100
    assert second.message_id != first.message_id
    assert second.uptime_s >= first.uptime_s
    assert second.net_bytes_recv >= first.net_bytes_recv


# --- backoff --------------------------------------------------------------------------------


def test_backoff_delays_stay_within_zero_and_the_cap_and_grow() -> None:
    backoff = Backoff(0.5, 8.0, rng=random.Random(1234))
    ceilings = [backoff.ceiling(attempt) for attempt in range(10)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert backoff.ceiling(10_000) == 8.0  # a long outage must not overflow

    per_attempt: list[list[float]] = [[] for _ in range(6)]
    for _ in range(400):
        backoff.reset()
        for attempt in range(6):
            delay = backoff.next_delay()
            assert 0 <= delay <= backoff.ceiling(attempt) <= 8.0
            per_attempt[attempt].append(delay)
    means = [sum(delays) / len(delays) for delays in per_attempt]
    assert means[0] < means[2] < means[4]  # full jitter: the expected delay doubles per step


def test_backoff_reset_starts_over_from_the_minimum() -> None:
    backoff = Backoff(1.0, 60.0, rng=random.Random(7))
    for _ in range(5):
        backoff.next_delay()
    assert backoff.attempt == 5
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() <= 1.0


# --- state dir ------------------------------------------------------------------------------


def _identity(device_id: str = "dev-0123456789ab") -> DeviceIdentity:
    return DeviceIdentity(
        device_id=device_id,
        service_url="https://fleet.example:8443",
        mqtt_host="localhost",
        mqtt_port=8883,
        topic_prefix="fleet/v1",
        tags={},
        enrolled_at=datetime.now(UTC),
    )


def _write_identity(state: StateDir, authority: Authority, device_id: str) -> DeviceIdentity:
    """Enroll ``state`` directly (no service): a key, a cert from ``authority``, a token."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.issue(key.public_key(), device_id)
    identity = _identity(device_id)
    state.write_enrollment(
        identity,
        key_pem=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        cert_pem=cert.public_bytes(Encoding.PEM),
        ca_pem=authority.pem,
        device_token="efd_secret",
    )
    return identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_loading_an_unenrolled_state_dir_says_how_to_enroll(state_dir: Path) -> None:
    with pytest.raises(NotEnrolledError) as caught:
        StateDir(state_dir).load_identity()
    assert f"run `edgefleet-agent enroll TOKEN --state-dir {state_dir}` first" in str(caught.value)


def test_state_files_are_written_with_private_modes(state_dir: Path, fleet_ca: Authority) -> None:
    state = StateDir(state_dir)
    identity = _write_identity(state, fleet_ca, "dev-00000000000a")
    assert _mode(state_dir) == 0o700
    assert _mode(state.key_path) == 0o600
    assert _mode(state.token_path) == 0o600
    assert _mode(state.cert_path) == 0o644
    assert _mode(state.ca_path) == 0o644
    assert state.load_identity() == identity
    assert state.read_token() == "efd_secret"
    assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_key_readable_by_others_is_refused_with_the_fix(
    state_dir: Path, fleet_ca: Authority
) -> None:
    state = StateDir(state_dir)
    _write_identity(state, fleet_ca, "dev-00000000000b")
    state.key_path.chmod(0o644)
    with pytest.raises(CorruptStateError, match=re.escape(f"chmod 600 {state.key_path}")):
        state.load_identity()


def test_an_enrolled_state_dir_is_not_overwritten_without_force(
    state_dir: Path, fleet_ca: Authority
) -> None:
    state = StateDir(state_dir)
    _write_identity(state, fleet_ca, "dev-00000000000c")
    with pytest.raises(AlreadyEnrolledError, match="--force"):
        state.check_can_enroll(force=False)
    state.check_can_enroll(force=True)


# --- join tokens and the CLI ----------------------------------------------------------------


def test_parse_token_rejects_plain_http(fleet_ca: Authority) -> None:
    token = JoinToken.model_validate(
        {"url": "http://fleet.example", "key": REGISTRATION_KEY, "ca": fleet_ca.fingerprint}
    )
    with pytest.raises(InvalidTokenError, match="must use https"):
        parse_token(token.encode())


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("not-a-token", "a join token starts with 'efjoin1.'"),
        ("efjoin1.bm90IGpzb24", "the join token is damaged"),
    ],
)
def test_cli_enroll_with_a_bad_token_prints_the_problem_and_exits_2(
    state_dir: Path, token: str, expected: str
) -> None:
    result = CliRunner().invoke(app, ["enroll", token, "--state-dir", str(state_dir)])
    assert result.exit_code == 2
    assert expected in result.stderr
    assert "Traceback" not in result.output
    assert not state_dir.exists()


def test_cli_run_on_an_unenrolled_state_dir_exits_2_with_the_fix(state_dir: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--state-dir", str(state_dir)])
    assert result.exit_code == 2
    assert "edgefleet-agent enroll TOKEN --state-dir" in result.stderr


def test_cli_refuses_nonsense_settings_with_exit_2(state_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", "--state-dir", str(state_dir), "--telemetry-interval", "0"]
    )
    assert result.exit_code == 2
    assert "telemetry_interval_s" in result.stderr


# --- enrollment against a real HTTPS service ------------------------------------------------


def test_a_token_pinning_another_ca_is_refused_before_anything_is_sent(
    service: RunningService, rogue_ca: Authority, state_dir: Path
) -> None:
    token = service.token(ca=rogue_ca.fingerprint)
    with pytest.raises(CaFingerprintMismatchError) as caught:
        enroll(token, state_dir, timeout=5)
    message = str(caught.value)
    assert rogue_ca.fingerprint in message
    assert service.stub.served_ca.fingerprint in message
    assert "is not the fleet that issued this token" in message
    assert service.stub.requests == [("GET", CA_PATH)]  # no POST carried the key anywhere
    assert not state_dir.exists()


def test_a_service_whose_tls_cert_is_not_from_the_pinned_ca_gets_no_key(
    fleet_ca: Authority, rogue_ca: Authority, tmp_path: Path, state_dir: Path
) -> None:
    # Serves the right CA (so the fingerprint matches) but its HTTPS cert is someone else's.
    stub = StubService(served_ca=fleet_ca, signer=fleet_ca)
    for running in _serve(stub, rogue_ca, tmp_path):
        with pytest.raises(UntrustedServerError, match="not signed by the pinned fleet CA"):
            enroll(running.token(), state_dir, timeout=5)
    assert stub.requests == [("GET", CA_PATH)]
    assert not state_dir.exists()


def test_a_refusal_from_the_service_shows_its_problem_detail(
    service: RunningService, state_dir: Path
) -> None:
    service.stub.refuse_with = "registration key expired"
    with pytest.raises(EnrollmentRefusedError, match="registration key expired") as caught:
        enroll(service.token(), state_dir, timeout=5)
    assert caught.value.status == 403
    assert caught.value.detail == "registration key expired"
    assert service.stub.requests == [("GET", CA_PATH), ("POST", ENROLL_PATH)]
    assert service.stub.enroll_requests[0].registration_key == REGISTRATION_KEY
    assert not state_dir.exists()


def test_an_unreachable_service_is_named_with_a_hint(fleet_ca: Authority, state_dir: Path) -> None:
    url = f"https://127.0.0.1:{free_tcp_port()}"
    token = JoinToken.model_validate(
        {"url": url, "key": REGISTRATION_KEY, "ca": fleet_ca.fingerprint}
    )
    with pytest.raises(ServiceUnreachableError, match="check the device's network") as caught:
        enroll(token, state_dir, timeout=5)
    assert url in str(caught.value)


def test_enrollment_writes_a_verified_identity_with_private_modes(
    service: RunningService, fleet_ca: Authority, state_dir: Path
) -> None:
    identity = enroll(service.token(), state_dir, timeout=5)

    assert identity.device_id == service.stub.issued_ids[0]
    assert identity.service_url == service.url
    assert (identity.mqtt_host, identity.mqtt_port) == ("localhost", 8883)
    assert identity.tags == {"site": "lab"}
    request = service.stub.enroll_requests[0]
    assert request.hostname == socket.gethostname()
    assert len(x509.load_pem_x509_csr(request.csr_pem.encode()).subject) == 0

    state = StateDir(state_dir)
    assert state.load_identity() == identity
    assert _mode(state_dir) == 0o700
    assert _mode(state.key_path) == 0o600
    assert _mode(state.token_path) == 0o600
    assert state.ca_path.read_bytes() == fleet_ca.pem
    cert = x509.load_pem_x509_certificate(state.cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.device_id
    cert.verify_directly_issued_by(fleet_ca.cert)
    private = load_pem_private_key(state.key_path.read_bytes(), password=None)
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert private.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_cli_enroll_then_refuse_again_without_force_then_replace_with_force(
    service: RunningService, state_dir: Path
) -> None:
    runner = CliRunner()
    token = service.token().encode()

    first = runner.invoke(app, ["enroll", token, "--state-dir", str(state_dir)])
    assert first.exit_code == 0, first.output
    assert f"enrolled as {service.stub.issued_ids[0]}" in first.stdout
    assert str(state_dir) in first.stdout

    again = runner.invoke(app, ["enroll", token, "--state-dir", str(state_dir)])
    assert again.exit_code == 2
    assert "already holds an enrolled device identity" in again.stderr
    assert len(service.stub.requests) == 2  # refused before contacting the service

    forced = runner.invoke(app, ["enroll", token, "--state-dir", str(state_dir), "--force"])
    assert forced.exit_code == 0, forced.output
    assert StateDir(state_dir).load_identity().device_id == service.stub.issued_ids[1]

    shown = runner.invoke(app, ["status", "--state-dir", str(state_dir)])
    assert shown.exit_code == 0, shown.output
    assert service.stub.issued_ids[1] in shown.stdout
    assert "site=lab" in shown.stdout


# --- the agent's lifecycle ------------------------------------------------------------------


async def test_agent_backs_off_while_the_broker_is_unreachable_and_stops_on_request(
    state_dir: Path, fleet_ca: Authority
) -> None:
    state = StateDir(state_dir)
    _write_identity(state, fleet_ca, "dev-00000000000d")
    identity = state.load_identity().model_copy(update={"mqtt_port": free_tcp_port()})
    settings = AgentSettings(
        state_dir=state_dir, reconnect_min_s=0.01, reconnect_max_s=0.05, connect_timeout_s=2
    )
    agent = Agent(settings, identity, rng=random.Random(3))
    stop = asyncio.Event()

    async with asyncio.TaskGroup() as group:
        runner = group.create_task(agent.run(stop), name="agent")
        async with asyncio.timeout(10):
            await agent.wait_for_state(State.BACKING_OFF)
            await agent.wait_for_state(State.CONNECTING)  # it retries on its own
            await agent.wait_for_state(State.BACKING_OFF)
        stop.set()
    assert runner.done()
    assert agent.state is State.STOPPED


def test_advertised_keepalive_keeps_dead_link_detection_within_one_and_a_half_keepalives() -> None:
    for keepalive_s in range(2, 600):
        advertised = mqtt_keepalive(keepalive_s)
        assert advertised >= 1
        # paho notices a dead link up to two advertised keepalives plus a 1 s check tick late.
        assert 2 * advertised + 1 <= 1.5 * keepalive_s, keepalive_s
