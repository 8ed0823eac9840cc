"""The artifact store (filesystem and S3), signed URLs, signing keys and releases, on real files.

S3 runs against a real ``minio`` server binary when one is on PATH (or named by
``EDGEFLEET_TEST_MINIO``); MinIO's server is not packaged in Debian 12 nor shipped in a PyPI or
npm package, so without one the S3 cases skip and say so.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

from fleet_protocol.manifest import (
    Encryption,
    FileRole,
    ManifestError,
    ModelRuntime,
    TargetConstraints,
    key_id_of,
    sign_manifest,
    verify_manifest,
)
from fleet_protocol.sealing import CHUNK_SIZE, Unsealer
from fleet_service.artifacts import (
    ArtifactStore,
    BlobNotFoundError,
    ReleaseFile,
    ReleaseInvalidError,
    ReleaseSigner,
    SigningKeyError,
    UrlRefusedError,
    UrlSigner,
    create_release,
    list_releases,
    release_public,
    resign_release,
    signed_manifest_of,
)
from fleet_service.artifacts.fs import FsArtifactStore
from fleet_service.artifacts.ranges import ByteRange, RangeNotSatisfiable, parse_range
from fleet_service.bootstrap import initialise_home
from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine, migrate, session_scope
from fleet_service.home import FleetHome
from fleet_service.pki import generate_signing_key, load_signing_key
from tests.fixtures.fleet import free_tcp_port, wait_until

MINIO_ENV = "EDGEFLEET_TEST_MINIO"
MINIO_USER = "edgefleet-test"
MINIO_PASSWORD = "edgefleet-test-secret"  # a throwaway server on loopback


def _blob(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


def _chunks(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture(scope="session")
def minio_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MinIO server on loopback, or a skip saying why there is none."""
    binary = os.environ.get(MINIO_ENV) or shutil.which("minio")
    if not binary:
        pytest.skip(
            "no `minio` server binary on PATH (nor EDGEFLEET_TEST_MINIO): MinIO's server is not "
            "packaged in Debian 12 nor shipped in a PyPI or npm package, so S3 cases are skipped"
        )
    port = free_tcp_port()
    data = tmp_path_factory.mktemp("minio")
    process = subprocess.Popen(
        [binary, "server", str(data), "--address", f"127.0.0.1:{port}", "--quiet"],
        env={**os.environ, "MINIO_ROOT_USER": MINIO_USER, "MINIO_ROOT_PASSWORD": MINIO_PASSWORD},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/minio/health/live").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 30, 0.2, "minio to start")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    """A real fleet home made by ``edgefleet init``."""
    initialise_home(ServiceSettings(home=tmp_path / "home"))
    return FleetHome(tmp_path / "home")


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, home: FleetHome) -> ArtifactStore:
    """Each store implementation, behind the one interface."""
    if request.param == "fs":
        urls = UrlSigner.load(home, ttl_s=900, base_url="https://127.0.0.1:1")
        return FsArtifactStore(home.root / "artifacts", urls)
    from fleet_service.artifacts.s3 import S3ArtifactStore

    endpoint = request.getfixturevalue("minio_endpoint")
    settings = ServiceSettings(
        home=home.root,
        artifact_store="s3",
        s3_endpoint=endpoint,
        s3_access_key=MINIO_USER,
        s3_secret_key=MINIO_PASSWORD,
        s3_secure=False,
        s3_bucket="test-" + os.urandom(4).hex(),
    )
    return S3ArtifactStore.from_settings(settings, spool_dir=home.root / "spool")


# --- the store ---


def test_put_is_content_addressed_and_putting_again_is_a_no_op(
    store: ArtifactStore, tmp_path: Path
) -> None:
    data = _blob(300_000)
    first = store.put_stream(_chunks(data))
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.size == len(data)
    path = tmp_path / "same.bin"
    path.write_bytes(data)
    assert store.put_file(path) == first
    assert store.put_stream(_chunks(data, 7)) == first
    assert store.exists(first.sha256)
    assert store.size(first.sha256) == len(data)
    assert b"".join(store.open_range(first.sha256)) == data


def test_open_range_returns_exactly_the_bytes_asked_for(store: ArtifactStore) -> None:
    data = _blob(2 * 1024 * 1024 + 17)
    blob = store.put_stream(_chunks(data))
    for start, end in ((0, 1), (5, 1_048_600), (1_048_576, None), (len(data) - 3, len(data))):
        got = b"".join(store.open_range(blob.sha256, start, end))
        assert got == data[start:end], (start, end)


def test_a_put_that_fails_midway_leaves_no_blob(store: ArtifactStore) -> None:
    data = _blob(500_000)

    def broken() -> Iterator[bytes]:
        yield data[:200_000]
        raise OSError("the upload was cut")

    with pytest.raises(OSError, match="cut"):
        store.put_stream(broken())
    assert not store.exists(hashlib.sha256(data[:200_000]).hexdigest())
    assert not store.exists(hashlib.sha256(data).hexdigest())
    if isinstance(store, FsArtifactStore):
        assert list(store.temp_dir.iterdir()) == []


def test_missing_blobs_and_bad_digests_are_not_found(store: ArtifactStore) -> None:
    missing = "0" * 64
    assert not store.exists(missing)
    with pytest.raises(BlobNotFoundError):
        store.size(missing)
    with pytest.raises(BlobNotFoundError):
        b"".join(store.open_range(missing))
    store.delete(missing)  # harmless
    for bad in ("../../etc/passwd", "A" * 64, "0" * 63):
        with pytest.raises(BlobNotFoundError, match="not a sha256"):
            store.size(bad)


def test_delete_removes_a_blob(store: ArtifactStore) -> None:
    blob = store.put_stream([b"delete me"])
    store.delete(blob.sha256)
    assert not store.exists(blob.sha256)


def test_fs_put_killed_midway_leaves_no_blob(home: FleetHome) -> None:
    root = home.root / "artifacts"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fleet_service.artifacts.fs import FsArtifactStore\n"
        "from fleet_service.artifacts.urls import UrlSigner\n"
        "from fleet_service.home import FleetHome\n"
        f"home = FleetHome(Path({str(home.root)!r}))\n"
        "store = FsArtifactStore(home.root / 'artifacts', "
        "UrlSigner.load(home, ttl_s=900, base_url='https://x'))\n"
        "def forever():\n"
        "    while True:\n"
        "        yield b'x' * 65536\n"
        "        time.sleep(0.01)\n"
        "store.put_stream(forever())\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(
            lambda: any(p.stat().st_size > 0 for p in (root / ".tmp").glob("put-*")),
            20,
            0.05,
            "the put to start writing",
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    blobs = [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts]
    assert blobs == [], "a killed put must not leave anything under a digest name"


# --- ranges ---


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-", ByteRange(0, 100, 100)),
        ("bytes=10-19", ByteRange(10, 20, 100)),
        ("bytes=90-500", ByteRange(90, 100, 100)),
        ("bytes=-5", ByteRange(95, 100, 100)),
        ("bytes=-500", ByteRange(0, 100, 100)),
        ("bytes=0-1,5-6", None),  # several ranges: ignored, the whole blob is sent
        ("items=0-5", None),
        ("bytes=9-3", None),
    ],
)
def test_range_header_parsing(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=250-300", "bytes=-0"])
def test_a_range_past_the_end_is_not_satisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


# --- signed URLs ---


def test_signed_url_verifies_and_names_what_is_wrong(home: FleetHome) -> None:
    signer = UrlSigner.load(home, ttl_s=900, base_url="https://fleet:8443")
    sha = "ab" * 32
    now = datetime.now(UTC)
    url = httpx.URL(signer.sign(sha, "dev-aaaaaaaaaaaa", now=now).url)
    assert url.path == f"/api/v1/artifacts/{sha}"
    params = dict(url.params)
    expires, sig = int(params["expires"]), params["sig"]
    signer.verify(sha, device_id="dev-aaaaaaaaaaaa", expires=expires, sig=sig)
    cases = [
        ({"device_id": "dev-bbbbbbbbbbbb", "expires": expires, "sig": sig}, "signature"),
        ({"device_id": "dev-aaaaaaaaaaaa", "expires": expires + 3600, "sig": sig}, "signature"),
        (
            {"device_id": "dev-aaaaaaaaaaaa", "expires": expires, "sig": sig[:-2] + "AA"},
            "signature",
        ),
    ]
    for kwargs, reason in cases:
        with pytest.raises(UrlRefusedError) as refused:
            signer.verify(sha, **kwargs)  # type: ignore[arg-type]
        assert refused.value.reason == reason
    with pytest.raises(UrlRefusedError, match="expired") as expired:
        signer.verify(
            sha,
            device_id="dev-aaaaaaaaaaaa",
            expires=expires,
            sig=sig,
            now=now + timedelta(seconds=901),
        )
    assert expired.value.reason == "expired"
    with pytest.raises(UrlRefusedError):
        signer.verify("cd" * 32, device_id="dev-aaaaaaaaaaaa", expires=expires, sig=sig)


def test_url_secret_is_private_and_shared_by_every_loader(home: FleetHome) -> None:
    first = UrlSigner.load(home, ttl_s=900, base_url="https://a")
    second = UrlSigner.load(home, ttl_s=900, base_url="https://b")
    assert (home.root / "artifact-url.secret").stat().st_mode & 0o777 == 0o600
    signed = httpx.URL(first.sign("ab" * 32, "dev-x").url).params
    second.verify("ab" * 32, device_id="dev-x", expires=int(signed["expires"]), sig=signed["sig"])


# --- signing keys ---


def _manifest_release(signer: ReleaseSigner, number: int) -> object:
    from fleet_protocol.manifest import ManifestFile, ModelManifest

    digest = "ab" * 32
    now = datetime.now(UTC)
    manifest = ModelManifest(
        name="m",
        version="1",
        runtime=ModelRuntime.ONNX,
        release=number,
        files=[
            ManifestFile(
                name="w.onnx",
                role=FileRole.WEIGHTS,
                sha256=digest,
                size=1,
                stored_sha256=digest,
                stored_size=1,
            )
        ],
        created_at=now,
        expires_at=now + timedelta(days=1),
    )
    return signer.sign(manifest)


def test_the_key_init_wrote_becomes_the_first_signing_key(home: FleetHome) -> None:
    legacy = load_signing_key(home.signing_key)
    expected = key_id_of(legacy.public_key())
    signer = ReleaseSigner.open(home)
    assert signer.active_key_id() == expected
    assert list(signer.trusted()) == [expected]
    assert not home.signing_key.exists(), "one copy of the private key, in signing/"
    assert (home.root / "signing" / "active.key").stat().st_mode & 0o777 == 0o600
    assert ReleaseSigner.open(home).active_key_id() == expected  # opening again changes nothing


def test_a_home_without_any_key_gets_one_lazily(home: FleetHome) -> None:
    home.signing_key.unlink()
    signer = ReleaseSigner.open(home)
    assert list(signer.trusted()) == [signer.active_key_id()]


def test_manifests_signed_before_and_after_rotation_both_verify(home: FleetHome) -> None:
    from fleet_protocol.manifest import SignedManifest

    signer = ReleaseSigner.open(home)
    before = _manifest_release(signer, 1)
    old_id = signer.active_key_id()
    new_id = signer.rotate()
    after = _manifest_release(signer, 2)
    assert isinstance(before, SignedManifest) and isinstance(after, SignedManifest)
    assert new_id != old_id and before.key_id == old_id and after.key_id == new_id
    trusted = signer.trusted()
    assert set(trusted) == {old_id, new_id}
    now = datetime.now(UTC)
    assert verify_manifest(before, trusted, now=now).release == 1
    assert verify_manifest(after, trusted, now=now).release == 2
    assert [k.active for k in signer.list_keys()] == [False, True]


def test_verify_manifest_refuses_a_key_the_fleet_does_not_trust(home: FleetHome) -> None:
    from fleet_protocol.manifest import SignedManifest

    signer = ReleaseSigner.open(home)
    genuine = _manifest_release(signer, 1)
    assert isinstance(genuine, SignedManifest)
    foreign = sign_manifest(genuine.manifest, generate_signing_key())
    with pytest.raises(ManifestError) as refused:
        verify_manifest(foreign, signer.trusted(), now=datetime.now(UTC))
    assert refused.value.reason == "unknown-key"


def test_a_signing_key_readable_by_others_is_refused(home: FleetHome) -> None:
    signer = ReleaseSigner.open(home)
    signer.active_path.chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        signer.active_key_id()


# --- releases ---


@pytest.fixture
def engine(home: FleetHome, database_url: str | None) -> Iterator[Engine]:
    """A real database, migrated: the home's SQLite, or a fresh PostgreSQL one."""
    url = ServiceSettings(home=home.root, database_url=database_url).resolved_database_url
    migrate(url)
    engine = create_db_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def fs_store(home: FleetHome) -> FsArtifactStore:
    return FsArtifactStore(
        home.root / "artifacts", UrlSigner.load(home, ttl_s=900, base_url="https://x")
    )


def _release(
    engine: Engine,
    store: ArtifactStore,
    signer: ReleaseSigner,
    files: list[ReleaseFile],
    **overrides: object,
) -> str:
    arguments: dict[str, object] = {
        "name": "detector",
        "version": "1.0",
        "runtime": "onnx",
        "files": files,
        "constraints": TargetConstraints(architectures=["x86_64"]),
        "expires_at": datetime.now(UTC) + timedelta(days=30),
        "encrypt": False,
        "created_by": "test",
    }
    arguments.update(overrides)
    with session_scope(engine) as session:
        return create_release(session, store, signer, **arguments).id  # type: ignore[arg-type]


def test_encrypted_release_stores_sealed_bytes_that_open_to_the_original(
    home: FleetHome, engine: Engine, fs_store: FsArtifactStore, tmp_path: Path
) -> None:
    weights = tmp_path / "model.onnx"
    original = _blob(CHUNK_SIZE * 2 + 12_345, seed=3)  # three sealed chunks, the last short
    weights.write_bytes(original)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    signer = ReleaseSigner.open(home)
    release_id = _release(
        engine,
        fs_store,
        signer,
        [ReleaseFile(weights, FileRole.WEIGHTS), ReleaseFile(labels, FileRole.LABELS)],
        encrypt=True,
    )
    with session_scope(engine) as session:
        from fleet_service.artifacts import get_release

        row = get_release(session, release_id)
    assert row.encryption_key is not None
    signed = signed_manifest_of(row)
    manifest = verify_manifest(signed, signer.trusted(), now=datetime.now(UTC))
    assert manifest.encryption is Encryption.AES_256_GCM_CHUNKED
    key = base64.b64decode(row.encryption_key)
    for entry, plain in zip(manifest.files, (original, b"cat\ndog\n"), strict=True):
        assert entry.sha256 == hashlib.sha256(plain).hexdigest() and entry.size == len(plain)
        sealed = b"".join(fs_store.open_range(entry.stored_sha256))
        assert len(sealed) == entry.stored_size and sealed != plain
        assert hashlib.sha256(sealed).hexdigest() == entry.stored_sha256
        unsealer = Unsealer(key)
        opened = b"".join(unsealer.feed(piece) for piece in _chunks(sealed, 70_000))
        assert opened + unsealer.finish() == plain
    public = release_public(row)
    assert public.encrypted and public.key_id == signed.key_id
    assert "encryption_key" not in public.model_dump()


def test_release_numbers_rise_per_name_and_resigning_takes_the_next(
    home: FleetHome, engine: Engine, fs_store: FsArtifactStore, tmp_path: Path
) -> None:
    weights = tmp_path / "model.onnx"
    weights.write_bytes(_blob(1000))
    signer = ReleaseSigner.open(home)
    files = [ReleaseFile(weights, FileRole.WEIGHTS)]
    first = _release(engine, fs_store, signer, files)
    second = _release(engine, fs_store, signer, files, version="1.1")
    other = _release(engine, fs_store, signer, files, name="other")
    signer.rotate()
    with session_scope(engine) as session:
        rolled = resign_release(session, signer, first, created_by="test")
        rolled_id = rolled.id
    with session_scope(engine) as session:
        rows = {r.id: r for r in list_releases(session)}
        numbers = {r.id: r.release for r in rows.values()}
    assert numbers == {first: 1, second: 2, other: 1, rolled_id: 3}
    old, new = signed_manifest_of(rows[first]), signed_manifest_of(rows[rolled_id])
    assert new.manifest.files == old.manifest.files and new.manifest.version == "1.0"
    assert rows[rolled_id].rollback_of == first
    assert new.key_id != old.key_id, "re-signed with the active key"
    verify_manifest(new, signer.trusted(), now=datetime.now(UTC))


def test_concurrent_releases_of_one_name_get_distinct_numbers(
    home: FleetHome, engine: Engine, fs_store: FsArtifactStore, tmp_path: Path
) -> None:
    signer = ReleaseSigner.open(home)
    barrier = threading.Barrier(4)
    created: list[str] = []
    errors: list[BaseException] = []

    def upload(index: int) -> None:
        weights = tmp_path / f"w{index}.onnx"
        weights.write_bytes(_blob(5000, seed=index))
        barrier.wait()
        try:
            created.append(
                _release(engine, fs_store, signer, [ReleaseFile(weights, FileRole.WEIGHTS)])
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with session_scope(engine) as session:
        assert sorted(r.release for r in list_releases(session, name="detector")) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Bad Name"}, "model name 'Bad Name' is invalid"),
        ({"name": "../etc"}, "model name"),
        ({"version": "1 0"}, "version '1 0' is invalid"),
        ({"runtime": "pytorch"}, "runtime 'pytorch' is unknown: use one of gguf, tflite, onnx"),
        ({"files": []}, "exactly one weights file, got 0"),
        ({"files": "labels-only"}, "exactly one weights file, got 0"),
        ({"files": "empty"}, "weights file empty.onnx is empty"),
        ({"files": "missing"}, "does not exist"),
        ({"files": "bad-name"}, "file name 'my model.onnx' is invalid"),
        ({"files": "duplicate"}, "two files of the release are named"),
        ({"expires_at": datetime.now(UTC) - timedelta(days=1)}, "is in the past"),
        (
            {"constraints": TargetConstraints(architectures=["x86 64"])},
            "architecture 'x86 64' is invalid",
        ),
    ],
)
def test_bad_release_requests_are_refused_with_a_clear_message(
    home: FleetHome,
    engine: Engine,
    fs_store: FsArtifactStore,
    tmp_path: Path,
    overrides: dict[str, object],
    message: str,
) -> None:
    good = tmp_path / "model.onnx"
    good.write_bytes(b"weights")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "my model.onnx").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.onnx").write_bytes(b"y")
    named_files = {
        "labels-only": [ReleaseFile(labels, FileRole.LABELS)],
        "empty": [ReleaseFile(tmp_path / "empty.onnx", FileRole.WEIGHTS)],
        "missing": [ReleaseFile(tmp_path / "nope.onnx", FileRole.WEIGHTS)],
        "bad-name": [ReleaseFile(tmp_path / "my model.onnx", FileRole.WEIGHTS)],
        "duplicate": [
            ReleaseFile(good, FileRole.WEIGHTS),
            ReleaseFile(tmp_path / "sub" / "model.onnx", FileRole.CONFIG),
        ],
    }
    if isinstance(overrides.get("files"), str):
        overrides = {**overrides, "files": named_files[str(overrides["files"])]}
    overrides.setdefault("files", [ReleaseFile(good, FileRole.WEIGHTS)])
    signer = ReleaseSigner.open(home)
    with pytest.raises(ReleaseInvalidError, match=message.replace("(", r"\(")) as refused:
        _release(engine, fs_store, signer, **overrides)  # type: ignore[arg-type]
    assert refused.value.status == 422
    with session_scope(engine) as session:
        assert list_releases(session) == []


