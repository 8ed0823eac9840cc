"""The OWASP API Security Top 10 (2023), one test per item, against a real ``edgefleet up``.

API1  object-level authorization: a tag-scoped token and a device token reach only their own
API2  authentication: no, forged, expired, wrong-audience, unsigned and revoked credentials fail
API3  property-level authorization: no answer carries a hash, a stored secret or a private key
API4  resource consumption: bodies, list sizes and credential guessing are bounded
API5  function-level authorization: viewers cannot write, operators cannot manage access
API6  sensitive business flows: registration keys cannot be brute-forced
API7  server-side request forgery: webhooks post only to http(s) (https off loopback); the
      agent's schedules take no URL
API8  security misconfiguration: headers, closed CORS, no interactive docs, no stack traces
API9  inventory: the OpenAPI document lists every route the service serves
API10 unsafe consumption: the agent refuses a tampered manifest (and artifact; see below)

Roles, API tokens, webhooks and tag scopes follow the issue 6 contract (/tmp CONTRACT.md).
"""

from __future__ import annotations

import base64
import importlib
import json
import pkgutil
import ssl
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.routing import APIRoute
from pydantic import ValidationError

from fleet_protocol import InferenceSchedule, ManifestError, ModelManifest, verify_manifest
from fleet_protocol.manifest import key_id_of, sign_manifest
from fleet_service.api import routes as routes_package
from fleet_service.api.middleware import SECURITY_HEADERS
from tests.fixtures.fleet import Fleet, start_fleet
from tests.test_enrollment import make_csr

LOGIN_PER_USER = 4
ENROLL_PER_ADDRESS = 4
BODY_LIMIT = 64 * 1024
_names = count()


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    token: str  # the device's own API token


@dataclass(frozen=True)
class World:
    lab: Enrolled  # tagged site=lab
    home: Enrolled  # tagged site=home


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    running = start_fleet(
        tmp_path_factory.mktemp("owasp"),
        None,
        extra_env={
            "EDGEFLEET_LOGIN_RATE_PER_USER": f"{LOGIN_PER_USER}/minute",
            "EDGEFLEET_ENROLL_RATE_PER_ADDRESS": f"{ENROLL_PER_ADDRESS}/minute",
            "EDGEFLEET_MAX_REQUEST_BYTES": str(BODY_LIMIT),
        },
    )
    yield running
    running.close()


def client_from(fleet: Fleet, address: str = "127.0.0.1") -> httpx.Client:
    """An HTTPS client that trusts the fleet CA, connecting from ``address`` (127.0.0.0/8)."""
    verify = ssl.create_default_context(cafile=str(fleet.home.ca_cert))
    transport = httpx.HTTPTransport(local_address=address, verify=verify)
    return httpx.Client(base_url=fleet.url, transport=transport, timeout=30)


def bearer(fleet: Fleet, secret: str) -> httpx.Client:
    client = client_from(fleet)
    client.headers["Authorization"] = f"Bearer {secret}"
    return client


def enroll(fleet: Fleet, tags: dict[str, str]) -> Enrolled:
    key = fleet.create_key(tags=tags)
    with client_from(fleet) as client:
        answer = client.post(
            "/api/v1/enroll",
            json={"registration_key": key["key"], "csr_pem": make_csr(), "hostname": "d"},
        )
    assert answer.status_code == 200, answer.text
    return Enrolled(answer.json()["device_id"], answer.json()["device_token"])


@pytest.fixture(scope="module")
def world(fleet: Fleet) -> World:
    return World(lab=enroll(fleet, {"site": "lab"}), home=enroll(fleet, {"site": "home"}))


def api_token(fleet: Fleet, role: str, tag: str | None = None) -> str:
    """The secret of a new API token."""
    body: dict[str, Any] = {"name": f"auto-{next(_names)}", "role": role, "expires_in": "1d"}
    if tag is not None:
        body["tag"] = tag
    created = fleet.api.post("/api/v1/tokens", json=body)
    assert created.status_code == 201, created.text
    secret: str = created.json()["secret"]
    assert secret.startswith("eft_")
    return secret


