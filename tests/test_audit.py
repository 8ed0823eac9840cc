"""The audit log of a real service: each state-changing action is recorded with who, what,
target, when, from where and outcome, in the transaction of the change; refused and failed
attempts are recorded apart; the log is read over REST with filters and cannot be edited."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.fixtures.fleet import Fleet, wait_until
from tests.test_deployments import Device, make_release
from tests.test_models_api import upload

PASSWORD = "a-long-enough-password"


def events(fleet: Fleet, **filters: Any) -> list[dict[str, Any]]:
    response = fleet.api.get("/api/v1/audit", params={"limit": 1000, **filters})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def one(fleet: Fleet, action: str, **filters: Any) -> dict[str, Any]:
    found = events(fleet, action=action, **filters)
    assert len(found) == 1, (action, found)
    return found[0]


@pytest.fixture
def device(fleet: Fleet) -> Iterator[Device]:
    found = Device(fleet, "audited", fleet.create_key(tags={"site": "lab"})["join_token"])
    try:
        yield found
    finally:
        found.close()


def test_every_kind_of_change_is_recorded_with_its_actor_target_and_origin(
    fleet: Fleet, device: Device
) -> None:
    api = fleet.api
    key = fleet.create_key(tags={"site": "lab"})
    assert api.post(f"/api/v1/keys/{key['id']}/revoke").status_code == 200
    command = api.post(f"/api/v1/devices/{device.id}/commands", json={"type": "ping"}).json()
    assert api.post("/api/v1/commands", json={"type": "ping", "tag": "site=lab"}).status_code == 201
    desired = api.put(
        f"/api/v1/devices/{device.id}/desired", json={"config": {"telemetry_interval_s": 5}}
    )
    assert desired.status_code == 200
    uploaded = upload(api, name="audited", version="1.0")
    assert uploaded.status_code == 201, uploaded.text
    release = make_release(fleet, "detector", "1.0")
    deployment = api.post("/api/v1/deployments", json={"release_id": release.id, "tag": "site=lab"})
    assert deployment.status_code == 201, deployment.text
    deployment_id = deployment.json()["id"]
    for action in ("pause", "resume", "rollback"):
        response = api.post(f"/api/v1/deployments/{deployment_id}/{action}")
        assert response.status_code == 200, response.text
    created = api.post("/api/v1/users", json={"username": "uma", "role": "viewer"})
    assert created.status_code == 201
    assert api.patch("/api/v1/users/uma", json={"role": "operator"}).status_code == 200
    token = api.post("/api/v1/tokens", json={"name": "bot", "role": "viewer"}).json()["token"]
    assert api.post(f"/api/v1/tokens/{token['id']}/revoke").status_code == 200
    with fleet.anonymous() as client:
        session = client.post(
            "/api/v1/auth/token", data={"username": "uma", "password": created.json()["password"]}
        ).json()
        renewed = client.post(
            "/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]}
        ).json()
        headers = {"Authorization": f"Bearer {renewed['access_token']}"}
        assert client.post("/api/v1/auth/logout", headers=headers).status_code == 204

    expected = {
        "key.create": key["id"],
        "key.revoke": key["id"],
        "command.create": device.id,
        "command.broadcast": "site=lab",
        "desired.update": device.id,
        "model.create": uploaded.json()["id"],
        "deployment.create": deployment_id,
        "deployment.pause": deployment_id,
        "deployment.resume": deployment_id,
        "deployment.rollback": deployment_id,
        "user.create": "uma",
        "user.update": "uma",
        "token.create": token["id"],
        "token.revoke": token["id"],
    }
    for action, target in expected.items():
        event = one(fleet, action, target=target, outcome="success")
        assert (event["actor"], event["actor_kind"], event["role"]) == ("admin", "user", "admin")
        assert event["address"] == "127.0.0.1"
        assert datetime.fromisoformat(event["at"]) > datetime.now(UTC) - timedelta(minutes=5)
    assert one(fleet, "command.create")["detail"]["command_id"] == command["id"]
    assert one(fleet, "user.update")["detail"] == {"changed": ["role"], "role": "operator"}
    created_event = one(fleet, "user.create", target="uma")
    assert created_event["detail"] == {"role": "viewer", "password": "generated"}
    for action in ("auth.login", "auth.refresh", "auth.logout"):
        event = one(fleet, action, actor="uma")
        assert event["outcome"] == "success" and event["role"] == "operator", event
    # Secrets never reach the log.
    everything = str(events(fleet))
    assert created.json()["password"] not in everything
    assert session["refresh_token"] not in everything and key["key"] not in everything


def test_refused_and_failed_attempts_are_recorded_apart_with_the_actor(fleet: Fleet) -> None:
    api = fleet.api
    assert (
        api.post(
            "/api/v1/users", json={"username": "vic", "role": "viewer", "password": PASSWORD}
        ).status_code
        == 201
    )
    with fleet.anonymous() as client:
        assert (
            client.post(
                "/api/v1/auth/token", data={"username": "vic", "password": "wrong-guess"}
            ).status_code
            == 401
        )
        token = client.post(
            "/api/v1/auth/token", data={"username": "vic", "password": PASSWORD}
        ).json()["access_token"]
        refused = client.post("/api/v1/keys", json={}, headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 403
        assert client.post("/api/v1/keys", json={}).status_code == 401
    missing = api.post("/api/v1/devices/dev-000000000000/commands", json={"type": "ping"})
    assert missing.status_code == 404
    invalid = api.post("/api/v1/deployments", json={"release_id": "rel-nope", "tag": "nothing"})
    assert invalid.status_code == 422

    failed_login = one(fleet, "auth.login", outcome="failed")
    assert (failed_login["actor"], failed_login["actor_kind"]) == ("vic", "anonymous")
    assert failed_login["detail"] == {"reason": "incorrect username or password"}
    denied = one(fleet, "key.create", outcome="denied", actor="vic")
    assert denied["role"] == "viewer" and denied["actor_kind"] == "user"
    assert denied["detail"]["status"] == 403 and "operator role" in denied["detail"]["reason"]
    anonymous = one(fleet, "key.create", outcome="denied", actor="anonymous")
    assert anonymous["detail"]["status"] == 401 and anonymous["role"] is None
    failed = one(fleet, "command.create", outcome="failed")
    assert failed["actor"] == "admin" and failed["target"] == "dev-000000000000"
    assert "dev-000000000000" in failed["detail"]["reason"]
    assert one(fleet, "deployment.create", outcome="failed")["detail"]["status"] == 422
    # Nothing was changed, so no success was recorded: the event commits with the change.
    assert events(fleet, action="command.create", outcome="success") == []
    assert events(fleet, action="key.create", outcome="success") == []


def test_the_log_is_filtered_and_cannot_be_edited_through_the_api(fleet: Fleet) -> None:
    api = fleet.api
    start = datetime.now(UTC) - timedelta(seconds=1)
    for name in ("ann", "ben"):
        api.post("/api/v1/users", json={"username": name, "role": "viewer"})
    api.post("/api/v1/tokens", json={"name": "bot", "role": "viewer"})

    assert [e["target"] for e in events(fleet, action="user.create", since=start.isoformat())] == [
        "ben",
        "ann",
    ]
    assert {e["action"] for e in events(fleet, action="user.*")} == {"user.create"}
    assert [e["action"] for e in events(fleet, target="ann")] == ["user.create"]
    assert len(events(fleet, actor="admin", limit=2)) == 2
    assert events(fleet, until=start.isoformat(), actor="admin", action="token.create") == []
    assert events(fleet, outcome="denied") == []
    assert all(e["outcome"] == "success" for e in events(fleet, outcome="success"))
    for params, field in (
        ({"outcome": "maybe"}, "outcome"),
        ({"since": "2026-01-01T00:00:00"}, "since"),
        ({"limit": 0}, "limit"),
    ):
        bad = api.get("/api/v1/audit", params=params)
        assert bad.status_code == 422 and field in bad.json()["detail"], bad.text

    before = events(fleet)
    for method in ("PUT", "PATCH", "DELETE"):
        for path in ("/api/v1/audit", f"/api/v1/audit/{before[0]['id']}"):
            response = api.request(method, path, json={})
            assert response.status_code in (404, 405), (method, path)
            assert response.headers["content-type"] == "application/problem+json"
        assert api.request(method, "/api/v1/audit", json={}).status_code == 405
    after = events(fleet)
    assert after[-len(before) :] == before  # nothing changed or went missing
    assert len(events(fleet, action="PUT /api/v1/audit", outcome="denied")) == 2


def test_the_cli_lists_the_log_with_filters(fleet: Fleet) -> None:
    fleet.api.post("/api/v1/users", json={"username": "cli-seen", "role": "viewer"})
    wait_until(lambda: events(fleet, target="cli-seen"), what="the event")
    process = fleet.cli("audit-log", "--target", "cli-seen", "--json")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and '"action":"user.create"' in lines[0]
    process = fleet.cli("audit-log", "--outcome", "nope")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "success, denied or failed" in err


def test_cli_actions_are_recorded_as_the_local_user(fleet: Fleet) -> None:
    def run(*args: str) -> None:
        process = fleet.cli(*args)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err

    run("keys", "create", "--expires", "1h", "--max-uses", "1")
    created = one(fleet, "key.create")
    assert created["actor"].startswith("cli:") and created["actor_kind"] == "cli"
    assert created["address"] == "local" and created["detail"]["max_uses"] == 1
    run("keys", "revoke", created["target"])
    assert one(fleet, "key.revoke")["target"] == created["target"]
    run("signing", "rotate")
    assert one(fleet, "signing.rotate")["actor"] == created["actor"]
