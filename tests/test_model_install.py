"""The model reconciler in-process: real HTTPS artifact server, real ONNX models in real workers.

Every refusal and failure is checked while an earlier release serves, by running an inference
through the pool after it: the device keeps answering whatever the operator sent it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from device_agent.config import AgentSettings
from device_agent.inference import ModelPool, TensorInput, parse_command_input
from device_agent.model_store import ModelStore
from device_agent.reconcile import ModelReconciler
from device_agent.state import StateDir
from fleet_protocol import (
    FileRole,
    ModelAssignment,
    ModelPhase,
    ModelReport,
    ModelRuntime,
    SignedManifest,
    TargetConstraints,
)
from fleet_protocol.manifest import normalise_architecture
from tests.fixtures.model_service import ModelService, ReleaseFile, make_state_dir
from tests.fixtures.models import build_onnx_classifier, write_corrupt_model, write_labels
from tests.fixtures.pki import FleetPki

NAME = "classifier"
IMAGE = json.dumps([[[[0.5] * 32] * 32] * 3])


@pytest.fixture
def service(fleet_pki: FleetPki) -> Iterator[ModelService]:
    with ModelService(fleet_pki) as running:
        yield running


@pytest.fixture
def state(tmp_path: Path, fleet_pki: FleetPki, service: ModelService) -> StateDir:
    return make_state_dir(
        tmp_path / "state", fleet_pki, device_id="install-device", service_url=service.url
    )


@pytest.fixture
def settings(state: StateDir) -> AgentSettings:
    return AgentSettings(
        state_dir=state.root,
        model_progress_interval_s=0.05,
        model_watch_interval_s=0.2,
        model_retry_min_s=0.1,
        model_retry_max_s=0.5,
    )


class Device:
    """A reconciler with its pool, running, and what it published."""

    def __init__(self, reconciler: ModelReconciler, pool: ModelPool) -> None:
        self.reconciler = reconciler
        self.pool = pool
        self.published = 0
        self._published = asyncio.Event()

    async def publish(self) -> None:
        self.published += 1
        self._published.set()

    async def wait_until(self, condition: Callable[[], bool], limit_s: float = 60.0) -> None:
        """Wait for the reconciler's reports (what it publishes) to satisfy ``condition``."""
        async with asyncio.timeout(limit_s):
            while not condition():
                self._published.clear()
                await self._published.wait()

    async def converge(self, *assignments: ModelAssignment) -> dict[str, ModelReport]:
        """Assign, then wait until every assigned model's report is final."""
        self.reconciler.assign(list(assignments))
        ids = {a.name: a.release_id for a in assignments}

        def done() -> bool:
            reports = self.reconciler.reports()
            return all(
                name in reports and reports[name].release_id == rid and reports[name].phase.is_final
                for name, rid in ids.items()
            )

        await self.wait_until(done)
        return self.reconciler.reports()

    async def classify(self) -> str | None:
        spec = self.pool.spec(NAME)
        assert spec is not None, "nothing serves"
        output = await self.pool.infer(NAME, parse_command_input(spec, IMAGE))
        return output.label

    def serving_release(self) -> int | None:
        spec = self.pool.spec(NAME)
        return None if spec is None else spec.release


@pytest.fixture
async def open_device(
    settings: AgentSettings, state: StateDir
) -> AsyncIterator[Callable[[], Device]]:
    """Opens reconcilers on the state dir; each runs until the test ends."""
    opened: list[tuple[ModelPool, asyncio.Task[None]]] = []

    def open_() -> Device:
        pool = ModelPool(settings.inference)
        reconciler = ModelReconciler(settings, state.load_identity(), state, pool)
        device = Device(reconciler, pool)
        task = asyncio.create_task(reconciler.run(device.publish), name="test-reconciler")
        opened.append((pool, task))
        return device

    yield open_
    for pool, task in opened:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.aclose()


@pytest.fixture
async def device(open_device: Callable[[], Device]) -> Device:
    return open_device()