def user_client(fleet: Fleet, role: str) -> httpx.Client:
    """A client logged in as a new user with ``role``."""
    username = f"{role}-{next(_names)}"
    created = fleet.api.post("/api/v1/users", json={"username": username, "role": role})
    assert created.status_code == 201, created.text
    client = client_from(fleet)
    token = Fleet.login(client, username, created.json()["password"])
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def openapi(fleet: Fleet) -> dict[str, Any]:
    with client_from(fleet) as client:
        spec: dict[str, Any] = client.get("/api/v1/openapi.json").json()
    return spec


def operations(fleet: Fleet) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in openapi(fleet)["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


def concrete(path: str) -> str:
    """``path`` with every parameter filled in with a placeholder."""
    return path.replace("{", "").replace("}", "")


# Routes that manage access or the fleet's identity: admin only (contract: "signing-key
# rotation and all of the above access management [admin]").
ADMIN_PREFIXES = (
    "/api/v1/users",
    "/api/v1/tokens",
    "/api/v1/audit",
    "/api/v1/webhooks",
    "/api/v1/integrations",
    "/api/v1/security",
)


def admin_only(method: str, path: str) -> bool:
    return (
        path.startswith(ADMIN_PREFIXES)
        or (path.startswith("/api/v1/devices/") and path.endswith("/revoke"))
        or (method == "DELETE" and path == "/api/v1/devices/{device_id}")
    )


# --- API1 --------------------------------------------------------------------------------------


def test_api1_objects_outside_a_tag_or_another_device_are_out_of_reach(
    fleet: Fleet, world: World
) -> None:
    lab, home = world.lab, world.home
    with bearer(fleet, api_token(fleet, "operator", tag="site=lab")) as scoped:
        listed = {d["id"] for d in scoped.get("/api/v1/devices").json()}
        assert lab.device_id in listed
        assert home.device_id not in listed
        assert scoped.get(f"/api/v1/devices/{lab.device_id}").status_code == 200
        for read in ("", "/telemetry", "/logs", "/desired"):
            response = scoped.get(f"/api/v1/devices/{home.device_id}{read}")
            assert response.status_code == 404, (read, response.text)
        command = scoped.post(f"/api/v1/devices/{home.device_id}/commands", json={"type": "ping"})
        assert command.status_code == 404, command.text
        desired = scoped.put(f"/api/v1/devices/{home.device_id}/desired", json={"config": {}})
        assert desired.status_code == 404, desired.text
        broadcast = scoped.post("/api/v1/commands", json={"type": "ping", "tag": "site=home"})
        assert broadcast.status_code in (403, 404), broadcast.text
        results = scoped.get("/api/v1/results", params={"device_id": home.device_id})
        assert results.status_code == 404 or results.json() == []
    sent_home = fleet.api.get("/api/v1/commands", params={"device_id": home.device_id}).json()
    assert sent_home == [], "nothing reached the device outside the token's tag"

    # Across devices: a device's token reads its own commands only.
    sent = fleet.api.post(f"/api/v1/devices/{home.device_id}/commands", json={"type": "ping"})
    assert sent.status_code == 201, sent.text
    with bearer(fleet, lab.token) as lab_device, bearer(fleet, home.token) as home_device:
        assert sent.json()["id"] not in {
            c["id"] for c in lab_device.get("/api/v1/agent/commands").json()
        }
        assert sent.json()["id"] in {
            c["id"] for c in home_device.get("/api/v1/agent/commands").json()
        }
        # A device token is no operator credential.
        assert lab_device.get("/api/v1/devices").status_code == 401


# --- API2 --------------------------------------------------------------------------------------


def test_api2_only_valid_live_credentials_authenticate(fleet: Fleet) -> None:
    secret = fleet.home.read_jwt_secret()
    now = datetime.now(UTC)
    claims = {"sub": "admin", "role": "admin", "aud": "edgefleet-api", "iat": now}
    unsigned = (
        base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        + "."
        + base64.urlsafe_b64encode(json.dumps({**claims, "iat": 0, "exp": 4102444800}).encode())
        .rstrip(b"=")
        .decode()
        + "."
    )
    refused = {
        "none": None,
        "garbage": "not-a-token",
        "forged": jwt.encode({**claims, "exp": now + timedelta(hours=1)}, "x" * 32),
        "expired": jwt.encode({**claims, "exp": now - timedelta(seconds=5)}, secret),
        "wrong audience": jwt.encode(
            {**claims, "aud": "someone-else", "exp": now + timedelta(hours=1)}, secret
        ),
        "unsigned": unsigned,
        "unknown api token": "eft_" + "A" * 43,
    }
    with client_from(fleet) as client:
        for what, token in refused.items():
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            answer = client.get("/api/v1/devices", headers=headers)
            assert answer.status_code == 401, what
            assert answer.headers["content-type"] == "application/problem+json", what

    # A revoked API token stops working at once.
    created = fleet.api.post(
        "/api/v1/tokens", json={"name": f"revoked-{next(_names)}", "role": "viewer"}
    ).json()
    with bearer(fleet, created["secret"]) as automation:
        assert automation.get("/api/v1/devices").status_code == 200
        revoked = fleet.api.post(f"/api/v1/tokens/{created['token']['id']}/revoke")
        assert revoked.status_code == 200, revoked.text
        assert automation.get("/api/v1/devices").status_code == 401

    # Logging out ends the session's access token.
    with closing(user_client(fleet, "viewer")) as person:
        assert person.get("/api/v1/auth/me").status_code == 200
        assert person.post("/api/v1/auth/logout").status_code == 204
        assert person.get("/api/v1/auth/me").status_code == 401


# --- API3 --------------------------------------------------------------------------------------

# Keys that would hold a secret. ("password" is not one: the audit log says whether a password
# was "given" or "generated"; the password itself is looked for below.)
SECRET_KEYS = {"secret", "key_pem", "private_key", "ca_key", "device_token"}


def _leaks(value: Any, where: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            if "hash" in key.lower() or key.lower() in SECRET_KEYS:
                yield f"{where}.{key}"
            yield from _leaks(inner, f"{where}.{key}")
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _leaks(inner, f"{where}[{index}]")
    elif isinstance(value, str) and "PRIVATE KEY" in value:
        yield f"{where} (a private key)"


def test_api3_no_answer_carries_hashes_stored_secrets_or_private_keys(
    fleet: Fleet, world: World
) -> None:
    password = "correct horse battery staple 42"
    user = fleet.api.post(
        "/api/v1/users",
        json={"username": f"leak-{next(_names)}", "role": "viewer", "password": password},
    )
    assert user.status_code == 201, user.text
    token_secret = api_token(fleet, "viewer")
    hook = fleet.api.post(
        "/api/v1/webhooks", json={"name": f"hook-{next(_names)}", "url": "https://127.0.0.1:9/x"}
    )
    assert hook.status_code == 201, hook.text
    hook_secret = hook.json()["secret"]

    shown_once = {"password": password, "API token": token_secret, "webhook": hook_secret}
    reads = [
        f"/api/v1/devices/{world.lab.device_id}",
        *(
            path
            for method, path, _ in operations(fleet)
            if method == "GET"
            and "{" not in path
            and path != "/api/v1/events"  # endless
            and not path.startswith("/api/v1/agent/")  # device tokens only
        ),
    ]
    for path in reads:
        answer = fleet.api.get(path)
        assert answer.status_code == 200, (path, answer.text)
        if not answer.headers["content-type"].startswith("application/json"):
            continue
        body = answer.json()
        assert list(_leaks(body)) == [], path
        for what, secret in shown_once.items():
            assert secret not in answer.text, f"the {what} secret is in GET {path}"
    assert "BEGIN" not in fleet.api.get("/api/v1/ca").text.replace("BEGIN CERTIFICATE", "")


# --- API4 --------------------------------------------------------------------------------------


def test_api4_bodies_lists_and_guessing_are_bounded(fleet: Fleet, world: World) -> None:
    too_big = fleet.api.post("/api/v1/keys", content=b"{" + b" " * BODY_LIMIT + b"}")
    assert too_big.status_code == 413

    bounded = 0
    for method, path, operation in operations(fleet):
        limit = next((p for p in operation.get("parameters", []) if p["name"] == "limit"), None)
        if method != "GET" or limit is None:
            continue
        maximum = limit["schema"].get("maximum")
        assert maximum is not None and maximum <= 10_000, (path, limit)
        url = path.replace("{device_id}", world.lab.device_id)
        if "{" in url:
            continue
        answer = fleet.api.get(url, params={"limit": maximum + 1})
        assert answer.status_code == 422, (path, answer.text)
        bounded += 1
    assert bounded >= 5

    username = f"guessed-{next(_names)}"
    with client_from(fleet, "127.0.0.21") as client:
        tries = [
            client.post("/api/v1/auth/token", data={"username": username, "password": "nope"})
            for _ in range(LOGIN_PER_USER + 1)
        ]
    assert [t.status_code for t in tries] == [401] * LOGIN_PER_USER + [429]
    assert int(tries[-1].headers["retry-after"]) >= 1


# --- API5 --------------------------------------------------------------------------------------


def test_api5_roles_gate_every_function(fleet: Fleet) -> None:
    viewer, operator = user_client(fleet, "viewer"), user_client(fleet, "operator")
    writes = admin_routes = 0
    with closing(viewer), closing(operator):
        for method, path, operation in operations(fleet):
            if not operation.get("security") or path.startswith(("/api/v1/agent", "/api/v1/auth")):
                continue
            url = concrete(path)
            if method != "GET":
                answer = viewer.request(method, url, json={})
                assert answer.status_code == 403, (method, path, answer.text)
                writes += 1
            if admin_only(method, path):
                answer = operator.request(method, url, json={} if method != "GET" else None)
                assert answer.status_code == 403, (method, path, answer.text)
                admin_routes += 1
        # The gate is not merely shut: each role can do its own work.
        assert viewer.get("/api/v1/devices").status_code == 200
        assert operator.post("/api/v1/keys", json={}).status_code == 201
    assert writes >= 15
    assert admin_routes >= 8


# --- API6 --------------------------------------------------------------------------------------


def test_api6_registration_keys_cannot_be_brute_forced(fleet: Fleet) -> None:
    """The full story, with concurrency, is tests/test_enrollment_abuse.py."""
    key = fleet.create_key()
    with client_from(fleet, "127.0.0.22") as guesser:
        answers = [
            guesser.post(
                "/api/v1/enroll", json={"registration_key": f"efk_{n:030d}", "csr_pem": "x"}
            )
            for n in range(ENROLL_PER_ADDRESS + 1)
        ]
        right_key = guesser.post(
            "/api/v1/enroll", json={"registration_key": key["key"], "csr_pem": make_csr()}
        )
    assert [a.status_code for a in answers] == [401] * ENROLL_PER_ADDRESS + [429]
    assert right_key.status_code == 429, "over the limit even the right key waits"
    with client_from(fleet, "127.0.0.23") as elsewhere:
        ok = elsewhere.post(
            "/api/v1/enroll", json={"registration_key": key["key"], "csr_pem": make_csr()}
        )
    assert ok.status_code == 200, ok.text


# --- API7 --------------------------------------------------------------------------------------


def test_api7_the_service_posts_only_to_http_urls_and_the_agent_fetches_none(
    fleet: Fleet,
) -> None:
    for url in (
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "ftp://files.example.com/results",
        "dict://127.0.0.1:11211/",
        "http://169.254.169.254/latest/meta-data/",  # plain http off loopback
        "//no-scheme.example.com/x",
    ):
        answer = fleet.api.post(
            "/api/v1/webhooks", json={"name": f"ssrf-{next(_names)}", "url": url}
        )
        assert answer.status_code == 422, (url, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    assert not [
        w for w in fleet.api.get("/api/v1/webhooks").json() if w["name"].startswith("ssrf-")
    ]

    # An http schedule reads what is pushed to the agent's local API; it names no URL to fetch.
    with pytest.raises(ValidationError, match="url"):
        InferenceSchedule.model_validate(
            {"source": "http", "interval_s": 5, "url": "http://169.254.169.254/"}
        )


# --- API8 --------------------------------------------------------------------------------------


def test_api8_the_service_is_configured_safely(fleet: Fleet) -> None:
    """The full set is tests/test_hardening.py."""
    with client_from(fleet) as client:
        for path in ("/", "/api/v1/health", "/api/v1/nothing"):
            answer = client.get(path, headers={"Origin": "https://evil.example.com"})
            for name, value in SECURITY_HEADERS.items():
                assert answer.headers.get(name) == value, (path, name)
            assert "content-security-policy" in answer.headers
            assert "access-control-allow-origin" not in answer.headers, "CORS is closed"
            assert "server" not in answer.headers
        for docs in ("/docs", "/redoc"):
            assert client.get(docs).status_code == 404
        crash = client.post(
            "/api/v1/enroll", content=b"\xff\xfe", headers={"Content-Type": "application/json"}
        )
        assert crash.status_code in (400, 422)
        assert "Traceback" not in crash.text


# --- API9 --------------------------------------------------------------------------------------


def test_api9_the_openapi_document_lists_every_route(fleet: Fleet) -> None:
    """Every route of every router in fleet_service/api/routes is in the document the running
    service serves, and nothing is hidden from it: no shadow or forgotten endpoint."""
    written: set[tuple[str, str]] = set()
    hidden: list[str] = []
    for module_info in pkgutil.iter_modules(routes_package.__path__):
        module = importlib.import_module(f"{routes_package.__name__}.{module_info.name}")
        for route in module.router.routes:
            assert isinstance(route, APIRoute), (module_info.name, route)
            if not route.include_in_schema:
                hidden.append(f"{module_info.name}: {route.path}")
            written |= {(method, f"/api/v1{route.path}") for method in route.methods or ()}
    documented = {(method, path) for method, path, _ in operations(fleet)}
    assert written - documented == set(), "routes the OpenAPI document does not list"
    assert documented - written == set(), "documented routes no router serves"
    assert hidden == []
    assert len(written) > 30


# --- API10 -------------------------------------------------------------------------------------


def test_api10_the_agent_refuses_a_tampered_manifest() -> None:
    """Short version. The agent's whole path (download, sha256, signature, expiry, downgrade,
    decryption) is tested in tests/test_protocol_models.py (manifest refusals),
    tests/test_agent_models_download.py::test_a_tampered_artifact_fails_its_sha256_and_is_deleted
    and tests/test_model_install.py::test_a_tampered_artifact_fails_and_the_previous_release_serves.
    """
    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    now = datetime.now(UTC)
    manifest = ModelManifest.model_validate(
        {
            "name": "detector",
            "version": "1.0",
            "runtime": "onnx",
            "release": 1,
            "files": [
                {
                    "name": "model.onnx",
                    "role": "weights",
                    "sha256": "ab" * 32,
                    "size": 10,
                    "stored_sha256": "ab" * 32,
                    "stored_size": 10,
                }
            ],
            "created_at": now,
            "expires_at": now + timedelta(days=1),
        }
    )
    trusted = {key_id_of(key.public_key()): key.public_key()}
    signed = sign_manifest(manifest, key)
    assert verify_manifest(signed, trusted, now=now) == manifest

    swapped = manifest.model_copy(update={"version": "6.6.6"})
    tampered = signed.model_copy(update={"manifest": swapped})
    with pytest.raises(ManifestError) as refused:
        verify_manifest(tampered, trusted, now=now)
    assert refused.value.reason == "signature"
    with pytest.raises(ManifestError) as unknown:
        verify_manifest(sign_manifest(manifest, stranger), trusted, now=now)
    assert unknown.value.reason == "unknown-key"
    with pytest.raises(ManifestError) as expired:
        verify_manifest(signed, trusted, now=now + timedelta(days=2))
    assert expired.value.reason == "expired"
