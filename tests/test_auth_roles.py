"""Every REST route against every kind of caller, on a real service: admin, operator, viewer,
no token, an expired, a forged and a wrong-audience token, and the token of a session that was
logged out. The routes come from the app itself, so a new route cannot escape the matrix; the
routes devices call with their own token are exempt by an explicit list.

The same run then checks the audit log: every state-changing route left an event, both for the
viewer it refused and for the admin it let through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from sqlmodel import Session, select

from fleet_service.api.audit_trail import action_name
from fleet_service.api.route_templates import RouteInfo, api_routes
from fleet_service.app import create_app
from fleet_service.roles import Role
from fleet_service.tables import AuditEvent
from tests.fixtures.fleet import Fleet

VIEWER, OPERATOR, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN

# The role each operator route needs, by method and path template.
NEEDS: dict[tuple[str, str], Role] = {
    ("GET", "/api/v1/auth/me"): VIEWER,
    ("POST", "/api/v1/auth/logout"): VIEWER,
    ("GET", "/api/v1/ingest/stats"): VIEWER,
    ("GET", "/api/v1/devices"): VIEWER,
    ("GET", "/api/v1/devices/{device_id}"): VIEWER,
    ("GET", "/api/v1/devices/{device_id}/telemetry"): VIEWER,
    ("GET", "/api/v1/devices/{device_id}/desired"): VIEWER,
    ("GET", "/api/v1/devices/{device_id}/logs"): VIEWER,
    ("GET", "/api/v1/commands"): VIEWER,
    ("GET", "/api/v1/commands/{command_id}"): VIEWER,
    ("GET", "/api/v1/events"): VIEWER,
    ("GET", "/api/v1/keys"): VIEWER,
    ("GET", "/api/v1/models"): VIEWER,
    ("GET", "/api/v1/models/{release_id}"): VIEWER,
    ("GET", "/api/v1/deployments"): VIEWER,
    ("GET", "/api/v1/deployments/{deployment_id}"): VIEWER,
    ("GET", "/api/v1/results"): VIEWER,
    ("GET", "/api/v1/results/summary"): VIEWER,
    ("GET", "/api/v1/results/hourly"): VIEWER,
    ("GET", "/api/v1/metrics"): VIEWER,
    ("GET", "/api/v1/fleet/overview"): VIEWER,
    ("POST", "/api/v1/devices/{device_id}/commands"): OPERATOR,
    ("POST", "/api/v1/commands"): OPERATOR,
    ("PUT", "/api/v1/devices/{device_id}/desired"): OPERATOR,
    ("POST", "/api/v1/keys"): OPERATOR,
    ("POST", "/api/v1/keys/{key_id}/revoke"): OPERATOR,
    ("POST", "/api/v1/models"): OPERATOR,
    ("POST", "/api/v1/deployments/preview"): OPERATOR,
    ("POST", "/api/v1/deployments"): OPERATOR,
    ("POST", "/api/v1/deployments/{deployment_id}/pause"): OPERATOR,
    ("POST", "/api/v1/deployments/{deployment_id}/resume"): OPERATOR,
    ("POST", "/api/v1/deployments/{deployment_id}/rollback"): OPERATOR,
    ("GET", "/api/v1/users"): ADMIN,
    ("POST", "/api/v1/users"): ADMIN,
    ("PATCH", "/api/v1/users/{username}"): ADMIN,
    ("GET", "/api/v1/tokens"): ADMIN,
    ("POST", "/api/v1/tokens"): ADMIN,
    ("POST", "/api/v1/tokens/{token_id}/revoke"): ADMIN,
    ("GET", "/api/v1/audit"): ADMIN,
    # Device identity, integrations, webhooks and security findings (issue 6).
    ("POST", "/api/v1/devices/{device_id}/revoke"): ADMIN,
    ("DELETE", "/api/v1/devices/{device_id}"): ADMIN,
    ("GET", "/api/v1/integrations"): ADMIN,
    ("POST", "/api/v1/integrations"): ADMIN,
    ("POST", "/api/v1/integrations/{integration_id}/revoke"): ADMIN,
    ("GET", "/api/v1/webhooks"): ADMIN,
    ("POST", "/api/v1/webhooks"): ADMIN,
    ("POST", "/api/v1/webhooks/{webhook_id}/disable"): ADMIN,
    ("GET", "/api/v1/webhooks/{webhook_id}/deliveries"): ADMIN,
    ("GET", "/api/v1/security/findings"): ADMIN,
}

# Routes that take no operator credential: devices' own (device token or signed URL), the
# public health and CA, and the login and refresh that hand credentials out.
EXEMPT = {
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/ca"),
    ("POST", "/api/v1/enroll"),
    ("POST", "/api/v1/auth/token"),
    ("POST", "/api/v1/auth/refresh"),
    ("GET", "/api/v1/agent/commands"),
    ("GET", "/api/v1/agent/desired"),
    ("POST", "/api/v1/agent/messages"),
    ("GET", "/api/v1/agent/signing-keys"),
    ("GET", "/api/v1/agent/releases/{release_id}/urls"),
    ("GET", "/api/v1/artifacts/{sha256}"),
}

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ANONYMOUS = ("none", "expired", "forged", "wrong-audience", "revoked-session")
PARAMS = {"device_id": "dev-000000000000", "username": "nobody-here", "sha256": "0" * 64}


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    route: RouteInfo
    needs: Role

    @property
    def url(self) -> str:
        url = self.path
        for name in _params(self.path):
            url = url.replace("{" + name + "}", PARAMS.get(name, f"missing-{name}"))
        return url


def _params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]


def api_calls(fleet: Fleet) -> list[Call]:
    """Every (method, route) of the app under /api/v1, each with the role it needs."""
    app = create_app(fleet.settings, ingest=False)
    calls, unknown = [], []
    for route in api_routes(app):
        if not route.path.startswith("/api/v1/"):
            continue
        for method in sorted(route.methods - {"HEAD"}):
            key = (method, route.path)
            if key in EXEMPT:
                continue
            if key not in NEEDS:
                unknown.append(f"{method} {route.path}")
                continue
            calls.append(Call(method, route.path, route, NEEDS[key]))
    assert not unknown, f"routes missing from the role matrix (add them to NEEDS): {unknown}"
    return calls


def _login(fleet: Fleet, client: httpx.Client, username: str, password: str) -> str:
    return fleet.login(client, username, password)


def _add_user(fleet: Fleet, username: str, role: Role) -> str:
    password = f"{username}-password-123"
    response = fleet.api.post(
        "/api/v1/users", json={"username": username, "role": role.value, "password": password}
    )
    assert response.status_code == 201, response.text
    return password


def credentials(fleet: Fleet, client: httpx.Client) -> dict[str, str | None]:
    """A bearer token per kind of caller (None: no Authorization header at all)."""
    passwords = {"op": _add_user(fleet, "op", OPERATOR), "vic": _add_user(fleet, "vic", VIEWER)}
    admin = fleet.api.headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(admin, options={"verify_signature": False})
    secret = fleet.home.read_jwt_secret()
    now = int(time.time())
    live = {**claims, "exp": now + 600}
    dropped = _login(fleet, client, "admin", fleet.admin_password)
    logout = client.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {dropped}"})
    assert logout.status_code == 204, logout.text
    return {
        "admin": admin,
        "operator": _login(fleet, client, "op", passwords["op"]),
        "viewer": _login(fleet, client, "vic", passwords["vic"]),
        "none": None,
        "expired": jwt.encode({**claims, "exp": now - 60}, secret, algorithm="HS256"),
        "forged": jwt.encode(live, b"not-the-fleet-secret-" * 2, algorithm="HS256"),
        "wrong-audience": jwt.encode({**live, "aud": "another-service"}, secret, algorithm="HS256"),
        "revoked-session": dropped,
    }


def send(client: httpx.Client, call: Call, token: str | None) -> tuple[int, str, str]:
    """Status, content type and body (not read for an event stream) of one call."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body: dict[str, Any] | None = {} if call.method in WRITES else None
    request = client.build_request(call.method, call.url, headers=headers, json=body)
    response = client.send(request, stream=True)
    try:
        kind = response.headers.get("content-type", "")
        text = "" if kind.startswith("text/event-stream") else response.read().decode()
        return response.status_code, kind, text
    finally:
        response.close()


