"""Users, login sessions and API tokens against a real service: admins manage users over REST
and the CLI, logins are rate-limited, refresh tokens rotate and betray their reuse, logout and
disabling cut live tokens at once, and API tokens carry a role, an expiry and a tag scope that
the data itself enforces."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import Session, col, select

from fleet_service.db import session_scope
from fleet_service.tables import ApiToken, AuditEvent, AuthSession
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.test_deployments import Device, make_release

PASSWORD = "a-long-enough-password"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(fleet: Fleet, username: str, password: str) -> httpx.Response:
    with fleet.anonymous() as client:
        return client.post("/api/v1/auth/token", data={"username": username, "password": password})


def add_user(fleet: Fleet, username: str, role: str, password: str = PASSWORD) -> None:
    body = {"username": username, "role": role, "password": password}
    response = fleet.api.post("/api/v1/users", json=body)
    assert response.status_code == 201, response.text


def get(fleet: Fleet, path: str, token: str) -> httpx.Response:
    with fleet.anonymous() as client:
        return client.get(path, headers=bearer(token))


def post(fleet: Fleet, path: str, token: str, body: dict[str, Any] | None = None) -> httpx.Response:
    with fleet.anonymous() as client:
        return client.post(path, headers=bearer(token), json=body if body is not None else {})


# --- users -------------------------------------------------------------------------------------


def test_an_admin_manages_users_and_each_change_applies_to_live_tokens_at_once(
    fleet: Fleet,
) -> None:
    created = fleet.api.post("/api/v1/users", json={"username": "olga", "role": "operator"})
    assert created.status_code == 201, created.text
    generated = created.json()["password"]
    assert len(generated) >= 20
    assert created.json()["user"] == {
        "username": "olga",
        "role": "operator",
        "created_at": created.json()["user"]["created_at"],
        "last_login_at": None,
        "disabled": False,
    }
    assert all("password" not in str(u) for u in fleet.api.get("/api/v1/users").json())

    first = login(fleet, "olga", generated)
    assert first.status_code == 200, first.text
    assert first.json()["expires_in"] == 900  # short access tokens by default
    assert first.json()["role"] == "operator"
    token = first.json()["access_token"]
    listed = {u["username"]: u for u in fleet.api.get("/api/v1/users").json()}
    assert listed["olga"]["last_login_at"] is not None
    assert post(fleet, "/api/v1/keys", token).status_code == 201

    # A new role applies to the very next request of a token issued before.
    demoted = fleet.api.patch("/api/v1/users/olga", json={"role": "viewer"})
    assert demoted.status_code == 200 and demoted.json()["role"] == "viewer"
    refused = post(fleet, "/api/v1/keys", token)
    assert refused.status_code == 403
    assert "operator role" in refused.json()["detail"]
    assert get(fleet, "/api/v1/devices", token).status_code == 200

    # Disabling cuts the live access token, the refresh token and any new login.
    refresh = first.json()["refresh_token"]
    assert fleet.api.patch("/api/v1/users/olga", json={"disabled": True}).json()["disabled"]
    assert get(fleet, "/api/v1/devices", token).status_code == 401
    with fleet.anonymous() as client:
        again = client.post("/api/v1/auth/refresh", json={"refresh_token": refresh})
    assert again.status_code == 401
    refused_login = login(fleet, "olga", generated)
    assert refused_login.status_code == 401
    assert "disabled" in refused_login.json()["detail"]

    # Enabled with a new password: the old one no longer works.
    enabled = fleet.api.patch(
        "/api/v1/users/olga", json={"disabled": False, "password": "another-long-password"}
    )
    assert enabled.status_code == 200 and not enabled.json()["disabled"]
    assert login(fleet, "olga", generated).status_code == 401
    assert login(fleet, "olga", "another-long-password").status_code == 200


def test_bad_user_requests_are_refused_with_the_reason(fleet: Fleet) -> None:
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/api/v1/users", {"username": "x y", "role": "viewer"}, 422, "username"),
        ("POST", "/api/v1/users", {"username": "ann", "role": "root"}, 422, "role"),
        (
            "POST",
            "/api/v1/users",
            {"username": "ann", "role": "viewer", "password": "short"},
            422,
            "password",
        ),
        ("POST", "/api/v1/users", {"username": "admin", "role": "viewer"}, 409, "already exists"),
        ("PATCH", "/api/v1/users/ghost", {"role": "viewer"}, 404, "ghost"),
        ("PATCH", "/api/v1/users/admin", {"role": "viewer"}, 409, "last enabled admin"),
        ("PATCH", "/api/v1/users/admin", {"disabled": True}, 409, "last enabled admin"),
        ("PATCH", "/api/v1/users/admin", {"surprise": 1}, 422, "surprise"),
    ]
    for method, path, body, status, detail in cases:
        response = fleet.api.request(method, path, json=body)
        assert response.status_code == status, (path, body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert detail in response.json()["detail"], response.text
    # With a second admin, the first may step down.
    add_user(fleet, "second", "admin")
    assert fleet.api.patch("/api/v1/users/admin", json={"role": "operator"}).status_code == 200


# --- sessions ----------------------------------------------------------------------------------


def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_session(fleet: Fleet) -> None:
    first = login(fleet, "admin", fleet.admin_password).json()
    with fleet.anonymous() as client:
        second = client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
        assert second.status_code == 200, second.text
        renewed = second.json()
        assert renewed["refresh_token"] != first["refresh_token"]
        assert renewed["refresh_token"].startswith("efr_")
        assert get(fleet, "/api/v1/auth/me", renewed["access_token"]).json()["name"] == "admin"

        # The spent token again: someone copied it. The whole session ends, newest tokens too.
        reused = client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
        assert reused.status_code == 401
        assert "revoked" in reused.json()["detail"]
        assert get(fleet, "/api/v1/auth/me", renewed["access_token"]).status_code == 401
        third = client.post(
            "/api/v1/auth/refresh", json={"refresh_token": renewed["refresh_token"]}
        )
        assert third.status_code == 401

        for junk in ("efr_nope", "x" * 60, "efr_" + "0" * 32 + "_guess"):
            response = client.post("/api/v1/auth/refresh", json={"refresh_token": junk})
            assert response.status_code == 401, junk
    with session_scope(fleet.engine) as session:
        stored = session.exec(select(AuthSession)).all()
        assert all(len(s.refresh_hash) == 64 for s in stored)  # hashed, never the token
        assert all(first["refresh_token"] not in s.refresh_hash for s in stored)


def test_logout_stops_the_sessions_tokens_and_no_other(fleet: Fleet) -> None:
    one = login(fleet, "admin", fleet.admin_password).json()
    other = login(fleet, "admin", fleet.admin_password).json()
    with fleet.anonymous() as client:
        out = client.post("/api/v1/auth/logout", headers=bearer(one["access_token"]))
        assert out.status_code == 204
        assert get(fleet, "/api/v1/devices", one["access_token"]).status_code == 401
        refreshed = client.post(
            "/api/v1/auth/refresh", json={"refresh_token": one["refresh_token"]}
        )
        assert refreshed.status_code == 401
        assert (
            client.post("/api/v1/auth/logout", headers=bearer(one["access_token"])).status_code
            == 401
        )
    assert get(fleet, "/api/v1/devices", other["access_token"]).status_code == 200


def test_an_open_event_stream_sends_nothing_after_its_session_is_logged_out(fleet: Fleet) -> None:
    session = login(fleet, "admin", fleet.admin_password).json()
    seen: list[str] = []
    with fleet.anonymous() as client:
        headers = bearer(session["access_token"])
        with client.stream("GET", "/api/v1/events", headers=headers, timeout=30) as stream:
            assert stream.status_code == 200
            out = client.post("/api/v1/auth/logout", headers=headers)
            assert out.status_code == 204
            time.sleep(1.5)  # past the keepalive interval (1 s in tests): the next event rechecks
            device = Device(fleet, "after-logout")  # its telemetry is a device event
            ended = False
            deadline = time.monotonic() + 20  # pings arrive every second, so this is checked
            try:
                for line in stream.iter_lines():
                    seen.append(line)
                    if time.monotonic() > deadline:
                        break
                else:
                    ended = True  # the service closed the stream
            finally:
                device.close()
    assert ended, seen
    assert not any(line.startswith("event:") for line in seen), seen


@pytest.fixture
def limited_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    fleet = start_fleet(
        tmp_path,
        database_url,
        extra_env={
            "EDGEFLEET_LOGIN_RATE_PER_USER": "3/minute",
            "EDGEFLEET_LOGIN_RATE_PER_ADDRESS": "6/minute",
        },
    )
    try:
        yield fleet
    finally:
        fleet.close()


def test_login_is_rate_limited_per_user_and_per_address(limited_fleet: Fleet) -> None:
    fleet = limited_fleet
    with fleet.anonymous() as client:
        token = fleet.login(client, "admin", fleet.admin_password)  # the 1st login as admin
        client.headers.update(bearer(token))
        assert (
            client.post(
                "/api/v1/users", json={"username": "bob", "role": "viewer", "password": PASSWORD}
            ).status_code
            == 201
        )
    for _ in range(2):
        assert login(fleet, "admin", "wrong").status_code == 401
    limited = login(fleet, "admin", fleet.admin_password)  # 4th for admin: even the right one
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "admin" in limited.json()["detail"]
    # Another user from the same address still gets in, until the address is over its limit.
    assert login(fleet, "bob", PASSWORD).status_code == 200  # 5th from this address
    assert login(fleet, "bob", "wrong").status_code == 401  # 6th
    over = login(fleet, "bob", PASSWORD)
    assert over.status_code == 429
    assert "127.0.0.1" in over.json()["detail"]
    with session_scope(fleet.engine) as session:
        outcomes = [
            e.outcome
            for e in session.exec(
                select(AuditEvent)
                .where(AuditEvent.action == "auth.login")
                .order_by(col(AuditEvent.id))
            )
        ]
    assert outcomes.count("denied") == 2 and outcomes.count("failed") == 3


# --- API tokens --------------------------------------------------------------------------------


def create_token(fleet: Fleet, **body: Any) -> dict[str, Any]:
    response = fleet.api.post("/api/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_api_tokens_carry_a_role_are_shown_once_listed_and_revoked(fleet: Fleet) -> None:
    created = create_token(fleet, name="ci-bot", role="operator")
    secret, token = created["secret"], created["token"]
    assert secret.startswith("eft_")
    expires = datetime.fromisoformat(token["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=90))) < timedelta(minutes=5)
    listed = fleet.api.get("/api/v1/tokens").json()
    assert secret not in str(listed)
    assert listed[0]["state"] == "active" and listed[0]["last_used_at"] is None
    with session_scope(fleet.engine) as session:
        stored = session.exec(select(ApiToken)).one()
        assert secret not in stored.token_hash

    me = get(fleet, "/api/v1/auth/me", secret).json()
    assert me == {"name": "token:ci-bot", "kind": "token", "role": "operator", "tag": None}
    assert post(fleet, "/api/v1/keys", secret).status_code == 201
    assert get(fleet, "/api/v1/users", secret).status_code == 403
    assert fleet.api.get("/api/v1/tokens").json()[0]["last_used_at"] is not None

    revoked = fleet.api.post(f"/api/v1/tokens/{token['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    refused = get(fleet, "/api/v1/devices", secret)
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"] and "ci-bot" in refused.json()["detail"]
    assert fleet.api.post(f"/api/v1/tokens/{token['id']}/revoke").status_code == 409
    assert fleet.api.post("/api/v1/tokens/tok-nope/revoke").status_code == 404

    # Past its expiry a token is refused, saying so (the clock is moved in the database).
    later = create_token(fleet, name="short", role="viewer", expires_in="1h")
    with session_scope(fleet.engine) as session:
        session.execute(
            update(ApiToken)
            .where(col(ApiToken.id) == later["token"]["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    expired = get(fleet, "/api/v1/devices", later["secret"])
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    unknown = get(fleet, "/api/v1/devices", "eft_" + "x" * 43)
    assert unknown.status_code == 401 and "unknown API token" in unknown.json()["detail"]


def test_bad_token_requests_are_refused_with_the_reason(fleet: Fleet) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "a", "role": "viewer", "expires_in": "400d"}, 400, "api_token_max_ttl_s"),
        ({"name": "a", "role": "viewer", "expires_in": "soon"}, 422, "expires_in"),
        ({"name": "a", "role": "viewer", "expires_in": "10s"}, 400, "at least 1 minute"),
        ({"name": "a", "role": "admin", "tag": "site=lab"}, 400, "cannot be limited to a tag"),
        ({"name": "a", "role": "viewer", "tag": "lab"}, 422, "key=value"),
        ({"name": "a b", "role": "viewer"}, 422, "name"),
        ({"name": "a", "role": "root"}, 422, "role"),
    ]
    for body, status, detail in cases:
        response = fleet.api.post("/api/v1/tokens", json=body)
        assert response.status_code == status, (body, response.text)
        assert detail in response.json()["detail"], response.text
    create_token(fleet, name="twice", role="viewer")
    again = fleet.api.post("/api/v1/tokens", json={"name": "twice", "role": "viewer"})
    assert again.status_code == 409


# --- tag scope ---------------------------------------------------------------------------------


@pytest.fixture
def two_sites(fleet: Fleet) -> Iterator[tuple[Fleet, Device, Device]]:
    lab = Device(fleet, "lab-1", fleet.create_key(tags={"site": "lab"})["join_token"])
    home = Device(fleet, "home-1", fleet.create_key(tags={"site": "home"})["join_token"])
    try:
        yield fleet, lab, home
    finally:
        lab.close()
        home.close()


def test_a_tag_scoped_token_sees_and_acts_on_its_tag_only(
    two_sites: tuple[Fleet, Device, Device],
) -> None:
    fleet, lab, home = two_sites
    secret = create_token(fleet, name="lab-ops", role="operator", tag="site=lab")["secret"]
    release = make_release(fleet, "detector", "1.0")
    lab.result(release)
    home.result(release)
    wait_until(lambda: len(fleet.api.get("/api/v1/results").json()) == 2, what="both results")
    home_command = fleet.api.post(
        f"/api/v1/devices/{home.id}/commands", json={"type": "ping"}
    ).json()
    admins = fleet.api.post(
        "/api/v1/deployments", json={"release_id": release.id, "tag": "site=home"}
    )
    assert admins.status_code == 201, admins.text

    assert [d["id"] for d in get(fleet, "/api/v1/devices", secret).json()] == [lab.id]
    for path in (
        f"/api/v1/devices/{home.id}",
        f"/api/v1/devices/{home.id}/telemetry",
        f"/api/v1/devices/{home.id}/logs",
        f"/api/v1/devices/{home.id}/desired",
        f"/api/v1/commands/{home_command['id']}",
        f"/api/v1/deployments/{admins.json()['id']}",
    ):
        response = get(fleet, path, secret)
        assert response.status_code == 404, (path, response.text)
        assert fleet.api.get(path).status_code == 200, path
    assert get(fleet, f"/api/v1/devices/{lab.id}", secret).status_code == 200
    assert get(fleet, "/api/v1/commands", secret).json() == []
    assert [r["device_id"] for r in get(fleet, "/api/v1/results", secret).json()] == [lab.id]
    summary = get(fleet, "/api/v1/results/summary", secret).json()
    assert [s["count"] for s in summary] == [1]
    assert get(fleet, "/api/v1/deployments", secret).json() == []

    # Acting on another site's device is as if it did not exist; on its own it works.
    assert (
        post(fleet, f"/api/v1/devices/{home.id}/commands", secret, {"type": "ping"}).status_code
        == 404
    )
    with fleet.anonymous() as client:
        put = client.put(
            f"/api/v1/devices/{home.id}/desired", headers=bearer(secret), json={"config": {}}
        )
    assert put.status_code == 404
    assert (
        post(fleet, f"/api/v1/devices/{lab.id}/commands", secret, {"type": "ping"}).status_code
        == 201
    )
    broadcast_home = post(fleet, "/api/v1/commands", secret, {"type": "ping", "tag": "site=home"})
    assert broadcast_home.status_code == 404
    broadcast = post(fleet, "/api/v1/commands", secret, {"type": "ping", "tag": "site=lab"})
    assert [c["device_id"] for c in broadcast.json()] == [lab.id]
    assert {c["device_id"] for c in get(fleet, "/api/v1/commands", secret).json()} == {lab.id}
    pause = post(fleet, f"/api/v1/deployments/{admins.json()['id']}/pause", secret)
    assert pause.status_code == 404

    # A deployment by the scoped token must stay inside its tag.
    other_tag = post(
        fleet, "/api/v1/deployments", secret, {"release_id": release.id, "tag": "site=home"}
    )
    assert other_tag.status_code == 403 and "site=lab" in other_tag.json()["detail"]
    other_ids = post(
        fleet, "/api/v1/deployments", secret, {"release_id": release.id, "device_ids": [home.id]}
    )
    assert other_ids.status_code == 404
    own = post(fleet, "/api/v1/deployments", secret, {"release_id": release.id, "tag": "site=lab"})
    assert own.status_code == 201, own.text
    assert [d["id"] for d in get(fleet, "/api/v1/deployments", secret).json()] == [own.json()["id"]]

    # Keys: only with its tag, so what it enrolls stays in its reach.
    assert post(fleet, "/api/v1/keys", secret, {"tags": {"site": "home"}}).status_code == 403
    assert post(fleet, "/api/v1/keys", secret, {"tags": {"site": "lab"}}).status_code == 201
    assert {tuple(k["tags"].items()) for k in get(fleet, "/api/v1/keys", secret).json()} == {
        (("site", "lab"),)
    }

    # Fleet-wide routes are refused outright.
    for path in ("/api/v1/users", "/api/v1/tokens", "/api/v1/audit", "/api/v1/events"):
        assert get(fleet, path, secret).status_code == 403, path


# --- CLI ---------------------------------------------------------------------------------------


def run(fleet: Fleet, *args: str) -> str:
    process = fleet.cli(*args)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err + out
    return out


def test_cli_manages_users_and_tokens_and_the_audit_log_names_the_cli(fleet: Fleet) -> None:
    out = run(fleet, "users", "add", "carol", "--role", "operator")
    password = re.search(r"password \(shown only now\): (\S+)", out)
    assert password, out
    assert login(fleet, "carol", password.group(1)).status_code == 200
    assert "carol" in run(fleet, "users", "list") and "operator" in run(fleet, "users", "list")
    run(fleet, "users", "set-role", "carol", "viewer")
    run(fleet, "users", "disable", "carol")
    assert login(fleet, "carol", password.group(1)).status_code == 401
    run(fleet, "users", "enable", "carol")
    reset = re.search(r"\(shown only now\): (\S+)", run(fleet, "users", "reset-password", "carol"))
    assert reset
    assert login(fleet, "carol", password.group(1)).status_code == 401
    me = login(fleet, "carol", reset.group(1))
    assert me.status_code == 200 and me.json()["role"] == "viewer"

    out = run(
        fleet,
        "tokens",
        "create",
        "nightly",
        "--role",
        "viewer",
        "--tag",
        "site=lab",
        "--expires",
        "7d",
    )
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("eft_")
    assert get(fleet, "/api/v1/auth/me", secret).json()["tag"] == "site=lab"
    token_id = re.search(r"token (tok-[0-9a-f]+)", out)
    assert token_id
    listing = run(fleet, "tokens", "list")
    assert "nightly" in listing and "site=lab" in listing and secret not in listing
    run(fleet, "tokens", "revoke", token_id.group(1))
    assert get(fleet, "/api/v1/devices", secret).status_code == 401

    bad = fleet.cli("users", "set-role", "carol", "root")
    _, err = bad.communicate(timeout=60)
    assert bad.returncode != 0 and "admin, operator or viewer" in err
    last = fleet.cli("users", "disable", "admin")
    _, err = last.communicate(timeout=60)
    assert last.returncode == 1 and "last enabled admin" in err

    log = run(fleet, "audit-log", "--action", "user.*", "--limit", "20")
    assert "user.create" in log and "user.update" in log and "by cli:" in log
    with Session(fleet.engine) as session:
        actions = {
            e.action
            for e in session.exec(
                select(AuditEvent).where(col(AuditEvent.actor).startswith("cli:"))
            )
        }
    assert {"user.create", "user.update", "token.create", "token.revoke"} <= actions
