"""Artifact downloads against a real HTTPS server: resume, signed length, sha256, expired URLs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.artifacts import (
    ArtifactIntegrityError,
    ArtifactRefusedError,
    ArtifactTooLargeError,
    ArtifactUnavailableError,
    ArtifactUrlExpiredError,
    InsufficientDiskError,
    ServiceClient,
    check_disk,
    download_file,
)
from device_agent.config import AgentSettings
from device_agent.state import StateDir
from fleet_protocol import FileRole, ManifestFile, ModelRuntime
from fleet_protocol.manifest import key_id_of
from tests.fixtures.model_service import ModelService, ReleaseFile, make_state_dir
from tests.fixtures.pki import FleetPki

SIZE = 3 * 1024 * 1024 + 12345


@pytest.fixture
def service(fleet_pki: FleetPki) -> Iterator[ModelService]:
    with ModelService(fleet_pki) as running:
        yield running


@pytest.fixture
def state(tmp_path: Path, fleet_pki: FleetPki, service: ModelService) -> StateDir:
    return make_state_dir(
        tmp_path / "state", fleet_pki, device_id="dl-device-1", service_url=service.url
    )


def settings(state: StateDir, **overrides: object) -> AgentSettings:
    return AgentSettings(state_dir=state.root, model_retry_max_s=0.2, **overrides)  # type: ignore[arg-type]


def blob_release(service: ModelService, data: bytes) -> ManifestFile:
    assignment = service.publish(
        name="blob",
        version="1",
        release=1,
        runtime=ModelRuntime.ONNX,
        files=[ReleaseFile("weights.onnx", FileRole.WEIGHTS, data)],
    )
    return assignment.manifest.manifest.files[0]


def payload(size: int = SIZE) -> bytes:
    return os.urandom(size)


async def fetch(
    state: StateDir,
    file: ManifestFile,
    partial: Path,
    progress: list[int] | None = None,
    **overrides: object,
) -> None:
    agent_settings = settings(state, **overrides)
    identity = state.load_identity()
    async with ServiceClient.open(identity, state, agent_settings) as client:

        async def url(fresh: bool) -> str:
            return (await client.release_urls("rel-blob-1")).urls[file.name]

        await download_file(
            client.downloads,
            file,
            partial,
            url=url,
            progress=(progress.append if progress is not None else lambda _: None),
            settings=agent_settings,
        )


async def test_a_download_cut_halfway_resumes_with_range_and_fetches_no_byte_twice(
    service: ModelService, state: StateDir, tmp_path: Path
) -> None:
    data = payload()
    file = blob_release(service, data)
    service.cut_after[file.stored_sha256] = SIZE // 2
    partial = tmp_path / "blob.part"
    progress: list[int] = []

    await fetch(state, file, partial, progress)

    assert partial.read_bytes() == data
    assert service.served[file.stored_sha256] == SIZE  # every byte exactly once
    ranged = [r for r in service.requests if r.startswith("GET /blobs/")]
    assert len(ranged) == 2
    assert progress == sorted(progress) and progress[-1] == SIZE


async def test_a_partial_file_left_by_an_earlier_attempt_is_resumed_not_refetched(
    service: ModelService, state: StateDir, tmp_path: Path
) -> None:
    data = payload()
    file = blob_release(service, data)
    service.cut_after[file.stored_sha256] = SIZE // 3
    partial = tmp_path / "blob.part"

    with pytest.raises(ArtifactUnavailableError, match="cut 1 times"):
        await fetch(state, file, partial, download_retries=0)
    assert partial.stat().st_size == SIZE // 3  # kept for the next attempt

    await fetch(state, file, partial)
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == file.stored_sha256
    assert service.served[file.stored_sha256] == SIZE


@pytest.mark.parametrize("announced", [False, True], ids=["unannounced", "content-length"])
async def test_a_body_longer_than_the_signed_size_is_refused_not_truncated(
    service: ModelService, state: StateDir, tmp_path: Path, announced: bool
) -> None:
    data = payload(200_000)
    file = blob_release(service, data)
    service.extra[file.stored_sha256] = b"appended by an attacker"
    service.announce_extra = announced
    partial = tmp_path / "blob.part"

    with pytest.raises(ArtifactTooLargeError, match="more than the signed 200000 bytes"):
        await fetch(state, file, partial)
    assert not partial.exists()


async def test_a_tampered_artifact_fails_its_sha256_and_is_deleted(
    service: ModelService, state: StateDir, tmp_path: Path
) -> None:
    data = payload(300_000)
    file = blob_release(service, data)
    tampered = bytearray(data)
    tampered[1000] ^= 0xFF
    service.blobs[file.stored_sha256] = bytes(tampered)
    partial = tmp_path / "blob.part"

    with pytest.raises(ArtifactIntegrityError, match="tampered with or damaged"):
        await fetch(state, file, partial)
    assert not partial.exists()


async def test_an_expired_url_is_replaced_by_a_fresh_one(
    service: ModelService, state: StateDir, tmp_path: Path
) -> None:
    data = payload(100_000)
    file = blob_release(service, data)
    agent_settings = settings(state)
    asked: list[bool] = []
    async with ServiceClient.open(state.load_identity(), state, agent_settings) as client:

        async def url(fresh: bool) -> str:
            asked.append(fresh)
            if not fresh:
                return f"{service.url}/blobs/{file.stored_sha256}?exp=1"  # long expired
            return (await client.release_urls("rel-blob-1")).urls[file.name]

        await download_file(
            client.downloads,
            file,
            tmp_path / "blob.part",
            url=url,
            progress=lambda _: None,
            settings=agent_settings,
        )
    assert asked == [False, True]
    assert (tmp_path / "blob.part").read_bytes() == data


async def test_urls_that_stay_expired_fail_after_the_bounded_refreshes(
    service: ModelService, state: StateDir, tmp_path: Path
) -> None:
    file = blob_release(service, payload(1000))
    service.expire_all = True

    with pytest.raises(ArtifactUrlExpiredError, match="even after 2 fresh URLs"):
        await fetch(state, file, tmp_path / "blob.part", download_url_refreshes=2)
    urls_asked = [r for r in service.requests if r.endswith("/urls")]
    assert len(urls_asked) == 3  # the first URL and two refreshes


async def test_signing_keys_come_from_the_service_with_the_device_token(
    service: ModelService, state: StateDir
) -> None:
    async with ServiceClient.open(state.load_identity(), state, settings(state)) as client:
        keys = await client.signing_keys()
    assert list(keys) == [key_id_of(service.signer.public_key())]


async def test_a_refused_device_token_is_a_clear_refusal(
    service: ModelService, state: StateDir
) -> None:
    service.token = "another-token"
    async with ServiceClient.open(state.load_identity(), state, settings(state)) as client:
        with pytest.raises(ArtifactRefusedError, match="401: device token not accepted"):
            await client.signing_keys()


async def test_a_server_outside_the_pinned_ca_is_refused(
    other_ca_pki: FleetPki, service: ModelService, tmp_path: Path
) -> None:
    # The device pins another CA than the one that signed the server's certificate.
    state = make_state_dir(
        tmp_path / "other", other_ca_pki, device_id="dl-device-2", service_url=service.url
    )
    async with ServiceClient.open(state.load_identity(), state, settings(state)) as client:
        with pytest.raises(ArtifactRefusedError, match="not signed by the pinned fleet CA"):
            await client.signing_keys()


async def test_an_unreachable_service_is_unavailable_not_refused(
    state: StateDir, service: ModelService
) -> None:
    service.stop()
    async with ServiceClient.open(state.load_identity(), state, settings(state)) as client:
        with pytest.raises(ArtifactUnavailableError, match="cannot reach"):
            await client.signing_keys()


def test_the_disk_check_refuses_a_release_that_does_not_fit(tmp_path: Path) -> None:
    check_disk(tmp_path, 1, what="a tiny release")
    with pytest.raises(InsufficientDiskError, match=r"needs \d+ bytes free"):
        check_disk(tmp_path, 2**62, what="a huge release")
