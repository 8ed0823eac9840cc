"""The service's edges against a real ``edgefleet up``: security headers and the dashboard's CSP
(also in Chromium), CORS closed and opened, body limits, problem+json for every error, and the
startup refusals of an unsafe home or insecure settings."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import ConsoleMessage, Page, expect
from playwright.sync_api import Error as PlaywrightError

from fleet_protocol import JoinToken
from fleet_service.api.middleware import API_CSP, DASHBOARD_CSP, DOCS_CSP, SECURITY_HEADERS
from fleet_service.app import create_app
from fleet_service.bootstrap import initialise_home
from fleet_service.config import ServiceSettings
from fleet_service.hardening import startup_problems
from fleet_service.home import FleetHome
from tests.fixtures.browser import DIST, sign_in
from tests.fixtures.fleet import Fleet, free_tcp_port, start_fleet, wait_until
from tests.test_enrollment import make_csr

BODY_LIMIT = 4096
PORTAL = "https://portal.example.com"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One fleet on SQLite for the module, with a small body limit and a low enrollment rate."""
    running = start_fleet(
        tmp_path_factory.mktemp("edges"),
        None,
        extra_env={
            "EDGEFLEET_MAX_REQUEST_BYTES": str(BODY_LIMIT),
            "EDGEFLEET_ENROLL_RATE_PER_ADDRESS": "2/minute",
        },
    )
    yield running
    running.close()


