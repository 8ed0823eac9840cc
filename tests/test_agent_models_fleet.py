"""End to end with the real service: upload, deploy, and a real agent installs and runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