def onnx_release(
    service: ModelService,
    tmp_path: Path,
    release: int,
    *,
    seed: int | None = None,
    corrupt: bool = False,
    **options: object,
) -> ModelAssignment:
    weights = tmp_path / f"models/r{release}-{seed}-{corrupt}.onnx"
    if corrupt:
        write_corrupt_model(weights, "onnx")
    else:
        build_onnx_classifier(weights, seed=release if seed is None else seed)
    labels = write_labels(tmp_path / "models/labels.txt")
    return service.publish(
        name=NAME,
        version=f"1.{release}",
        release=release,
        runtime=ModelRuntime.ONNX,
        files=[
            ReleaseFile("model.onnx", FileRole.WEIGHTS, weights.read_bytes()),
            ReleaseFile("labels.txt", FileRole.LABELS, labels.read_bytes()),
        ],
        **options,  # type: ignore[arg-type]
    )


async def serving_release_1(device: Device, service: ModelService, tmp_path: Path) -> None:
    reports = await device.converge(onnx_release(service, tmp_path, 1))
    assert reports[NAME].phase is ModelPhase.RUNNING, reports[NAME].detail
    assert device.serving_release() == 1


# --- installing ----------------------------------------------------------------------------------


async def test_a_release_is_downloaded_installed_loaded_and_reported_running(
    device: Device, service: ModelService, tmp_path: Path, state: StateDir
) -> None:
    assignment = onnx_release(service, tmp_path, 1)
    report = (await device.converge(assignment))[NAME]

    assert report.phase is ModelPhase.RUNNING and report.healthy
    assert report.active_release == 1 and report.accepted_release == 1
    assert report.bytes_done == report.bytes_total == assignment.manifest.manifest.stored_bytes
    assert await device.classify() is not None
    store = ModelStore(state.root)
    active = store.active(NAME)
    assert active is not None and active.release == 1 and not active.damaged_files()
    assert store.floor(NAME) == 1
    assert device.published > 0
    assert not list((store.root / "downloads").iterdir())  # partials gone once installed


async def test_an_upgrade_keeps_the_previous_release_and_prunes_older_ones(
    device: Device, service: ModelService, tmp_path: Path, state: StateDir
) -> None:
    await serving_release_1(device, service, tmp_path)
    await device.converge(onnx_release(service, tmp_path, 2))
    store = ModelStore(state.root)
    previous = store.previous(NAME)
    assert device.serving_release() == 2 and previous is not None and previous.release == 1

    report = (await device.converge(onnx_release(service, tmp_path, 3)))[NAME]

    assert report.phase is ModelPhase.RUNNING and report.accepted_release == 3
    releases = sorted(p.name for p in (store.root / NAME / "releases").iterdir())
    assert releases == ["2", "3"]


async def test_an_encrypted_release_is_decrypted_verified_and_runs(
    device: Device, service: ModelService, tmp_path: Path, state: StateDir
) -> None:
    assignment = onnx_release(service, tmp_path, 1, encrypt=True)
    assert assignment.key is not None
    stored = assignment.manifest.manifest.files[0]
    assert stored.stored_sha256 != stored.sha256  # what travels is sealed

    report = (await device.converge(assignment))[NAME]

    assert report.phase is ModelPhase.RUNNING, report.detail
    assert await device.classify() is not None
    active = ModelStore(state.root).active(NAME)
    assert active is not None and not active.damaged_files()  # plaintext sha256 matches


async def test_an_encrypted_release_without_its_key_fails_and_the_old_one_serves(
    device: Device, service: ModelService, tmp_path: Path
) -> None:
    await serving_release_1(device, service, tmp_path)
    keyless = onnx_release(service, tmp_path, 2, encrypt=True).model_copy(update={"key": None})

    report = (await device.converge(keyless))[NAME]

    assert report.phase is ModelPhase.FAILED
    assert report.detail is not None and "carries no key" in report.detail
    assert device.serving_release() == 1 and await device.classify() is not None


