"""An owner's own identity provider: a local OIDC issuer run by the test (discovery document and
JWKS over HTTP on loopback, RS256 tokens signed with keys made here) in front of a real
service. Its tokens are checked for signature, expiry, audience and issuer, and a claim maps to
a role."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError
from sqlmodel import Session, select

from fleet_service.config import ServiceSettings
from fleet_service.tables import AuditEvent
from tests.fixtures.fleet import Fleet, start_fleet

AUDIENCE = "edgefleet-test"
ROLE_MAP = {"fleet-admins": "admin", "fleet-ops": "operator", "fleet-watch": "viewer"}


@dataclass
class Issuer:
    """A minimal OIDC provider: publishes its keys and signs tokens with them."""

    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    url: str = ""
    fetches: int = 0

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        found = []
        for kid, key in self.keys.items():
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            found.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": found}

    def token(self, *, kid: str = "k1", key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "user-42",
            "preferred_username": "dana",
            "iat": now,
            "exp": now + 300,
            "groups": ["fleet-ops"],
            **claims,
        }
        signer = key or self.keys[kid]
        return jwt.encode(body, signer, algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    provider = Issuer()
    provider.add_key("k1")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/.well-known/openid-configuration":
                body = {"issuer": provider.url, "jwks_uri": provider.url + "/jwks"}
            elif self.path == "/jwks":
                provider.fetches += 1
                body = provider.jwks()
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="oidc-issuer", daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def oidc_fleet(tmp_path: Path, database_url: str | None, issuer: Issuer) -> Iterator[Fleet]:
    fleet = start_fleet(
        tmp_path,
        database_url,
        extra_env={
            "EDGEFLEET_OIDC_ISSUER": issuer.url,
            "EDGEFLEET_OIDC_AUDIENCE": AUDIENCE,
            "EDGEFLEET_OIDC_ROLE_CLAIM": "groups",
            "EDGEFLEET_OIDC_ROLE_MAP": json.dumps(ROLE_MAP),
            "EDGEFLEET_OIDC_JWKS_COOLDOWN_S": "0",
        },
    )
    try:
        yield fleet
    finally:
        fleet.close()


def call(fleet: Fleet, method: str, path: str, token: str, **kwargs: Any) -> Any:
    with fleet.anonymous() as client:
        return client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)


def test_a_provider_token_maps_its_claim_to_a_role(oidc_fleet: Fleet, issuer: Issuer) -> None:
    fleet = oidc_fleet
    ops = issuer.token()
    me = call(fleet, "GET", "/api/v1/auth/me", ops)
    assert me.status_code == 200, me.text
    assert me.json() == {"name": "oidc:dana", "kind": "oidc", "role": "operator", "tag": None}
    assert call(fleet, "POST", "/api/v1/keys", ops, json={}).status_code == 201
    refused = call(fleet, "GET", "/api/v1/users", ops)
    assert refused.status_code == 403 and "admin role" in refused.json()["detail"]

    # The highest role any of the values maps to; values without a mapping are ignored.
    several = issuer.token(groups=["fleet-watch", "staff", "fleet-admins"])
    assert call(fleet, "GET", "/api/v1/users", several).status_code == 200
    one = issuer.token(groups="fleet-watch", preferred_username="eve")
    assert call(fleet, "GET", "/api/v1/auth/me", one).json()["role"] == "viewer"

    unmapped = call(fleet, "GET", "/api/v1/devices", issuer.token(groups=["staff"]))
    assert unmapped.status_code == 403
    assert "groups" in unmapped.json()["detail"] and "oidc_role_map" in unmapped.json()["detail"]
    absent = call(fleet, "GET", "/api/v1/devices", issuer.token(groups=None))
    assert absent.status_code == 403

    with Session(fleet.engine) as session:
        event = session.exec(select(AuditEvent).where(AuditEvent.action == "key.create")).one()
    assert (event.actor, event.actor_kind, event.role) == ("oidc:dana", "oidc", "operator")


def test_invalid_provider_tokens_are_refused_with_the_reason(
    oidc_fleet: Fleet, issuer: Issuer
) -> None:
    fleet = oidc_fleet
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    cases = {
        "expired": (issuer.token(exp=now - 120, iat=now - 600), "expired"),
        "audience": (issuer.token(aud="someone-else"), "audience"),
        "signature": (issuer.token(key=stranger), "invalid token"),
        "unknown key": (issuer.token(kid="k9", key=stranger), "not signed by a key"),
        "no sub": (issuer.token(sub=None), "invalid token"),
        "hmac": (
            jwt.encode(
                {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 60},
                b"a-shared-secret-nobody-should-trust",
                algorithm="HS256",
                headers={"kid": "k1"},
            ),
            "invalid token",
        ),
        "none": (
            jwt.encode(
                {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 60},
                "",
                algorithm="none",
                headers={"kid": "k1"},
            ),
            "",
        ),
    }
    for name, (token, reason) in cases.items():
        response = call(fleet, "GET", "/api/v1/devices", token)
        assert response.status_code == 401, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert reason in response.json()["detail"], (name, response.text)


def test_a_rotated_provider_key_is_fetched_when_a_token_names_it(
    oidc_fleet: Fleet, issuer: Issuer
) -> None:
    fleet = oidc_fleet
    assert call(fleet, "GET", "/api/v1/devices", issuer.token()).status_code == 200
    fetched = issuer.fetches
    issuer.add_key("k2")
    assert call(fleet, "GET", "/api/v1/devices", issuer.token(kid="k2")).status_code == 200
    assert issuer.fetches == fetched + 1
    # Cached: the next token with a known key costs no fetch.
    assert call(fleet, "GET", "/api/v1/devices", issuer.token(kid="k1")).status_code == 200
    assert issuer.fetches == fetched + 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"oidc_issuer": "http://idp.example.com", "oidc_audience": "x"}, "https"),
        ({"oidc_issuer": "ftp://127.0.0.1", "oidc_audience": "x"}, "https"),
        ({"oidc_issuer": "https://idp.example.com"}, "oidc_audience"),
        ({"oidc_role_map": {"ops": "root"}}, "oidc_role_map"),
    ],
)
def test_insecure_or_incomplete_oidc_settings_are_refused(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ServiceSettings(home=tmp_path, **changes)
    ServiceSettings(home=tmp_path, oidc_issuer="https://idp.example.com", oidc_audience="x")
    ServiceSettings(home=tmp_path, oidc_issuer="http://localhost:8080/realm", oidc_audience="x")
