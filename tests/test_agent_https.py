"""The HTTPS fallback for agents without MQTT: same validation, same storage, same receipts."""

from __future__ import annotations

import json
from pathlib import Path

from fleet_protocol import AckMessage, AckStatus, LogLevel, LogMessage
from tests.fixtures.fleet import Fleet


def device_headers(state_dir: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {(state_dir / 'device_token').read_text().strip()}"}


def test_agent_polls_commands_and_posts_acks_and_logs_over_https(fleet: Fleet) -> None:
    state_dir = fleet.enroll("proxied")
    device_id = json.loads((state_dir / "device.json").read_text())["device_id"]
    headers = device_headers(state_dir)
    created = fleet.api.post(f"/api/v1/devices/{device_id}/commands", json={"type": "ping"}).json()

    with fleet.anonymous() as client:
        polled = client.get("/api/v1/agent/commands", headers=headers).json()
        assert [c["id"] for c in polled] == [created["id"]]
        ack = AckMessage(command_id=created["id"], status=AckStatus.SUCCEEDED, result={"ok": 1})
        log = LogMessage(level=LogLevel.ERROR, logger="agent", message="mqtt blocked")
        body = {
            "messages": [
                {"kind": "acks", "payload": ack.model_dump(mode="json")},
                {"kind": "logs", "payload": log.model_dump(mode="json")},
                {"kind": "telemetry", "payload": {"cpu_percent": 900}},
            ]
        }
        receipt = client.post("/api/v1/agent/messages", json=body, headers=headers).json()
        assert set(receipt["stored"]) == {ack.message_id, log.message_id}
        assert [r["index"] for r in receipt["rejected"]] == [2]
        assert "cpu_percent" in receipt["rejected"][0]["reason"]

        again = client.post("/api/v1/agent/messages", json=body, headers=headers).json()
        assert set(again["stored"]) == {ack.message_id, log.message_id}, "replays receipted"

    final = fleet.api.get(f"/api/v1/commands/{created['id']}").json()
    assert (final["status"], final["result"]) == ("succeeded", {"ok": 1})
    logs = fleet.api.get(f"/api/v1/devices/{device_id}/logs").json()
    assert [entry["message"] for entry in logs] == ["mqtt blocked"]
    with fleet.anonymous() as client:
        desired = client.get("/api/v1/agent/desired", headers=headers).json()
    assert desired["generation"] == 0


def test_agent_routes_need_a_device_token_not_an_operator_token(fleet: Fleet) -> None:
    operator = fleet.api.headers["Authorization"]
    with fleet.anonymous() as client:
        for headers in ({}, {"Authorization": "Bearer efd_forged"}, {"Authorization": operator}):
            response = client.get("/api/v1/agent/commands", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["content-type"] == "application/problem+json"
