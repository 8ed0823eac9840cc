"""Deployment requests the service refuses, the compatibility preview, and the CLI, against the
real service with devices played over raw MQTT."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_protocol import ModelPhase, TargetConstraints
from fleet_service.tables import ModelRelease
from tests.fixtures.fleet import Fleet, _postgres_database, start_fleet, wait_until
from tests.test_deployments import (
    FAST_ROLLOUT,
    GIB,
    Device,
    deployment,
    make_release,
    release_of,
    target_states,
    wait_state,
)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shared_fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """One fleet for the refusal tests: none of them changes anything."""
    databases = iter([None]) if request.param == "sqlite" else _postgres_database()
    database_url = next(databases)
    fleet = start_fleet(tmp_path_factory.mktemp("deployments-api"), database_url)
    try:
        yield fleet
    finally:
        fleet.close()
        for _ in databases:  # drops the PostgreSQL database
            pass


@pytest.fixture(scope="module")
def ready(shared_fleet: Fleet) -> Iterator[tuple[Fleet, Device, ModelRelease]]:
    device = Device(shared_fleet, "ready")
    release = make_release(shared_fleet, "detector", "1.0")
    yield shared_fleet, device, release
    device.close()


def body(release: ModelRelease, device: Device, **changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"release_id": release.id, "device_ids": [device.id]}
    request.update(changes)
    return {k: v for k, v in request.items() if v is not None}


BAD_REQUESTS = [
    pytest.param({"release_id": "rel-doesnotexist"}, 404, "does not exist", id="unknown-release"),
    pytest.param(
        {"device_ids": ["dev-000000000000"]},
        404,
        "not enrolled: dev-000000000000",
        id="unknown-device",
    ),
    pytest.param({"tag": "site=lab"}, 422, "exactly one of device_ids and tag", id="ids-and-tag"),
    pytest.param({"device_ids": None}, 422, "exactly one of device_ids and tag", id="no-targets"),
    pytest.param({"device_ids": []}, 422, "device_ids", id="empty-device-list"),
    pytest.param({"device_ids": None, "tag": "nothing"}, 422, "tag", id="tag-without-equals"),
    pytest.param(
        {"device_ids": None, "tag": "site=mars"}, 404, "no device carries the tag", id="no-tagged"
    ),
    pytest.param({"max_failure_ratio": 1.5}, 422, "max_failure_ratio", id="ratio-above-one"),
    pytest.param({"max_failure_ratio": -0.1}, 422, "max_failure_ratio", id="ratio-below-zero"),
    pytest.param({"batch_size": 0}, 422, "batch_size", id="batch-size-zero"),
    pytest.param({"pause_s": -1}, 422, "pause_s", id="negative-pause"),
    pytest.param(
        {"canary": {"metric": "accuracy", "margin": 0.1}}, 422, "canary.metric", id="canary-metric"
    ),
    pytest.param(
        {"canary": {"metric": "error_rate", "margin": -1}}, 422, "canary.margin", id="canary-margin"
    ),
    pytest.param(
        {"canary": {"metric": "error_rate", "margin": 0.1}},
        422,
        "no device of the first batch runs detector yet",
        id="canary-without-a-release-to-compare",
    ),
    pytest.param(
        {"schedules": [{"source": "file", "interval_s": 5}]}, 422, "needs a path", id="schedule"
    ),
    pytest.param({"surprise": True}, 422, "surprise", id="unknown-field"),
]


@pytest.mark.parametrize(("changes", "status", "detail"), BAD_REQUESTS)
def test_bad_deployment_requests_are_refused_with_a_problem_that_names_the_fix(
    ready: tuple[Fleet, Device, ModelRelease], changes: dict[str, Any], status: int, detail: str
) -> None:
    fleet, device, release = ready
    for path in ("/api/v1/deployments/preview", "/api/v1/deployments"):
        response = fleet.api.post(path, json=body(release, device, **changes))
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert detail in response.json()["detail"]
    assert fleet.api.get("/api/v1/deployments").json() == []


@pytest.mark.parametrize("action", ["pause", "resume", "rollback"])
def test_actions_on_an_unknown_deployment_are_404(
    ready: tuple[Fleet, Device, ModelRelease], action: str
) -> None:
    fleet, _, _ = ready
    response = fleet.api.post(f"/api/v1/deployments/dep-nope/{action}")
    assert response.status_code == 404
    assert "dep-nope" in response.json()["detail"]
    assert fleet.api.get("/api/v1/deployments/dep-nope").status_code == 404


def test_deployments_need_an_operator_login(ready: tuple[Fleet, Device, ModelRelease]) -> None:
    fleet, device, release = ready
    with fleet.anonymous() as client:
        assert client.post("/api/v1/deployments", json=body(release, device)).status_code == 401
        assert client.get("/api/v1/results").status_code == 401


# --- compatibility -------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path: Path, database_url: str | None) -> Iterator[tuple[Fleet, dict[str, Device]]]:
    fleet = start_fleet(tmp_path, database_url, extra_env=FAST_ROLLOUT)
    token = fleet.create_key(max_uses=5, tags={"site": "lab"})["join_token"]
    devices = {
        "ok": Device(fleet, "ok", token),
        "arm": Device(fleet, "arm", token, architecture="armv7l"),
        "no-onnx": Device(fleet, "no-onnx", token, runtimes=["gguf"]),
        "small": Device(fleet, "small", token, memory_available_bytes=int(1.1 * GIB)),
        "silent": Device(fleet, "silent", token, send_telemetry=False),
    }
    try:
        yield fleet, devices
    finally:
        for device in devices.values():
            device.close()
        fleet.close()


def test_preview_names_incompatible_devices_with_reasons_and_they_are_never_sent_anything(
    mixed: tuple[Fleet, dict[str, Device]],
) -> None:
    fleet, devices = mixed
    release = make_release(
        fleet,
        "detector",
        "1.0",
        constraints=TargetConstraints(architectures=["aarch64", "x86_64"], min_ram_bytes=2 * GIB),
    )
    request = {"release_id": release.id, "tag": "site=lab", "batch_size": 5}

    preview = fleet.api.post("/api/v1/deployments/preview", json=request)
    assert preview.status_code == 200, preview.text
    assert preview.json()["compatible"] == [devices["ok"].id]
    reasons = {i["device_id"]: i["reasons"] for i in preview.json()["incompatible"]}
    assert reasons == {
        devices["arm"].id: ["architecture armv7l is not in [aarch64, x86_64]"],
        devices["no-onnx"].id: [
            "runtime onnx is not installed (the agent reports: gguf); install edgefleet[onnx] "
            "on the device"
        ],
        devices["small"].id: ["needs 2.0 GiB RAM, 1.1 GiB available"],
        devices["silent"].id: ["no telemetry yet: start the agent and wait one telemetry interval"],
    }
    assert fleet.api.get("/api/v1/deployments").json() == []  # a preview stores nothing

    created = fleet.api.post("/api/v1/deployments", json=request)
    assert created.status_code == 201, created.text
    targets = {t["device_id"]: t for t in created.json()["targets"]}
    for name in ("arm", "no-onnx", "small", "silent"):
        target = targets[devices[name].id]
        assert (target["state"], target["batch"]) == ("incompatible", 0)
        assert target["detail"] == "; ".join(reasons[devices[name].id])
    devices["ok"].wait_for_release(release.id, "detector")
    for name in ("arm", "no-onnx", "small", "silent"):
        devices[name].assert_nothing_desired()


def test_a_deployment_no_target_can_take_is_refused_and_not_stored(
    mixed: tuple[Fleet, dict[str, Device]],
) -> None:
    fleet, devices = mixed
    release = make_release(
        fleet, "detector", "1.0", constraints=TargetConstraints(architectures=["riscv64"])
    )
    response = fleet.api.post(
        "/api/v1/deployments",
        json={"release_id": release.id, "device_ids": [devices["ok"].id, devices["arm"].id]},
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "no target can take detector 1.0" in detail
    assert f"{devices['ok'].id}: architecture x86_64 is not in [riscv64]" in detail
    assert fleet.api.get("/api/v1/deployments").json() == []


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def cli_fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = start_fleet(tmp_path, None, extra_env=FAST_ROLLOUT)
    try:
        yield fleet
    finally:
        fleet.close()


def run_cli(fleet: Fleet, *args: str) -> tuple[int, str, str]:
    process = fleet.cli(*args)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


def test_cli_deploys_follows_pauses_resumes_and_rolls_back(cli_fleet: Fleet) -> None:
    fleet = cli_fleet
    device = Device(fleet, "cli-target")
    release = make_release(fleet, "detector", "1.0")

    code, out, err = run_cli(fleet, "deploy", release.id, "--device", device.id, "--no-wait")
    assert code == 0, err
    deployment_id = out.split()[0]
    assert deployment_id.startswith("dep-") and "detector 1.0" in out
    device.wait_for_release(release.id, "detector")  # the running service picked it up

    code, out, err = run_cli(fleet, "deployments", "pause", deployment_id)
    assert (code, "paused" in out) == (0, True), err
    code, _, err = run_cli(fleet, "deployments", "pause", deployment_id)
    assert code == 1 and "only a running one can be paused" in err
    code, out, err = run_cli(fleet, "deployments", "resume", deployment_id)
    assert (code, "running" in out) == (0, True), err
    device.report(release, ModelPhase.RUNNING, healthy=True)
    wait_state(fleet, deployment_id, "completed")
    code, out, _ = run_cli(fleet, "deployments", "list")
    assert deployment_id in out and "completed" in out
    code, out, _ = run_cli(fleet, "deployments", "show", deployment_id)
    assert f"batch 1  {device.id}  running [running]" in out

    code, out, err = run_cli(fleet, "deployments", "rollback", deployment_id)
    assert code == 0, err
    assert "rolled_back" in out
    # No earlier release: the CLI's change reaches the device through the running service.
    device.next_desired(lambda d: release_of(d, "detector") is None)
    assert target_states(deployment(fleet, deployment_id)) == {device.id: "rolled_back"}

    device.result(release, label="cat", confidence=0.75)
    wait_until(lambda: run_cli(fleet, "results", "list")[1].strip(), what="a result listed")
    code, out, _ = run_cli(fleet, "results", "summary", "--model", "detector")
    assert "detector 1.0: 1 results, 0 errors (0.0%)" in out and "confidence 0.75" in out
    device.close()


def test_cli_deploy_waits_for_the_rollout_and_shows_its_end(cli_fleet: Fleet) -> None:
    fleet = cli_fleet
    device = Device(fleet, "follower")
    release = make_release(fleet, "detector", "1.0")
    process = fleet.cli("deploy", release.id, "--device", device.id)
    device.run(release)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "completed: 1 device(s) run detector 1.0" in out
    device.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "dev-x", "--tag", "a=b"], "--device (repeatable) or with --tag"),
        ([], "--device (repeatable) or with --tag"),
        (["--device", "dev-x", "--canary", "bogus"], "metric:margin"),
        (["--device", "dev-x", "--canary", "accuracy:0.1"], "metric"),
        (["--device", "dev-x", "--max-failure-ratio", "2"], "max-failure-ratio"),
        (["--device", "dev-x", "--batch-size", "0"], "batch-size"),
    ],
)
def test_cli_deploy_refuses_bad_options_before_touching_the_fleet(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleet_service", "deploy", "rel-x", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "EDGEFLEET_HOME": str(tmp_path / "no-fleet")},
    )
    assert result.returncode == 2
    assert message in result.stderr
