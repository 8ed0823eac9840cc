"""End to end with the real service: upload, deploy, and a real agent installs and runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tests.fixtures.fleet import Fleet, wait_until
from tests.fixtures.models import build_onnx_classifier, write_labels


def upload(
    fleet: Fleet, tmp_path: Path, version: str, *, encrypt: bool, seed: int
) -> dict[str, Any]:
    weights = build_onnx_classifier(tmp_path / f"model-{version}.onnx", seed=seed)
    labels = write_labels(tmp_path / "labels.txt")
    with weights.open("rb") as w, labels.open("rb") as lab:
        response = fleet.api.post(
            "/api/v1/models",
            data={
                "name": "classifier",
                "version": version,
                "runtime": "onnx",
                "encrypt": str(encrypt).lower(),
            },
            files={"weights": ("model.onnx", w), "labels": ("labels.txt", lab)},
        )
    assert response.status_code == 201, response.text
    release: dict[str, Any] = response.json()
    return release


def deploy(fleet: Fleet, release_id: str, device_id: str) -> dict[str, Any]:
    response = fleet.api.post(
        "/api/v1/deployments", json={"release_id": release_id, "device_ids": [device_id]}
    )
    assert response.status_code == 201, response.text
    deployment: dict[str, Any] = response.json()
    return deployment


def model_report(fleet: Fleet, device_id: str) -> dict[str, Any] | None:
    report: dict[str, Any] | None = fleet.device(device_id).get("models", {}).get("classifier")
    return report


def test_a_deployed_encrypted_release_is_installed_and_an_upgrade_replaces_it(
    sqlite_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = sqlite_fleet
    state_dir = fleet.enroll("models-e2e")
    agent = fleet.start_agent(state_dir, extra_env={"EDGEFLEET_AGENT_LOCAL_API__PORT": "0"})

    first = upload(fleet, tmp_path, "1.0", encrypt=True, seed=1)

    def compatible() -> bool:
        # The service checks constraints against the device's telemetry (runtimes, memory).
        response = fleet.api.post(
            "/api/v1/deployments/preview",
            json={"release_id": first["id"], "device_ids": [agent.device_id]},
        )
        return response.status_code == 200 and response.json()["compatible"] == [agent.device_id]

    wait_until(compatible, 30, 0.5, "the device's telemetry to show it can take the model")
    deploy(fleet, first["id"], agent.device_id)

    def running(release: int) -> bool:
        report = model_report(fleet, agent.device_id)
        return bool(
            report
            and report["release"] == release
            and report["phase"] == "running"
            and report["healthy"]
        )

    wait_until(lambda: running(first["release"]), 90, 0.5, "release 1 running on the device")

    second = upload(fleet, tmp_path, "2.0", encrypt=False, seed=2)
    deploy(fleet, second["id"], agent.device_id)
    wait_until(lambda: running(second["release"]), 90, 0.5, "release 2 running on the device")
    report = model_report(fleet, agent.device_id)
    assert report is not None and report["accepted_release"] == second["release"]


def deployment_state(fleet: Fleet, deployment_id: str) -> dict[str, Any]:
    response = fleet.api.get(f"/api/v1/deployments/{deployment_id}")
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def test_three_agents_take_a_release_in_two_batches_and_a_broken_upgrade_halts_and_rolls_back(
    sqlite_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = sqlite_fleet
    agents = [fleet.start_agent(fleet.enroll(f"batch-{n}")) for n in range(3)]
    ids = [agent.device_id for agent in agents]
    good = upload(fleet, tmp_path, "1.0", encrypt=False, seed=1)

    def all_compatible() -> bool:
        response = fleet.api.post(
            "/api/v1/deployments/preview", json={"release_id": good["id"], "device_ids": ids}
        )
        return response.status_code == 200 and sorted(response.json()["compatible"]) == sorted(ids)

    wait_until(all_compatible, 30, 0.5, "all three devices' telemetry")
    created = fleet.api.post(
        "/api/v1/deployments",
        json={"release_id": good["id"], "device_ids": ids, "batch_size": 2, "pause_s": 0},
    )
    assert created.status_code == 201, created.text
    deployment_id = created.json()["id"]

    # Batch 2 (the third device) is sent only once batch 1 runs healthy on both of its devices.
    seen_states: list[dict[str, str]] = []

    def completed() -> bool:
        state = deployment_state(fleet, deployment_id)
        by_device = {t["device_id"]: t["state"] for t in state["targets"]}
        seen_states.append(by_device)
        return bool(state["state"] == "completed")

    wait_until(completed, 120, 0.2, "the rollout to complete")
    for by_device in seen_states:
        if by_device[ids[2]] != "waiting":
            assert by_device[ids[0]] == by_device[ids[1]] == "running", by_device
    assert any(s[ids[2]] == "waiting" for s in seen_states), "batch 2 never waited"
    for device_id in ids:
        report = model_report(fleet, device_id)
        assert report is not None and report["phase"] == "running" and report["healthy"]

    # An upgrade whose weights do not load: the first device fails it, the rollout halts before
    # the others are sent anything, and that device is put back on 1.0 (re-signed, higher number).
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model" * 100)
    with broken.open("rb") as weights:
        answer = fleet.api.post(
            "/api/v1/models",
            data={"name": "classifier", "version": "2.0-broken", "runtime": "onnx"},
            files={"weights": ("model.onnx", weights)},
        )
    assert answer.status_code == 201, answer.text
    upgrade = fleet.api.post(
        "/api/v1/deployments",
        json={"release_id": answer.json()["id"], "device_ids": ids, "batch_size": 1},
    )
    assert upgrade.status_code == 201, upgrade.text
    upgrade_id = upgrade.json()["id"]
    wait_until(
        lambda: deployment_state(fleet, upgrade_id)["state"] == "halted",
        120,
        0.3,
        "the broken upgrade to halt",
    )
    targets = {t["device_id"]: t["state"] for t in deployment_state(fleet, upgrade_id)["targets"]}
    assert targets == {ids[0]: "rolled_back", ids[1]: "waiting", ids[2]: "waiting"}

    def back_on_good_version() -> bool:
        report = model_report(fleet, ids[0])
        return bool(
            report
            and report["phase"] == "running"
            and report["version"] == "1.0"
            and report["release"] > answer.json()["release"]
        )

    wait_until(back_on_good_version, 90, 0.3, "the failed device to run 1.0 again, re-signed")

    # Every device still answers, on 1.0, and each result is stored once.
    image = json.dumps(np.zeros((1, 3, 32, 32), dtype=np.float32).tolist())
    commands = [
        fleet.api.post(
            f"/api/v1/devices/{device_id}/commands",
            json={"type": "infer", "params": {"model": "classifier", "input": image}},
        ).json()["id"]
        for device_id in ids
    ]

    def all_succeeded() -> bool:
        statuses = [fleet.api.get(f"/api/v1/commands/{c}").json()["status"] for c in commands]
        assert "failed" not in statuses, statuses
        return statuses == ["succeeded"] * len(commands)

    wait_until(all_succeeded, 30, 0.2, "the infer commands on every device")
    for device_id in ids:
        results = fleet.api.get("/api/v1/results", params={"device_id": device_id}).json()
        assert [r["version"] for r in results] == ["1.0"], results
