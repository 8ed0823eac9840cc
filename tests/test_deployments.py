"""Staged rollouts against the real service and broker, with devices played over raw MQTT so
every report (running, healthy, failed), result and disconnection is under the test's control.
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet_protocol import (
    DeviceState,
    FileRole,
    JoinToken,
    ModelPhase,
    ModelReport,
    ModelRuntime,
    ReportedState,
    ResultMessage,
    ResultSource,
    StatusMessage,
    TargetConstraints,
    TelemetryMessage,
    TopicKind,
)
from fleet_service.artifacts import ReleaseFile, ReleaseSigner, create_release, open_store
from fleet_service.artifacts.releases import signed_manifest_of
from fleet_service.db import session_scope
from fleet_service.tables import ModelRelease
from tests.fixtures.fleet import Fleet, start_fleet, wait_until
from tests.fixtures.raw_device import RawDevice

GIB = 1024**3
# Fast ticks so a test waits milliseconds, not seconds, for the engine.
FAST_ROLLOUT = {"EDGEFLEET_ROLLOUT_TICK_S": "0.2", "EDGEFLEET_DISPATCH_INTERVAL_S": "0.2"}
# How long "nothing was sent" is watched for: several rollout ticks.
QUIET_S = 1.5


@pytest.fixture
def rollout_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    fleet = start_fleet(tmp_path, database_url, extra_env=FAST_ROLLOUT)
    try:
        yield fleet
    finally:
        fleet.close()


# --- helpers shared with the other deployment and results tests ------------------------------


def make_release(
    fleet: Fleet,
    name: str,
    version: str,
    *,
    runtime: ModelRuntime = ModelRuntime.ONNX,
    constraints: TargetConstraints | None = None,
) -> ModelRelease:
    """A signed release stored the way an upload stores it (fresh weights per version)."""
    weights = fleet.tmp / f"{name}-{version}.onnx"
    weights.write_bytes(os.urandom(2048))
    with session_scope(fleet.engine) as session:
        return create_release(
            session,
            open_store(fleet.settings, fleet.home),
            ReleaseSigner.open(fleet.home),
            name=name,
            version=version,
            runtime=runtime,
            files=[ReleaseFile(path=weights, role=FileRole.WEIGHTS)],
            constraints=constraints,
            expires_at=datetime.now(UTC) + timedelta(days=30),
            created_by="test",
        )


def enroll_raw(fleet: Fleet, name: str, token: str | None = None) -> Path:
    """Enroll over REST the way the agent does (a P-256 key made here, a CSR with an empty
    subject) and write the state dir RawDevice reads; no agent process involved."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    registration_key = JoinToken.decode(token or fleet.create_key()["join_token"]).key
    with fleet.anonymous() as client:
        response = client.post(
            "/api/v1/enroll",
            json={
                "registration_key": registration_key,
                "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "hostname": name,
            },
        )
    assert response.status_code == 200, response.text
    enrolled = response.json()
    state_dir = fleet.tmp / "raw" / name
    state_dir.mkdir(parents=True)
    (state_dir / "device.json").write_text(json.dumps({"device_id": enrolled["device_id"]}))
    (state_dir / "ca.crt").write_text(enrolled["ca_certificate_pem"])
    (state_dir / "device.crt").write_text(enrolled["certificate_pem"])
    (state_dir / "device.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return state_dir


def telemetry(**overrides: Any) -> TelemetryMessage:
    """What a healthy x86_64 agent with ONNX Runtime reports."""
    fields: dict[str, Any] = {
        "cpu_percent": 5, "load_1": 0.1, "load_5": 0.1, "load_15": 0.1, "memory_percent": 25,
        "memory_used_bytes": 2 * GIB, "memory_total_bytes": 8 * GIB, "disk_percent": 10,
        "disk_used_bytes": 10 * GIB, "disk_total_bytes": 100 * GIB, "net_bytes_sent": 0,
        "net_bytes_recv": 0, "uptime_s": 100, "agent_version": "raw", "architecture": "x86_64",
        "platform": "test", "memory_available_bytes": 6 * GIB, "runtimes": ["onnx", "gguf"],
    }  # fmt: skip
    fields.update(overrides)
    return TelemetryMessage(**fields)


class Device:
    """A raw MQTT device that can report model phases and publish results."""

    def __init__(
        self,
        fleet: Fleet,
        name: str,
        token: str | None = None,
        *,
        send_telemetry: bool = True,
        **telemetry_fields: Any,
    ) -> None:
        self.fleet = fleet
        self.state_dir = enroll_raw(fleet, name, token)
        self.raw = RawDevice(self.state_dir, fleet.mqtt_port)
        self.id = self.raw.device_id
        self.desired: dict[str, Any] | None = None
        if send_telemetry:
            self.raw.send(TopicKind.TELEMETRY, telemetry(**telemetry_fields))
            wait_until(
                lambda: fleet.device(self.id)["telemetry"] is not None, what="telemetry stored"
            )

    def reconnect(self) -> None:
        self.raw = RawDevice(self.state_dir, self.fleet.mqtt_port)

    def next_desired(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        """The first desired state published from now on that meets ``condition``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{self.id}: no matching desired state within {timeout} s")
            try:
                desired = self.raw.next(TopicKind.DESIRED, remaining)
            except queue.Empty:
                continue
            self.desired = desired
            if condition(desired):
                return desired

    def wait_for_release(self, release_id: str, model: str) -> dict[str, Any]:
        """The desired state once it names ``release_id`` for ``model``."""
        return self.next_desired(lambda d: release_of(d, model) == release_id)

    def assert_nothing_desired(self) -> None:
        with pytest.raises(queue.Empty):
            self.raw.next(TopicKind.DESIRED, QUIET_S)

    def report(
        self,
        release: ModelRelease,
        phase: ModelPhase,
        *,
        healthy: bool = False,
        detail: str | None = None,
    ) -> None:
        """Report ``phase`` for ``release`` against the latest desired generation seen."""
        assert self.desired is not None, "no desired state seen yet"
        report = ModelReport(
            name=release.name,
            release_id=release.id,
            release=release.release,
            version=release.version,
            phase=phase,
            healthy=healthy,
            detail=detail,
        )
        state = ReportedState(
            generation=self.desired["generation"], applied=True, models={release.name: report}
        )
        self.raw.send(TopicKind.REPORTED, state, retain=True)

    def run(self, release: ModelRelease) -> None:
        """Take ``release`` once it is desired and report it running and healthy."""
        self.wait_for_release(release.id, release.name)
        self.report(release, ModelPhase.RUNNING, healthy=True)

    def result(
        self, release: ModelRelease, *, error: str | None = None, **fields: Any
    ) -> ResultMessage:
        """Publish one inference result of ``release``."""
        message = ResultMessage(
            model=release.name,
            version=release.version,
            release=release.release,
            sha256=weights_sha256(release),
            runtime=ModelRuntime(release.runtime),
            source=ResultSource.SCHEDULE,
            latency_ms=fields.pop("latency_ms", 10.0),
            error=error,
            **fields,
        )
        self.raw.send(TopicKind.RESULTS, message, model=release.name)
        return message

    def close(self) -> None:
        self.raw.close()


def weights_sha256(release: ModelRelease) -> str:
    return signed_manifest_of(release).manifest.weights.sha256


def release_of(desired: dict[str, Any], model: str) -> str | None:
    """The release id ``desired`` assigns for ``model``."""
    for assignment in desired.get("models", []):
        if assignment["manifest"]["manifest"]["name"] == model:
            found: str = assignment["release_id"]
            return found
    return None


def deploy(fleet: Fleet, release: ModelRelease, devices: list[Device], **body: Any) -> str:
    response = fleet.api.post(
        "/api/v1/deployments",
        json={"release_id": release.id, "device_ids": [d.id for d in devices], **body},
    )
    assert response.status_code == 201, response.text
    deployment_id: str = response.json()["id"]
    return deployment_id


def deployment(fleet: Fleet, deployment_id: str) -> dict[str, Any]:
    response = fleet.api.get(f"/api/v1/deployments/{deployment_id}")
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


def wait_state(fleet: Fleet, deployment_id: str, state: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (d := deployment(fleet, deployment_id))["state"] == state and d,
        what=f"deployment {state}",
    )
    return found


def target_states(found: dict[str, Any]) -> dict[str, str]:
    return {t["device_id"]: t["state"] for t in found["targets"]}


def install_everywhere(fleet: Fleet, release: ModelRelease, devices: list[Device]) -> None:
    """A completed deployment of ``release`` on ``devices``: the release a later one replaces."""
    deployment_id = deploy(fleet, release, devices, batch_size=len(devices))
    for device in devices:
        device.run(release)
    wait_state(fleet, deployment_id, "completed")


@pytest.fixture
def three(rollout_fleet: Fleet) -> Iterator[list[Device]]:
    devices = [Device(rollout_fleet, f"dev-{n}") for n in range(3)]
    yield devices
    for device in devices:
        device.close()


# --- rollouts ----------------------------------------------------------------------------------


def test_rollout_to_three_devices_sends_batch_two_only_after_batch_one_runs_healthy(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    release = make_release(fleet, "detector", "1.0")
    deployment_id = deploy(fleet, release, three, batch_size=2)
    first, second, third = three

    desired = first.wait_for_release(release.id, "detector")
    assignment = desired["models"][0]
    assert assignment["manifest"] == release.signed_manifest
    assert assignment["key"] is None  # not an encrypted release
    second.wait_for_release(release.id, "detector")
    first.report(release, ModelPhase.RUNNING, healthy=True)
    second.report(release, ModelPhase.LOADING)
    third.assert_nothing_desired()

    second.report(release, ModelPhase.RUNNING, healthy=False)  # up but failing its probe
    third.assert_nothing_desired()
    found = deployment(fleet, deployment_id)
    assert (found["state"], found["current_batch"], found["batch_count"]) == ("running", 1, 2)
    assert "waiting for" in found["detail"] and second.id in found["detail"]

    second.report(release, ModelPhase.RUNNING, healthy=True)
    third.run(release)
    found = wait_state(fleet, deployment_id, "completed")
    assert target_states(found) == {d.id: "running" for d in three}
    assert {t["batch"] for t in found["targets"] if t["device_id"] == third.id} == {2}
    device = fleet.device(third.id)
    assert device["desired_models"] == [
        {"name": "detector", "release_id": release.id, "version": "1.0", "release": 1}
    ]
    assert device["models"]["detector"]["phase"] == "running"


def test_a_failure_beyond_the_ratio_halts_and_rolls_the_device_back_to_a_resigned_release(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    old = make_release(fleet, "detector", "1.0")
    install_everywhere(fleet, old, three)
    new = make_release(fleet, "detector", "2.0")
    deployment_id = deploy(fleet, new, three, batch_size=1, max_failure_ratio=0.0)
    first, second, third = three

    first.wait_for_release(new.id, "detector")
    first.report(new, ModelPhase.FAILED, detail="health check failed: output shape (1, 3)")

    found = wait_state(fleet, deployment_id, "halted")
    assert "1 of 1 device(s) failed" in found["detail"]
    desired = first.next_desired(lambda d: release_of(d, "detector") not in (None, new.id))
    rollback_id = release_of(desired, "detector")
    manifest = desired["models"][0]["manifest"]["manifest"]
    assert manifest["version"] == "1.0"
    assert manifest["release"] > new.release  # passes the device's downgrade floor
    with session_scope(fleet.engine) as session:
        rolled = session.get(ModelRelease, rollback_id)
        assert rolled is not None and rolled.rollback_of == old.id
    states = target_states(deployment(fleet, deployment_id))
    assert states == {first.id: "rolled_back", second.id: "waiting", third.id: "waiting"}
    target = next(t for t in found["targets"] if t["device_id"] == first.id)
    assert "health check failed" in target["detail"]
    second.assert_nothing_desired()
    third.assert_nothing_desired()


def test_failures_within_the_ratio_let_the_rollout_go_on_and_still_roll_the_failed_back(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    release = make_release(fleet, "detector", "1.0")
    deployment_id = deploy(fleet, release, three, batch_size=1, max_failure_ratio=0.5)
    first, second, third = three

    first.run(release)
    second.wait_for_release(release.id, "detector")
    second.report(release, ModelPhase.REFUSED, detail="not enough disk: 1.0 GiB free")
    # No earlier release: the model is taken out of the failed device's desired state.
    second.next_desired(lambda d: release_of(d, "detector") is None)
    third.run(release)

    found = wait_state(fleet, deployment_id, "completed")
    assert target_states(found) == {
        first.id: "running",
        second.id: "rolled_back",
        third.id: "running",
    }


def test_rolling_back_a_redeploy_of_the_running_release_leaves_the_device_on_it(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    release = make_release(fleet, "detector", "1.0")
    first = three[0]
    install_everywhere(fleet, release, [first])
    # The same release again (an operator adding schedules, say), then rolled back.
    again = deploy(fleet, release, [first], batch_size=1)
    first.next_desired(lambda d: release_of(d, "detector") == release.id)
    answer = fleet.api.post(f"/api/v1/deployments/{again}/rollback")
    assert answer.status_code == 200, answer.text
    found = wait_state(fleet, again, "rolled_back")
    (target,) = found["targets"]
    assert target["state"] == "rolled_back"
    assert "it ran this release before the deployment" in target["detail"]
    desired = fleet.device(first.id)["desired_models"]
    assert [m["release_id"] for m in desired] == [release.id], "the model stays"


def test_canary_gate_halts_on_a_worse_error_rate_and_rolls_batch_one_back(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    old = make_release(fleet, "detector", "1.0")
    install_everywhere(fleet, old, three)
    first, second, _ = three
    for _ in range(5):
        second.result(old, label="cat", confidence=0.9)
    new = make_release(fleet, "detector", "2.0")
    canary = {"metric": "error_rate", "margin": 0.1, "min_results": 5}
    deployment_id = deploy(fleet, new, three, batch_size=1, canary=canary)

    first.run(new)
    wait_until(
        lambda: "canary: waiting" in (deployment(fleet, deployment_id)["detail"] or ""),
        what="the gate waiting for results",
    )
    for n in range(5):
        first.result(new, error="worker crashed" if n < 3 else None, label="cat")

    found = wait_state(fleet, deployment_id, "halted")
    assert found["canary"]["verdict"] == "failed"
    assert found["canary"]["candidate"] == pytest.approx(0.6)
    assert found["canary"]["baseline"] == 0.0
    assert "canary failed" in found["detail"]
    desired = first.next_desired(lambda d: release_of(d, "detector") not in (None, new.id))
    assert desired["models"][0]["manifest"]["manifest"]["version"] == "1.0"
    assert target_states(found)[first.id] == "rolled_back"
    second.assert_nothing_desired()


def test_canary_gate_passes_on_an_equal_error_rate_and_the_rollout_goes_on(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    old = make_release(fleet, "detector", "1.0")
    install_everywhere(fleet, old, three[:2])
    first, second, _ = three
    for n in range(5):
        second.result(old, error="timeout" if n == 0 else None, label="cat")
    new = make_release(fleet, "detector", "2.0")
    canary = {"metric": "error_rate", "margin": 0.0, "min_results": 5}
    deployment_id = deploy(fleet, new, three[:2], batch_size=1, canary=canary)

    first.run(new)
    for n in range(5):
        first.result(new, error="timeout" if n == 0 else None, label="cat")
    second.run(new)

    found = wait_state(fleet, deployment_id, "completed")
    assert found["canary"]["verdict"] == "passed"
    assert found["canary"]["candidate"] == pytest.approx(0.2)
    assert found["canary"]["baseline"] == pytest.approx(0.2)


def test_pause_holds_the_next_batch_and_resume_sends_it(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    release = make_release(fleet, "detector", "1.0")
    first, second, _ = three
    deployment_id = deploy(fleet, release, three[:2], batch_size=1)
    first.wait_for_release(release.id, "detector")

    paused = fleet.api.post(f"/api/v1/deployments/{deployment_id}/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    again = fleet.api.post(f"/api/v1/deployments/{deployment_id}/pause")
    assert again.status_code == 409
    assert "only a running one" in again.json()["detail"]
    first.report(release, ModelPhase.RUNNING, healthy=True)
    wait_until(
        lambda: target_states(deployment(fleet, deployment_id))[first.id] == "running",
        what="reports still followed while paused",
    )
    second.assert_nothing_desired()
    assert deployment(fleet, deployment_id)["state"] == "paused"

    resumed = fleet.api.post(f"/api/v1/deployments/{deployment_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    assert fleet.api.post(f"/api/v1/deployments/{deployment_id}/resume").status_code == 409
    second.run(release)
    wait_state(fleet, deployment_id, "completed")


def test_operator_rollback_sends_every_device_back_to_its_previous_release(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    old = make_release(fleet, "detector", "1.0")
    install_everywhere(fleet, old, three[:2])
    new = make_release(fleet, "detector", "2.0")
    deployment_id = deploy(fleet, new, three[:2], batch_size=2)
    for device in three[:2]:
        device.run(new)
    wait_state(fleet, deployment_id, "completed")

    response = fleet.api.post(f"/api/v1/deployments/{deployment_id}/rollback")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "rolled_back"
    assert set(target_states(response.json()).values()) == {"rolled_back"}
    back = {
        release_of(
            d.next_desired(lambda x: release_of(x, "detector") not in (None, new.id)), "detector"
        )
        for d in three[:2]
    }
    assert len(back) == 1  # one re-signing of 1.0 serves every device
    with session_scope(fleet.engine) as session:
        rolled = session.get(ModelRelease, back.pop())
        assert rolled is not None
        assert (rolled.rollback_of, rolled.version) == (old.id, "1.0")
        assert rolled.release > new.release
    again = fleet.api.post(f"/api/v1/deployments/{deployment_id}/rollback")
    assert again.status_code == 409


def test_an_offline_device_converges_from_its_retained_desired_state_when_it_returns(
    rollout_fleet: Fleet,
) -> None:
    fleet = rollout_fleet
    device = Device(fleet, "sleeper")
    # What the broker publishes for the agent's Last Will when its link drops.
    offline = StatusMessage(state=DeviceState.OFFLINE, agent_version="raw")
    device.raw.send(TopicKind.STATUS, offline, retain=True)
    device.raw.close()
    wait_until(lambda: fleet.device(device.id)["status"] == "offline", what="offline")
    release = make_release(fleet, "detector", "1.0")
    deployment_id = deploy(fleet, release, [device])
    wait_until(
        lambda: f"{device.id} (offline" in (deployment(fleet, deployment_id)["detail"] or ""),
        what="the batch waiting for the offline device",
    )

    device.reconnect()
    device.run(release)

    found = wait_state(fleet, deployment_id, "completed")
    assert target_states(found) == {device.id: "running"}
    device.close()


def test_a_new_deployment_of_the_model_supersedes_a_running_one_on_shared_devices(
    rollout_fleet: Fleet, three: list[Device]
) -> None:
    fleet = rollout_fleet
    first_release = make_release(fleet, "detector", "1.0")
    older = deploy(fleet, first_release, three, batch_size=1)
    three[0].wait_for_release(first_release.id, "detector")
    newer_release = make_release(fleet, "detector", "2.0")
    newer = deploy(fleet, newer_release, three[:1])

    found = deployment(fleet, older)
    assert found["state"] == "halted"
    assert f"superseded by {newer}" in found["detail"]
    three[0].run(newer_release)
    wait_state(fleet, newer, "completed")
    three[1].assert_nothing_desired()