def test_a_release_whose_expiry_has_no_zone_is_refused(
    home: FleetHome, engine: Engine, fs_store: FsArtifactStore, tmp_path: Path
) -> None:
    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"w")
    with pytest.raises(ReleaseInvalidError, match="time zone"):
        _release(
            engine,
            fs_store,
            ReleaseSigner.open(home),
            [ReleaseFile(weights, FileRole.WEIGHTS)],
            expires_at=datetime(2099, 1, 1),  # a naive datetime, the case under test
        )


def test_progress_hook_sees_every_plaintext_byte(
    home: FleetHome, engine: Engine, fs_store: FsArtifactStore, tmp_path: Path
) -> None:
    weights = tmp_path / "model.onnx"
    weights.write_bytes(_blob(3 * 1024 * 1024 + 5))
    seen: list[int] = []
    _release(
        engine,
        fs_store,
        ReleaseSigner.open(home),
        [ReleaseFile(weights, FileRole.WEIGHTS)],
        encrypt=True,
        progress=seen.append,
    )
    assert sum(seen) == weights.stat().st_size and len(seen) > 1


def test_s3_settings_refuse_plaintext_off_loopback_and_missing_credentials() -> None:
    with pytest.raises(ValueError, match="s3_access_key, s3_secret_key"):
        ServiceSettings(artifact_store="s3", s3_endpoint="minio:9000")
    with pytest.raises(ValueError, match="without TLS"):
        ServiceSettings(
            artifact_store="s3",
            s3_endpoint="minio.example:9000",
            s3_access_key="a",
            s3_secret_key="b",
            s3_secure=False,
        )
    ServiceSettings(
        artifact_store="s3",
        s3_endpoint="127.0.0.1:9000",
        s3_access_key="a",
        s3_secret_key="b",
        s3_secure=False,
    )