@pytest.fixture(scope="module")
def cors_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A fleet whose CORS is opened to one origin."""
    running = start_fleet(
        tmp_path_factory.mktemp("cors"),
        None,
        extra_env={"EDGEFLEET_CORS_ORIGINS": f'["{PORTAL}"]'},
    )
    yield running
    running.close()


def client_from(fleet: Fleet, address: str) -> httpx.Client:
    """An HTTPS client connecting from ``address`` (any of 127.0.0.0/8)."""
    verify = ssl.create_default_context(cafile=str(fleet.home.ca_cert))
    transport = httpx.HTTPTransport(local_address=address, verify=verify)
    return httpx.Client(base_url=fleet.url, transport=transport, timeout=30)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name)
    assert "server" not in response.headers, "uvicorn's Server header names the stack"


# --- headers and CSP ---------------------------------------------------------------------------


def test_every_answer_carries_the_security_headers_and_a_csp(fleet: Fleet) -> None:
    asset = next((DIST.parent / "assets").glob("*.js")).name
    with fleet.anonymous() as client:
        answers = {
            "api": client.get("/api/v1/health"),
            "pem": client.get("/api/v1/ca"),
            "dashboard": client.get("/"),
            "client route": client.get("/devices/dev-000000000000"),
            "asset": client.get(f"/assets/{asset}"),
            "unknown route": client.get("/no/such/page"),
            "unauthenticated": client.get("/api/v1/devices"),
        }
    for what, response in answers.items():
        assert response.status_code < 500, what
        assert_security_headers(response)
        expected = DASHBOARD_CSP if what in ("dashboard", "client route") else API_CSP
        assert response.headers["content-security-policy"] == expected, what
    for what in ("api", "pem", "unauthenticated"):
        assert answers[what].headers["cache-control"] == "no-store", what


def test_the_dashboard_policy_is_strict() -> None:
    directives = {}
    for part in DASHBOARD_CSP.split(";"):
        name, _, value = part.strip().partition(" ")
        directives[name] = value
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'"
    assert directives["base-uri"] == "'none'"
    assert "unsafe" not in DASHBOARD_CSP
    assert "*" not in DASHBOARD_CSP


def test_the_built_dashboard_has_no_inline_script_or_style() -> None:
    html = DIST.read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts, "the Vite build has its entry script"
    for attributes, body in scripts:
        assert "src=" in attributes and not body.strip(), "an inline script needs 'unsafe-inline'"
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html), "inline event handlers are inline scripts"


@pytest.mark.browser
def test_the_dashboard_runs_under_its_csp_in_chromium(fleet: Fleet, page: Page) -> None:
    violations: list[str] = []

    def watch(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Content-Security-Policy" in message.text:
            violations.append(message.text)

    # A device, so its page (with its uPlot charts) renders too.
    key = fleet.create_key()
    with client_from(fleet, "127.0.0.10") as client:
        enrolled = client.post(
            "/api/v1/enroll", json={"registration_key": key["key"], "csr_pem": make_csr()}
        )
    assert enrolled.status_code == 200, enrolled.text
    device_id = enrolled.json()["device_id"]

    page.on("console", watch)
    page.goto(f"{fleet.url}/")
    sign_in(page, fleet)
    for route in (
        "/models",
        "/deployments",
        "/results",
        "/users",
        "/audit",
        f"/devices/{device_id}",
    ):
        page.goto(f"{fleet.url}{route}")
        expect(page.get_by_test_id("live-indicator")).to_have_attribute("data-state", "live")
    expect(page.get_by_test_id("range-picker")).to_be_visible()
    framed = page.evaluate("() => fetch('/').then(r => r.headers.get('content-security-policy'))")
    assert framed == DASHBOARD_CSP
    assert violations == []

    # The control: an injected inline script is refused, and the refusal is seen.
    with pytest.raises(PlaywrightError):
        page.add_script_tag(content="document.body.dataset.injected = 'yes'")
    wait_until(lambda: violations, 5, 0.1, "the CSP violation report")
    assert page.evaluate("() => document.body.dataset.injected") is None


def test_interactive_docs_are_off_and_the_openapi_document_is_public(fleet: Fleet) -> None:
    with fleet.anonymous() as client:
        for path in ("/docs", "/redoc"):
            assert_problem(client.get(path), 404)
        spec = client.get("/api/v1/openapi.json")
    assert spec.status_code == 200
    assert "/api/v1/enroll" in spec.json()["paths"]


# --- CORS --------------------------------------------------------------------------------------


def test_cors_is_closed_by_default(fleet: Fleet) -> None:
    with fleet.anonymous() as client:
        simple = client.get("/api/v1/health", headers={"Origin": PORTAL})
        preflight = client.options(
            "/api/v1/devices",
            headers={
                "Origin": PORTAL,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
    assert simple.status_code == 200
    for response in (simple, preflight):
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    # No route answers OPTIONS: the preflight fails like any unsupported method.
    assert_problem(preflight, 405)


def test_cors_opens_to_exactly_the_listed_origins(cors_fleet: Fleet) -> None:
    preflight_headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with cors_fleet.anonymous() as client:
        allowed = client.get("/api/v1/health", headers={"Origin": PORTAL})
        allowed_preflight = client.options(
            "/api/v1/keys", headers={"Origin": PORTAL, **preflight_headers}
        )
        other = client.get("/api/v1/health", headers={"Origin": "https://evil.example.com"})
        other_preflight = client.options(
            "/api/v1/keys", headers={"Origin": "https://evil.example.com", **preflight_headers}
        )
        lookalike = client.get("/api/v1/health", headers={"Origin": PORTAL + ".evil.example"})

    assert allowed.headers["access-control-allow-origin"] == PORTAL
    assert "origin" in allowed.headers["vary"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    assert allowed_preflight.status_code == 200
    assert allowed_preflight.headers["access-control-allow-origin"] == PORTAL
    assert "POST" in allowed_preflight.headers["access-control-allow-methods"]
    assert "authorization" in allowed_preflight.headers["access-control-allow-headers"].lower()
    assert_security_headers(allowed_preflight)

    for response in (other, lookalike):
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
    refused = assert_problem(other_preflight, 400)
    assert "https://evil.example.com" in refused["detail"]
    assert "cors_origins" in refused["detail"]
    assert "access-control-allow-origin" not in other_preflight.headers


# --- body limits -------------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413_problem_json(fleet: Fleet) -> None:
    big = b'{"registration_key": "' + b"k" * (2 * BODY_LIMIT) + b'"}'

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    with fleet.anonymous() as client:
        declared = client.post(
            "/api/v1/enroll", content=big, headers={"Content-Type": "application/json"}
        )
        streamed = client.post(
            "/api/v1/enroll", content=chunked(), headers={"Content-Type": "application/json"}
        )
        login = client.post(
            "/api/v1/auth/token", data={"username": "admin", "password": "p" * BODY_LIMIT}
        )
    for response in (declared, streamed, login):
        body = assert_problem(response, 413)
        assert str(BODY_LIMIT) in body["detail"]
        assert "max_request_bytes" in body["detail"]
        assert_security_headers(response)
    authenticated = fleet.api.put(
        "/api/v1/devices/dev-000000000000/desired",
        json={"config": {"x": "y" * BODY_LIMIT}},
    )
    assert_problem(authenticated, 413)


def test_the_model_upload_streams_past_the_body_limit(fleet: Fleet) -> None:
    weights = os.urandom(16 * BODY_LIMIT)
    response = fleet.api.post(
        "/api/v1/models",
        data={"name": "big-enough", "version": "1.0", "runtime": "onnx"},
        files={"weights": ("model.onnx", weights, "application/octet-stream")},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    assert response.json()["stored_bytes"] == len(weights)


# --- problem+json for every error --------------------------------------------------------------


def test_every_kind_of_error_is_problem_json(fleet: Fleet) -> None:
    with fleet.anonymous() as client:
        assert_problem(client.get("/api/v1/nothing-here"), 404)
        not_allowed = assert_problem(client.delete("/api/v1/health"), 405)
        assert "GET" in not_allowed["detail"]
        unauthenticated = client.get("/api/v1/devices")
        assert_problem(unauthenticated, 401)
        assert unauthenticated.headers["www-authenticate"] == "Bearer"
        invalid = assert_problem(client.post("/api/v1/enroll", json={"surprise": 1}), 422)
        assert invalid["errors"], "each invalid field is listed"
        garbled = client.post(
            "/api/v1/enroll", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert_problem(garbled, 422)
    assert_problem(fleet.api.get("/api/v1/devices/dev-000000000000"), 404)
    assert_problem(fleet.api.post("/api/v1/keys", json={"max_uses": 0}), 422)


def test_rate_limited_enrollment_is_429_problem_json_with_retry_after(fleet: Fleet) -> None:
    # From an address of its own, so no other test's attempts count.
    body = {"registration_key": "efk_guess", "csr_pem": "x"}
    with client_from(fleet, "127.0.0.9") as client:
        answers = [client.post("/api/v1/enroll", json=body) for _ in range(3)]
    assert [a.status_code for a in answers[:2]] == [401, 401]
    limited = assert_problem(answers[2], 429)
    assert "enrollment attempts from 127.0.0.9" in limited["detail"]
    assert 1 <= int(answers[2].headers["retry-after"]) <= 60


def test_an_unexpected_failure_is_a_500_problem_without_a_stack_trace(tmp_path: Path) -> None:
    settings = ServiceSettings(home=tmp_path / "home")
    initialise_home(settings)
    app = create_app(settings, ingest=False)

    def boom() -> None:
        raise RuntimeError("database password is hunter2")

    app.add_api_route("/api/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/api/v1/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "internal server error"
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value


def test_the_openapi_document_says_every_error_is_problem_json(fleet: Fleet) -> None:
    with fleet.anonymous() as client:
        spec = client.get("/api/v1/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["components"]["schemas"]["Problem"]["required"] == [
        "type",
        "title",
        "status",
        "detail",
    ]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if operation.get("security"):
                assert {"401", "403"} <= set(responses), (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
            if "requestBody" in operation:
                assert {"413", "422"} <= set(responses), (method, path)
            for status, response in responses.items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
    enroll = spec["paths"]["/api/v1/enroll"]["post"]["responses"]
    assert "Retry-After" in enroll["429"]["headers"]


def test_the_docs_ui_when_turned_on_gets_its_own_policy(tmp_path: Path) -> None:
    settings = ServiceSettings(home=tmp_path / "home", api_docs=True)
    initialise_home(settings)
    with TestClient(create_app(settings, ingest=False)) as client:
        docs = client.get("/docs")
        api = client.get("/api/v1/health")
    assert docs.status_code == 200
    assert docs.headers["content-security-policy"] == DOCS_CSP
    assert api.headers["content-security-policy"] == API_CSP


# --- plain HTTP behind a TLS proxy -------------------------------------------------------------


def test_plain_http_on_loopback_serves_and_advertises_the_proxy_url(tmp_path: Path) -> None:
    port = free_tcp_port()
    env = {
        **os.environ,
        "EDGEFLEET_HOME": str(tmp_path / "home"),
        "EDGEFLEET_HTTP_PORT": str(port),
        "EDGEFLEET_MQTT_PORT": str(free_tcp_port()),
        "EDGEFLEET_HTTP_TLS": "false",
        "EDGEFLEET_PUBLIC_URL": "https://fleet.example.com",
    }
    result = initialise_home(ServiceSettings(home=tmp_path / "home"))
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleet_service", "up"], stdout=out, stderr=out, env=env
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            def healthy() -> bool:
                assert process.poll() is None, log.read_text()
                try:
                    return client.get("/api/v1/health").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, 30, 0.2, "the plain HTTP API")
            token = client.post(
                "/api/v1/auth/token",
                data={"username": "admin", "password": result.admin_password},
                # The proxy says who the client is; the service believes it from loopback.
                headers={"X-Forwarded-For": "203.0.113.7"},
            )
            assert token.status_code == 200, token.text
            key = client.post(
                "/api/v1/keys",
                json={},
                headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            )
        assert key.status_code == 201, key.text
        assert str(JoinToken.decode(key.json()["join_token"]).url) == "https://fleet.example.com/"
        assert "plain http://127.0.0.1" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=20)


# --- startup refusals --------------------------------------------------------------------------


def edgefleet_up(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``edgefleet up`` that is expected to refuse (so to exit at once)."""
    return subprocess.run(
        [sys.executable, "-m", "fleet_service", "up"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "EDGEFLEET_HOME": str(home),
            "EDGEFLEET_HTTP_PORT": str(free_tcp_port()),
            "EDGEFLEET_MQTT_PORT": str(free_tcp_port()),
            **env,
        },
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    settings = ServiceSettings(home=tmp_path / "home")
    initialise_home(settings)
    return FleetHome(settings.home)


def problems(home: FleetHome, **settings: Any) -> list[str]:
    return startup_problems(ServiceSettings(home=home.root, **settings), home)


def test_a_fresh_home_has_no_startup_problems(home: FleetHome) -> None:
    assert problems(home) == []


def test_up_refuses_a_key_file_others_can_read_naming_it_and_the_fix(home: FleetHome) -> None:
    home.server_key.chmod(0o640)
    home.jwt_secret.chmod(0o604)

    result = edgefleet_up(home.root)

    assert result.returncode == 1
    assert "will not start" in result.stderr
    for path in (home.server_key, home.jwt_secret):
        assert f"key file {path} is readable by other users" in result.stderr
        assert f"chmod 600 {path}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_key_file_owned_by_another_user_is_refused(home: FleetHome) -> None:
    os.chown(home.ca_key, 65534, -1)
    (found,) = problems(home)
    assert f"key file {home.ca_key} is owned by uid 65534" in found
    assert f"chown root {home.ca_key}" in found


def test_a_home_others_can_write_is_refused(home: FleetHome) -> None:
    home.root.chmod(0o777)
    (found,) = problems(home)
    assert "writable by other users" in found
    assert f"chmod 700 {home.root}" in found


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"0123456789abcdef", "only 16 bytes long"),
        (b"changeme\n", "a well-known default value"),
        (b"a" * 64, "a placeholder"),
    ],
)
def test_a_weak_jwt_secret_is_refused(home: FleetHome, content: bytes, why: str) -> None:
    home.jwt_secret.write_bytes(content)
    (found,) = problems(home)
    assert f"secret file {home.jwt_secret} is {why}" in found
    assert "head -c 32 /dev/urandom" in found


