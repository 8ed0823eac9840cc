"""Model releases and artifact downloads over the real service: upload, list, signed URLs, CLI."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session

from fleet_protocol.manifest import SignedManifest, public_key_from_text, verify_manifest
from fleet_protocol.sealing import Unsealer
from fleet_service.artifacts import UrlSigner
from fleet_service.tables import Device, ModelRelease
from tests.fixtures.fleet import Fleet, start_fleet

LIMIT = 2 * 1024 * 1024  # max_artifact_bytes of these fleets: small, so 413 is cheap to reach


@pytest.fixture
def models_fleet(tmp_path: Path, database_url: str | None) -> Iterator[Fleet]:
    """A running fleet (SQLite and PostgreSQL) with a 2 MiB upload limit."""
    fleet = start_fleet(
        tmp_path, database_url, extra_env={"EDGEFLEET_MAX_ARTIFACT_BYTES": str(LIMIT)}
    )
    try:
        yield fleet
    finally:
        fleet.close()


def _bytes(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 256 for i in range(size))


def upload(
    client: httpx.Client,
    weights: bytes | None = b"onnx weights",
    *,
    labels: bytes | None = None,
    **fields: Any,
) -> httpx.Response:
    data = {"name": "detector", "version": "1.0", "runtime": "onnx", **fields}
    files: dict[str, tuple[str, bytes, str]] = {}
    if weights is not None:
        files["weights"] = ("model.onnx", weights, "application/octet-stream")
    if labels is not None:
        files["labels"] = ("labels.txt", labels, "text/plain")
    return client.post(
        "/api/v1/models", data={k: str(v) for k, v in data.items()}, files=files, timeout=60
    )


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def enrolled(fleet: Fleet, name: str) -> tuple[str, dict[str, str]]:
    """A device enrolled over the real enrollment route (CSR made here, as an agent would):
    its id and its bearer header."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    body = {
        "registration_key": fleet.create_key()["key"],
        "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "hostname": name,
    }
    with fleet.anonymous() as client:
        response = client.post("/api/v1/enroll", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer["device_id"], {"Authorization": f"Bearer {answer['device_token']}"}


def assign(fleet: Fleet, device_id: str, release_id: str) -> None:
    """Put a release in a device's desired models, as a deployment would."""
    with Session(fleet.engine) as session:
        release = session.get(ModelRelease, release_id)
        device = session.get(Device, device_id)
        assert release is not None and device is not None
        device.desired_models = [
            *device.desired_models,
            {
                "release_id": release.id,
                "manifest": release.signed_manifest,
                "key": release.encryption_key,
                "schedules": [],
            },
        ]
        session.add(device)
        session.commit()


def release_urls(client: httpx.Client, release_id: str, headers: dict[str, str]) -> dict[str, str]:
    response = client.get(f"/api/v1/agent/releases/{release_id}/urls", headers=headers)
    assert response.status_code == 200, response.text
    urls: dict[str, str] = response.json()["urls"]
    return urls


def test_upload_list_and_get_a_release_over_rest(models_fleet: Fleet) -> None:
    fleet = models_fleet
    weights = _bytes(300_000)
    first = created(
        upload(
            fleet.api,
            weights,
            labels=b"cat\ndog\n",
            architectures="x86_64, AARCH64",
            min_ram_bytes=1000,
            min_disk_bytes=2000,
            expires_in_days=30,
        )
    )
    assert first["name"] == "detector" and first["version"] == "1.0"
    assert first["runtime"] == "onnx" and first["release"] == 1 and not first["encrypted"]
    assert first["files"] == [
        {
            "name": "model.onnx",
            "role": "weights",
            "sha256": hashlib.sha256(weights).hexdigest(),
            "size": len(weights),
        },
        {
            "name": "labels.txt",
            "role": "labels",
            "sha256": hashlib.sha256(b"cat\ndog\n").hexdigest(),
            "size": 8,
        },
    ]
    assert first["constraints"] == {
        "architectures": ["x86_64", "aarch64"],
        "min_ram_bytes": 1000,
        "min_disk_bytes": 2000,
    }
    assert first["stored_bytes"] == len(weights) + 8
    assert first["created_by"] == "admin" and first["rollback_of"] is None
    lifetime = datetime.fromisoformat(first["expires_at"]) - datetime.fromisoformat(
        first["created_at"]
    )
    assert lifetime == timedelta(days=30)

    second = created(upload(fleet.api, weights, version="1.1"))
    other = created(upload(fleet.api, b"other", name="classifier"))
    assert (second["release"], other["release"]) == (2, 1)

    listed = fleet.api.get("/api/v1/models").json()
    assert [r["id"] for r in listed] == [other["id"], second["id"], first["id"]]
    only = fleet.api.get("/api/v1/models", params={"name": "detector"}).json()
    assert [r["release"] for r in only] == [2, 1]
    assert fleet.api.get(f"/api/v1/models/{first['id']}").json() == first
    missing = fleet.api.get("/api/v1/models/rel-nothing")
    assert missing.status_code == 404 and "rel-nothing" in missing.json()["detail"]
    with Session(fleet.engine) as session:
        row = session.get(ModelRelease, first["id"])
        assert row is not None
        signed = SignedManifest.model_validate(row.signed_manifest)
    assert signed.key_id == first["key_id"] and signed.manifest.release == 1


def test_concurrent_uploads_of_one_name_get_distinct_release_numbers(models_fleet: Fleet) -> None:
    fleet = models_fleet
    token = fleet.api.headers["Authorization"]
    results: list[httpx.Response] = []
    barrier = threading.Barrier(4)

    def one(index: int) -> None:
        with fleet.anonymous() as client:
            client.headers["Authorization"] = token
            barrier.wait()
            results.append(upload(client, _bytes(50_000, index), version=f"1.{index}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert sorted(created(r)["release"] for r in results) == [1, 2, 3, 4]


def _chunked_multipart(total: int) -> Iterator[bytes]:
    boundary = "edgefleet-test-boundary"
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\ndetector\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; '
        'filename="big.onnx"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    sent = 0
    while sent < total:
        yield b"\0" * 65536
        sent += 65536
    yield f"\r\n--{boundary}--\r\n".encode()


def test_every_bad_upload_gets_a_problem_json_saying_what_to_fix(models_fleet: Fleet) -> None:
    fleet = models_fleet
    cases: list[tuple[httpx.Response, int, str]] = [
        (upload(fleet.api, runtime="pytorch"), 422, "runtime 'pytorch' is unknown"),
        (upload(fleet.api, name="Bad Name!"), 422, "model name 'Bad Name!' is invalid"),
        (upload(fleet.api, version="a b"), 422, "version 'a b' is invalid"),
        (upload(fleet.api, None, labels=b"a"), 422, "weights file is missing"),
        (upload(fleet.api, b""), 422, "is empty"),
        (upload(fleet.api, expires_in_days=0), 422, "greater than or equal to 1"),
        (upload(fleet.api, expires_in_days=-3), 422, "greater than or equal to 1"),
        (upload(fleet.api, architectures="x86 64"), 422, "architecture 'x86 64' is invalid"),
        (upload(fleet.api, min_ram_bytes="lots"), 422, "body.min_ram_bytes"),
        (upload(fleet.api, min_disk_bytes=-1), 422, "body.min_disk_bytes"),
        (upload(fleet.api, surprise="1"), 422, "unexpected field 'surprise'"),
        (upload(fleet.api, _bytes(LIMIT + 1)), 413, "the upload's files pass the limit"),
        (upload(fleet.api, _bytes(2 * LIMIT)), 413, "the upload declares"),
        (
            fleet.api.post(
                "/api/v1/models",
                content=_chunked_multipart(LIMIT + 65536),
                headers={"Content-Type": "multipart/form-data; boundary=edgefleet-test-boundary"},
            ),
            413,
            "max_artifact_bytes",
        ),
        (fleet.api.post("/api/v1/models", json={"name": "x"}), 415, "multipart/form-data"),
    ]
    with fleet.anonymous() as anonymous:
        cases.append((upload(anonymous), 401, "log in first"))
    for response, status, detail in cases:
        assert response.status_code == status, (status, detail, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert detail in response.json()["detail"], response.json()
    assert fleet.api.get("/api/v1/models").json() == []
    spool = fleet.home.root / "artifacts" / ".tmp"
    assert list(spool.iterdir()) == [], "refused uploads leave no spooled file behind"


def test_encrypted_upload_is_served_sealed_and_opens_to_the_original_bytes(
    models_fleet: Fleet,
) -> None:
    fleet = models_fleet
    weights = _bytes(1_500_000, 5)  # two sealed chunks
    release = created(upload(fleet.api, weights, labels=b"a\nb\n", encrypt="true"))
    assert release["encrypted"]
    device_id, headers = enrolled(fleet, "sealed")
    assign(fleet, device_id, release["id"])
    with Session(fleet.engine) as session:
        row = session.get(ModelRelease, release["id"])
        assert row is not None and row.encryption_key is not None
        key = base64.b64decode(row.encryption_key)
    with fleet.anonymous() as client:
        urls = release_urls(client, release["id"], headers)
        assert set(urls) == {"model.onnx", "labels.txt"}
        for name, plain in (("model.onnx", weights), ("labels.txt", b"a\nb\n")):
            sealed = client.get(urls[name], headers=headers).content
            assert sealed != plain and plain not in sealed
            unsealer = Unsealer(key)
            assert unsealer.feed(sealed) + unsealer.finish() == plain


def test_signed_url_resumes_with_range_and_refuses_expired_tampered_and_foreign_urls(
    models_fleet: Fleet,
) -> None:
    fleet = models_fleet
    weights = _bytes(700_000, 9)
    release = created(upload(fleet.api, weights))
    device_id, headers = enrolled(fleet, "owner")
    _, other_headers = enrolled(fleet, "other")
    assign(fleet, device_id, release["id"])
    sha = hashlib.sha256(weights).hexdigest()
    with fleet.anonymous() as client:
        url = release_urls(client, release["id"], headers)["model.onnx"]
        assert httpx.URL(url).path == f"/api/v1/artifacts/{sha}"

        whole = client.get(url, headers=headers)
        assert whole.status_code == 200 and whole.content == weights
        assert whole.headers["etag"] == f'"{sha}"'
        assert whole.headers["accept-ranges"] == "bytes"

        # A download cut at 300,000 bytes resumes with exactly the missing bytes.
        resumed = client.get(url, headers={**headers, "Range": "bytes=300000-"})
        assert resumed.status_code == 206
        assert resumed.headers["content-range"] == f"bytes 300000-{len(weights) - 1}/{len(weights)}"
        assert int(resumed.headers["content-length"]) == len(weights) - 300_000
        assert weights[:300_000] + resumed.content == weights
        middle = client.get(url, headers={"Range": "bytes=10-19"})
        assert middle.status_code == 206 and middle.content == weights[10:20]
        stale = client.get(url, headers={"Range": "bytes=10-19", "If-Range": '"other"'})
        assert stale.status_code == 200 and stale.content == weights

        past = client.get(url, headers={"Range": f"bytes={len(weights)}-"})
        assert past.status_code == 416
        assert past.headers["content-range"] == f"bytes */{len(weights)}"

        signer = UrlSigner.load(fleet.home, ttl_s=900, base_url=fleet.url)
        expired_url = signer.sign(
            sha, device_id, now=datetime.now(UTC) - timedelta(seconds=901)
        ).url
        params = dict(httpx.URL(url).params)
        tampered_url = url.replace(params["sig"], params["sig"][:-3] + "abc")
        longer_url = url.replace(f"expires={params['expires']}", "expires=4102444800")
        unknown = signer.sign("0" * 64, device_id).url
        refusals = [
            (client.get(expired_url, headers=headers), 403, "expired"),
            (client.get(tampered_url), 403, "signature"),
            (client.get(longer_url), 403, "signature"),
            (client.get(url, headers=other_headers), 403, "device"),
            (client.get(url, headers={"Authorization": "Bearer nope"}), 401, None),
            (client.get(unknown), 404, None),
        ]
        for response, status, reason in refusals:
            assert response.status_code == status, (reason, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            if reason is not None:
                body = response.json()
                assert body["reason"] == reason
                assert "/api/v1/agent/releases/" in body["detail"], "says what to do"


def test_agent_routes_give_trusted_keys_and_refuse_a_release_not_assigned(
    models_fleet: Fleet,
) -> None:
    fleet = models_fleet
    release = created(upload(fleet.api))
    device_id, headers = enrolled(fleet, "d1")
    with fleet.anonymous() as client:
        refused = client.get(f"/api/v1/agent/releases/{release['id']}/urls", headers=headers)
        assert refused.status_code == 403
        assert "not in the desired state" in refused.json()["detail"]
        assert client.get(f"/api/v1/agent/releases/{release['id']}/urls").status_code == 401
        operator = client.get(
            "/api/v1/agent/signing-keys",
            headers={"Authorization": fleet.api.headers["Authorization"]},
        )
        assert operator.status_code == 401, "an operator token is not a device token"
        keys = client.get("/api/v1/agent/signing-keys", headers=headers).json()["keys"]
        assert [k["key_id"] for k in keys] == [release["key_id"]]
        trusted = {k["key_id"]: public_key_from_text(k["public_key"]) for k in keys}
        with Session(fleet.engine) as session:
            row = session.get(ModelRelease, release["id"])
            assert row is not None
            signed = SignedManifest.model_validate(row.signed_manifest)
        verify_manifest(signed, trusted, now=datetime.now(UTC))
        assign(fleet, device_id, release["id"])
        granted = client.get(f"/api/v1/agent/releases/{release['id']}/urls", headers=headers)
        assert granted.status_code == 200
        body = granted.json()
        assert body["release_id"] == release["id"]
        expires = datetime.fromisoformat(body["expires_at"])
        assert timedelta(seconds=800) < expires - datetime.now(UTC) <= timedelta(seconds=900)


def test_cli_push_shows_progress_and_rotation_reaches_the_running_service(
    models_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = models_fleet
    model = tmp_path / "tiny.gguf"
    model.write_bytes(_bytes(1_200_000, 1))
    labels = tmp_path / "labels.txt"
    labels.write_text("yes\nno\n")
    push = fleet.cli(
        "models", "push", str(model), "--name", "chat", "--version", "0.1", "--runtime",
        "gguf", "--labels", str(labels), "--arch", "x86_64", "--encrypt",
    )  # fmt: skip
    out, err = push.communicate(timeout=120)
    assert push.returncode == 0, err
    assert "chat 0.1" in err and "1.2/1.2 MB" in err, "the progress bar ran to the end"
    assert "release 1" in out and "sealed" in out

    listed = fleet.api.get("/api/v1/models", params={"name": "chat"}).json()
    assert len(listed) == 1 and listed[0]["encrypted"]
    assert listed[0]["created_by"].startswith("cli:")
    assert listed[0]["constraints"]["architectures"] == ["x86_64"]
    listing = fleet.cli("models", "list")
    assert "chat" in listing.communicate(timeout=60)[0]

    rotate = fleet.cli("signing", "rotate")
    out, err = rotate.communicate(timeout=60)
    assert rotate.returncode == 0, err
    new_key = out.split()[3]
    after = created(upload(fleet.api, name="chat", version="0.2"))
    assert after["key_id"] == new_key and after["release"] == 2
    keys_listing = fleet.cli("signing", "list").communicate(timeout=60)[0]
    assert f"{new_key}  active" in keys_listing and listed[0]["key_id"] in keys_listing

    device_id, headers = enrolled(fleet, "rotated")
    with fleet.anonymous() as client:
        keys = client.get("/api/v1/agent/signing-keys", headers=headers).json()["keys"]
    trusted = {k["key_id"]: public_key_from_text(k["public_key"]) for k in keys}
    assert set(trusted) == {listed[0]["key_id"], new_key}
    with Session(fleet.engine) as session:
        for release_id in (listed[0]["id"], after["id"]):
            row = session.get(ModelRelease, release_id)
            assert row is not None
            verify_manifest(
                SignedManifest.model_validate(row.signed_manifest), trusted, now=datetime.now(UTC)
            )
    del device_id


def test_cli_push_refuses_a_bad_runtime_with_a_clear_error(
    models_fleet: Fleet, tmp_path: Path
) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(b"x")
    push = models_fleet.cli(
        "models", "push", str(model), "--name", "m", "--version", "1", "--runtime", "torch"
    )
    _, err = push.communicate(timeout=60)
    assert push.returncode == 1
    assert "runtime 'torch' is unknown: use one of gguf, tflite, onnx" in err