async def test_a_key_the_device_does_not_know_is_fetched_from_the_service(
    device: Device, service: ModelService, tmp_path: Path, state: StateDir
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    await serving_release_1(device, service, tmp_path)
    rotated = Ed25519PrivateKey.generate()
    service.extra_keys.append(rotated)

    report = (await device.converge(onnx_release(service, tmp_path, 2, signer=rotated)))[NAME]

    assert report.phase is ModelPhase.RUNNING, report.detail
    assert sum(r.endswith("/signing-keys") for r in service.requests) == 2
    cached = json.loads((state.root / "signing_keys.json").read_text())
    assert len(cached["keys"]) == 2


# --- refusals, each while release 1 keeps serving ---------------------------------------------


def tampered_signature(assignment: ModelAssignment) -> ModelAssignment:
    signed = assignment.manifest
    changed = signed.manifest.model_copy(update={"version": "9.9-evil"})
    return assignment.model_copy(
        update={
            "manifest": SignedManifest(
                manifest=changed, key_id=signed.key_id, signature=signed.signature
            )
        }
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s, t: tampered_signature(onnx_release(s, t, 2)), "manifest refused (signature)"),
        (
            lambda s, t: onnx_release(s, t, 2, expires_in=timedelta(seconds=-1)),
            "manifest refused (expired)",
        ),
        (
            lambda s, t: onnx_release(
                s, t, 2, constraints=TargetConstraints(architectures=["riscv64", "s390x"])
            ),
            "built for riscv64, s390x",
        ),
        (
            lambda s, t: onnx_release(s, t, 2, constraints=TargetConstraints(min_disk_bytes=2**62)),
            "bytes free",
        ),
        (
            lambda s, t: onnx_release(s, t, 2, constraints=TargetConstraints(min_ram_bytes=2**62)),
            "bytes of RAM available",
        ),
    ],
    ids=["bad-signature", "expired", "other-architecture", "too-little-disk", "too-little-ram"],
)
async def test_a_refused_release_never_touches_the_serving_one(
    device: Device,
    service: ModelService,
    tmp_path: Path,
    make: Callable[[ModelService, Path], ModelAssignment],
    reason: str,
) -> None:
    await serving_release_1(device, service, tmp_path)
    before = len([r for r in service.requests if r.startswith("GET /blobs/")])

    report = (await device.converge(make(service, tmp_path)))[NAME]

    assert report.phase is ModelPhase.REFUSED
    assert report.detail is not None and reason in report.detail
    assert report.active_release == 1 and report.accepted_release == 1 and report.healthy
    assert device.serving_release() == 1 and await device.classify() is not None
    # Refused before a byte of it was fetched.
    assert len([r for r in service.requests if r.startswith("GET /blobs/")]) == before


async def test_a_release_below_the_accepted_floor_is_refused_as_a_downgrade(
    device: Device, service: ModelService, tmp_path: Path
) -> None:
    await serving_release_1(device, service, tmp_path)
    await device.converge(onnx_release(service, tmp_path, 2))

    report = (await device.converge(onnx_release(service, tmp_path, 1, release_id="rel-old")))[NAME]

    assert report.phase is ModelPhase.REFUSED
    assert report.detail is not None and report.detail.startswith("downgrade: release 1")
    assert device.serving_release() == 2 and await device.classify() is not None


async def test_a_tampered_artifact_fails_and_the_previous_release_serves(
    device: Device, service: ModelService, tmp_path: Path
) -> None:
    await serving_release_1(device, service, tmp_path)
    assignment = onnx_release(service, tmp_path, 2)
    sha = assignment.manifest.manifest.weights.stored_sha256
    blob = bytearray(service.blobs[sha])
    blob[-1] ^= 0x01
    service.blobs[sha] = bytes(blob)

    report = (await device.converge(assignment))[NAME]

    assert report.phase is ModelPhase.FAILED
    assert report.detail is not None and "tampered with or damaged" in report.detail
    assert device.serving_release() == 1 and await device.classify() is not None


