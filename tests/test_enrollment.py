"""Enrollment against the real service, on SQLite and PostgreSQL: it works, and every bad
key, fingerprint or CSR is refused with a clear error and changes nothing."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import text
from sqlmodel import Session

from fleet_protocol import JoinToken
from fleet_service.tables import RegistrationKey
from tests.fixtures.fleet import Fleet, run_agent_cli


def make_csr(
    key: Any = None,
    subject: list[x509.NameAttribute[str]] | None = None,
    extensions: list[x509.ExtensionType] | None = None,
) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def key_secret(created: dict[str, Any]) -> str:
    return str(created["key"])


def snapshot(fleet: Fleet) -> tuple[int, list[tuple[str, int]]]:
    """Devices enrolled and each key's use count: what a refused enrollment must not change."""
    with fleet.engine.connect() as conn:
        devices = conn.execute(text("SELECT count(*) FROM device")).scalar_one()
        keys = conn.execute(text("SELECT id, uses FROM registration_key ORDER BY id")).all()
    return devices, [(k, u) for k, u in keys]


def enroll(fleet: Fleet, key: str, csr_pem: str) -> Any:
    with fleet.anonymous() as client:
        return client.post(
            "/api/v1/enroll", json={"registration_key": key, "csr_pem": csr_pem, "hostname": "t"}
        )


def test_agent_enrolls_with_join_token_and_gets_tags_and_identity(fleet: Fleet) -> None:
    created = fleet.create_key(max_uses=2, tags={"site": "lab"})
    state_dir = fleet.enroll("pi-1", created["join_token"])

    identity = json.loads((state_dir / "device.json").read_text())
    device = fleet.device(identity["device_id"])
    assert device["tags"] == {"site": "lab"}
    assert device["status"] == "unknown"
    for secret in ("device.key", "device_token"):
        mode = stat.S_IMODE((state_dir / secret).stat().st_mode)
        assert mode == 0o600, f"{secret} has mode {oct(mode)}"
    cert = x509.load_pem_x509_certificate((state_dir / "device.crt").read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == identity["device_id"]
    keys = fleet.api.get("/api/v1/keys").json()
    assert [(k["uses"], k["state"]) for k in keys] == [(1, "active")]


def test_used_up_key_is_refused(fleet: Fleet) -> None:
    created = fleet.create_key(max_uses=1)
    assert enroll(fleet, key_secret(created), make_csr()).status_code == 200
    before = snapshot(fleet)

    response = enroll(fleet, key_secret(created), make_csr())

    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert "used-up" in response.json()["detail"]
    assert snapshot(fleet) == before


def test_expired_key_is_refused(fleet: Fleet) -> None:
    created = fleet.create_key(max_uses=5)
    with Session(fleet.engine) as session:
        row = session.get(RegistrationKey, created["id"])
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(minutes=1)
        session.add(row)
        session.commit()
    before = snapshot(fleet)

    response = enroll(fleet, key_secret(created), make_csr())

    assert response.status_code == 403
    assert "expired" in response.json()["detail"]
    assert snapshot(fleet) == before


def test_revoked_key_is_refused(fleet: Fleet) -> None:
    created = fleet.create_key(max_uses=5)
    revoked = fleet.api.post(f"/api/v1/keys/{created['id']}/revoke")
    assert revoked.json()["state"] == "revoked"
    before = snapshot(fleet)

    response = enroll(fleet, key_secret(created), make_csr())

    assert response.status_code == 403
    assert "revoked" in response.json()["detail"]
    assert snapshot(fleet) == before


def test_garbage_key_is_refused(fleet: Fleet) -> None:
    fleet.create_key()
    before = snapshot(fleet)

    response = enroll(fleet, "efk_not-a-real-key", make_csr())

    assert response.status_code == 401
    assert "not recognised" in response.json()["detail"]
    assert snapshot(fleet) == before


def test_malformed_and_hostile_csrs_are_refused_without_spending_the_key(fleet: Fleet) -> None:
    created = fleet.create_key(max_uses=1)
    secret = key_secret(created)
    basic_ca = x509.BasicConstraints(ca=True, path_length=None)
    san = x509.SubjectAlternativeName([x509.DNSName("broker.example")])
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    cases = {
        "garbage": "-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----",
        "chooses its own id": make_csr(
            subject=[x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet-service")]
        ),
        "asks to be a CA": make_csr(extensions=[basic_ca]),
        "asks for a SAN": make_csr(extensions=[san]),
        "weak RSA": make_csr(weak_rsa),
        "Ed25519": make_csr(ed25519.Ed25519PrivateKey.generate()),
    }
    before = snapshot(fleet)
    for case, csr in cases.items():
        response = enroll(fleet, secret, csr)
        assert response.status_code == 422, (case, response.text)
        assert response.json()["detail"], case
    assert snapshot(fleet) == before
    assert enroll(fleet, secret, make_csr()).status_code == 200, "the key was spent"


def test_agent_refuses_a_server_whose_ca_does_not_match_the_token(fleet: Fleet) -> None:
    created = fleet.create_key()
    token = JoinToken.decode(created["join_token"])
    forged = JoinToken(url=token.url, key=token.key, ca="sha256:" + "ab" * 32).encode()
    before = snapshot(fleet)
    state_dir = fleet.tmp / "agents" / "mitm"

    result = run_agent_cli("enroll", forged, "--state-dir", str(state_dir))

    assert result.returncode != 0
    assert "fingerprint" in (result.stderr + result.stdout).lower()
    assert "Traceback" not in result.stderr
    assert snapshot(fleet) == before
    assert not (state_dir / "device.json").exists()


def test_agent_reports_a_refused_key_clearly(fleet: Fleet) -> None:
    created = fleet.create_key()
    fleet.api.post(f"/api/v1/keys/{created['id']}/revoke")

    result = run_agent_cli("enroll", created["join_token"], "--state-dir", str(fleet.tmp / "x"))

    assert result.returncode != 0
    assert "revoked" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_damaged_join_token_is_refused_by_the_agent(tmp_path: Any) -> None:
    result = run_agent_cli("enroll", "efjoin1.garbage!!", "--state-dir", str(tmp_path / "s"))
    assert result.returncode != 0
    assert "join token" in (result.stderr + result.stdout).lower()