def test_minio_default_credentials_are_refused(home: FleetHome) -> None:
    (found,) = problems(
        home,
        artifact_store="s3",
        s3_endpoint="127.0.0.1:9000",
        s3_access_key="minioadmin",
        s3_secret_key="minioadmin",
        s3_secure=False,
    )
    assert "s3_access_key/s3_secret_key are MinIO's" in found
    assert "EDGEFLEET_S3_SECRET_KEY" in found


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"EDGEFLEET_HTTP_TLS": "false", "EDGEFLEET_HTTP_HOST": "0.0.0.0"},  # noqa: S104
            "http_tls is false but http_host is 0.0.0.0",
        ),
        ({"EDGEFLEET_CORS_ORIGINS": '["*"]'}, "cors_origins '*': a wildcard"),
        (
            {"EDGEFLEET_CORS_ORIGINS": '["http://portal.example.com"]'},
            "use its https:// origin",
        ),
        (
            {
                "EDGEFLEET_OIDC_ISSUER": "http://idp.example.com",
                "EDGEFLEET_OIDC_AUDIENCE": "edgefleet",
            },
            "oidc_issuer http://idp.example.com: use an https:// URL",
        ),
    ],
    ids=["plaintext-off-loopback", "cors-wildcard", "cors-plain-http", "oidc-plain-http"],
)
def test_up_refuses_insecure_settings_naming_them(
    home: FleetHome, env: dict[str, str], message: str
) -> None:
    started = time.monotonic()
    result = edgefleet_up(home.root, **env)
    assert result.returncode != 0
    assert message in " ".join(result.stderr.replace("│", " ").split()), result.stderr
    assert time.monotonic() - started < 30, "refused before starting anything"