async def test_a_file_longer_than_signed_fails_and_the_previous_release_serves(
    device: Device, service: ModelService, tmp_path: Path
) -> None:
    await serving_release_1(device, service, tmp_path)
    assignment = onnx_release(service, tmp_path, 2)
    service.extra[assignment.manifest.manifest.weights.stored_sha256] = b"\0" * 4096

    report = (await device.converge(assignment))[NAME]

    assert report.phase is ModelPhase.FAILED
    assert report.detail is not None and "more than the signed" in report.detail
    assert device.serving_release() == 1 and await device.classify() is not None


async def test_expired_urls_fail_the_release_and_the_previous_one_serves(
    device: Device, service: ModelService, tmp_path: Path
) -> None:
    await serving_release_1(device, service, tmp_path)
    service.expire_all = True

    report = (await device.converge(onnx_release(service, tmp_path, 2)))[NAME]

    assert report.phase is ModelPhase.FAILED
    assert report.detail is not None and "fresh URLs" in report.detail
    assert device.serving_release() == 1 and await device.classify() is not None


async def test_a_model_that_fails_to_load_rolls_back_and_reports_failed(
    device: Device, service: ModelService, tmp_path: Path, state: StateDir
) -> None:
    await serving_release_1(device, service, tmp_path)

    report = (await device.converge(onnx_release(service, tmp_path, 2, corrupt=True)))[NAME]

    assert report.phase is ModelPhase.FAILED
    assert report.detail is not None and "release 2 did not load" in report.detail
    assert "release 1 (1.1) keeps serving" in report.detail
    assert report.active_release == 1 and report.accepted_release == 1
    assert device.serving_release() == 1 and await device.classify() is not None
    store = ModelStore(state.root)
    active = store.active(NAME)
    assert active is not None and active.release == 1 and store.floor(NAME) == 1
    assert store.installed(NAME, 2) is None  # the failed release is not kept


async def test_a_download_cut_is_retried_and_resumes(
    device: Device, service: ModelService, tmp_path: Path
) -> None:
    assignment = onnx_release(service, tmp_path, 1)
    sha = assignment.manifest.manifest.weights.stored_sha256
    size = assignment.manifest.manifest.weights.stored_size
    service.cut_after[sha] = size // 2

    report = (await device.converge(assignment))[NAME]

    assert report.phase is ModelPhase.RUNNING
    assert service.served[sha] == size


# --- removal and restart --------------------------------------------------------------------------


async def test_a_model_removed_from_desired_is_unloaded_and_deleted_but_its_floor_stays(
    device: Device, service: ModelService, tmp_path: Path, state: StateDir
) -> None:
    await serving_release_1(device, service, tmp_path)

    device.reconciler.assign([])
    await device.wait_until(lambda: device.pool.spec(NAME) is None)

    store = ModelStore(state.root)
    assert store.active(NAME) is None and store.names() == []
    assert store.floor(NAME) == 1
    assert device.reconciler.reports() == {}


async def test_a_restarted_reconciler_serves_the_active_release_before_any_desired_state(
    open_device: Callable[[], Device], service: ModelService, tmp_path: Path
) -> None:
    first = open_device()
    await serving_release_1(first, service, tmp_path)
    await first.pool.aclose()

    second = open_device()
    await second.reconciler.restore()

    assert second.serving_release() == 1 and await second.classify() is not None


def test_architecture_names_are_compared_in_one_spelling() -> None:
    assert normalise_architecture("AMD64") == "x86_64"
    assert normalise_architecture("arm64") == "aarch64"
    assert normalise_architecture("armv7l") == "armv7l"


async def test_tensor_inputs_reach_the_model_as_parsed_tensors(
    device: Device, service: ModelService, tmp_path: Path
) -> None:
    await serving_release_1(device, service, tmp_path)
    spec = device.pool.spec(NAME)
    assert spec is not None
    assert isinstance(parse_command_input(spec, IMAGE), TensorInput)