def test_every_route_refuses_the_wrong_caller_and_admits_the_right_role(fleet: Fleet) -> None:
    with fleet.anonymous() as client:
        tokens = credentials(fleet, client)
        calls = api_calls(fleet)
        # One session to spend per role on the logout route, which ends the session it is given.
        logout_tokens = {
            "admin": _login(fleet, client, "admin", fleet.admin_password),
            "operator": _login(fleet, client, "op", "op-password-123"),
            "viewer": _login(fleet, client, "vic", "vic-password-123"),
        }
        failures = []
        for call in calls:
            for who, token in tokens.items():
                if call.path == "/api/v1/auth/logout" and who in logout_tokens:
                    token = logout_tokens[who]
                status, kind, text = send(client, call, token)
                where = f"{call.method} {call.path} as {who}: {status} {text[:200]}"
                if who in ANONYMOUS:
                    ok = status == 401 and kind == "application/problem+json"
                    ok = (
                        ok
                        and {
                            "expired": "expired",
                            "wrong-audience": "audience",
                            "revoked-session": "ended",
                        }.get(who, "")
                        in text
                    )
                elif Role(who).grants(call.needs):
                    ok = status not in (401, 403) and status < 500
                else:
                    ok = status == 403 and call.needs.value in text
                if not ok:
                    failures.append(where)
        assert not failures, "\n".join(failures)
    assert_every_write_was_audited(fleet, calls)


def assert_every_write_was_audited(fleet: Fleet, calls: list[Call]) -> None:
    with Session(fleet.engine) as session:
        events = session.exec(select(AuditEvent)).all()
    by_action: dict[str, list[AuditEvent]] = {}
    for event in events:
        by_action.setdefault(event.action, []).append(event)
    missing = []
    for call in calls:
        if call.method not in WRITES:
            continue
        action = action_name(call.route.name, call.method, call.path)
        seen = by_action.get(action, [])
        if not any(e.actor == "admin" and e.outcome in ("success", "failed") for e in seen):
            missing.append(f"{call.method} {call.path} ({action}): nothing for the admin's call")
        if call.needs is not VIEWER and not any(
            e.actor == "vic" and e.outcome == "denied" and e.role == "viewer" for e in seen
        ):
            missing.append(f"{call.method} {call.path} ({action}): no denial of the viewer")
    assert not missing, "\n".join(missing)
