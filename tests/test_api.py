"""The REST API of a real service: login, auth on every route, problem+json on bad requests."""

from __future__ import annotations

import jwt
import pytest

from tests.fixtures.fleet import Fleet

PROTECTED = [
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/dev-000000000000"),
    ("GET", "/api/v1/devices/dev-000000000000/telemetry"),
    ("GET", "/api/v1/keys"),
    ("POST", "/api/v1/keys"),
    ("POST", "/api/v1/keys/key-1/revoke"),
    ("GET", "/api/v1/ingest/stats"),
    ("GET", "/api/v1/events"),
]


def test_wrong_password_and_unknown_user_get_the_same_401(fleet: Fleet) -> None:
    with fleet.anonymous() as client:
        for username, password in (("admin", "wrong"), ("nobody", "wrong")):
            response = client.post(
                "/api/v1/auth/token", data={"username": username, "password": password}
            )
            assert response.status_code == 401
            assert response.json()["detail"] == "incorrect username or password"


def test_every_route_but_enrollment_and_health_requires_a_valid_token(fleet: Fleet) -> None:
    forged = jwt.encode({"sub": "admin", "aud": "edgefleet-api", "exp": 4102444800}, "x" * 32)
    with fleet.anonymous() as client:
        assert client.get("/api/v1/health").status_code == 200
        assert client.get("/api/v1/ca").text.startswith("-----BEGIN CERTIFICATE-----")
        for method, path in PROTECTED:
            for headers in ({}, {"Authorization": f"Bearer {forged}"}):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["content-type"] == "application/problem+json"


def test_expired_token_is_refused_with_a_hint(fleet: Fleet) -> None:
    secret = fleet.home.read_jwt_secret()
    expired = jwt.encode({"sub": "admin", "aud": "edgefleet-api", "exp": 1}, secret)
    with fleet.anonymous() as client:
        response = client.get("/api/v1/devices", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_uses": 0}, "max_uses"),
        ({"expires_in_s": 5}, "expires_in_s"),
        ({"tags": {"bad key!": "x"}}, "tags"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_key_requests_get_problem_json_naming_the_field(
    fleet: Fleet, body: dict[str, object], field: str
) -> None:
    response = fleet.api.post("/api/v1/keys", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert field in response.json()["detail"]


def test_unknown_device_and_bad_time_range_are_clear_errors(fleet: Fleet) -> None:
    missing = fleet.api.get("/api/v1/devices/dev-000000000000")
    assert missing.status_code == 404
    assert "dev-000000000000" in missing.json()["detail"]
    bad_range = fleet.api.get(
        "/api/v1/devices/dev-000000000000/telemetry",
        params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
    )
    assert bad_range.status_code == 400
    naive = fleet.api.get(
        "/api/v1/devices/dev-000000000000/telemetry", params={"since": "2026-01-01T00:00:00"}
    )
    assert naive.status_code == 422


def test_openapi_is_complete_and_typed(fleet: Fleet) -> None:
    with fleet.anonymous() as client:
        spec = client.get("/api/v1/openapi.json").json()
    for path in ("/api/v1/enroll", "/api/v1/devices", "/api/v1/keys", "/api/v1/auth/token"):
        assert path in spec["paths"], path
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            ok = responses.get("200") or responses.get("201") or responses.get("204")
            assert ok, (method, path)
            content = ok.get("content", {})
            if "application/json" in content:
                assert content["application/json"]["schema"], (method, path)
    for name in ("DevicePublic", "TelemetryPoint", "EnrollRequest", "EnrollResponse"):
        assert name in spec["components"]["schemas"]
