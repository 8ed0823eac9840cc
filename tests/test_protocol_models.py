"""The model parts of the contract: signed manifests, sealed files, results and model reports."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from fleet_protocol import (
    DesiredState,
    FileRole,
    ManifestError,
    ManifestFile,
    ModelAssignment,
    ModelManifest,
    ModelRuntime,
    ResultMessage,
    SignedManifest,
    decode,
    sign_manifest,
    verify_manifest,
)
from fleet_protocol.manifest import key_id_of, public_key_from_text, public_key_text
from fleet_protocol.sealing import (
    CHUNK_SIZE,
    Sealer,
    SealError,
    new_key,
    seal_chunks,
    sealed_size,
    unseal_chunks,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _file(data: bytes, name: str = "model.onnx", role: FileRole = FileRole.WEIGHTS) -> ManifestFile:
    digest = hashlib.sha256(data).hexdigest()
    return ManifestFile(
        name=name, role=role, sha256=digest, size=len(data), stored_sha256=digest,
        stored_size=len(data),
    )  # fmt: skip


def _manifest(release: int = 3, **changes: object) -> ModelManifest:
    fields: dict[str, object] = {
        "name": "detector",
        "version": "1.2.0",
        "runtime": ModelRuntime.ONNX,
        "release": release,
        "files": [_file(b"weights"), _file(b"cat\ndog\n", "labels.txt", FileRole.LABELS)],
        "created_at": NOW,
        "expires_at": NOW + timedelta(days=30),
    }
    fields.update(changes)
    return ModelManifest.model_validate(fields)


def test_a_signed_manifest_verifies_with_any_trusted_key_and_survives_json() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trusted = {key_id_of(k.public_key()): k.public_key() for k in (old, new)}
    for key in (old, new):
        signed = sign_manifest(_manifest(), key)
        again = SignedManifest.model_validate_json(signed.model_dump_json())
        assert verify_manifest(again, trusted, now=NOW) == _manifest()


def test_a_tampered_manifest_an_unknown_key_and_an_expired_one_are_refused() -> None:
    key = Ed25519PrivateKey.generate()
    trusted = {key_id_of(key.public_key()): key.public_key()}
    signed = sign_manifest(_manifest(), key)

    tampered = signed.model_copy(update={"manifest": _manifest(release=4)})
    with pytest.raises(ManifestError) as refused:
        verify_manifest(tampered, trusted, now=NOW)
    assert refused.value.reason == "signature"

    stranger = sign_manifest(_manifest(), Ed25519PrivateKey.generate())
    with pytest.raises(ManifestError) as unknown:
        verify_manifest(stranger, trusted, now=NOW)
    assert unknown.value.reason == "unknown-key"

    with pytest.raises(ManifestError) as expired:
        verify_manifest(signed, trusted, now=NOW + timedelta(days=31))
    assert expired.value.reason == "expired"


def test_public_keys_travel_as_base64_and_bad_ones_are_refused() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    assert key_id_of(public_key_from_text(public_key_text(key))) == key_id_of(key)
    with pytest.raises(ValueError, match="32 bytes"):
        public_key_from_text("AAAA")
    with pytest.raises(ValueError, match="base64"):
        public_key_from_text("not base64!")


def test_a_manifest_needs_one_weights_file_unique_names_and_a_safe_name() -> None:
    with pytest.raises(ValidationError, match="exactly one weights"):
        _manifest(files=[_file(b"x", "labels.txt", FileRole.LABELS)])
    with pytest.raises(ValidationError, match="unique"):
        _manifest(files=[_file(b"x"), _file(b"y", "model.onnx", FileRole.CONFIG)])
    for bad in ("../etc", "a/b", "results/#", "UPPER", ""):
        with pytest.raises(ValidationError):
            _manifest(name=bad)
    with pytest.raises(ValidationError):
        _manifest(files=[_file(b"x", "../model.onnx")])


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE])
def test_sealing_round_trips_any_length_in_any_piece_size(size: int) -> None:
    plain = os.urandom(size)
    key = new_key()
    sealed = b"".join(seal_chunks([plain[i : i + 70_000] for i in range(0, size, 70_000)], key))
    assert len(sealed) == sealed_size(size)
    pieces = [sealed[i : i + 12_345] for i in range(0, len(sealed), 12_345)]
    assert b"".join(unseal_chunks(pieces, key)) == plain


def test_sealed_bytes_that_were_changed_cut_or_keyed_differently_do_not_open() -> None:
    plain = os.urandom(2 * CHUNK_SIZE + 10)
    key = new_key()
    sealed = b"".join(seal_chunks([plain], key))
    flipped = bytearray(sealed)
    flipped[CHUNK_SIZE] ^= 1
    cut_at_chunk = sealed[: sealed_size(2 * CHUNK_SIZE)]  # two whole chunks, the last one gone
    cases = {
        "changed": (bytes(flipped), key),
        "truncated": (sealed[:-1], key),
        "cut at a chunk": (cut_at_chunk, key),
        "other key": (sealed, new_key()),
        "not sealed": (b"plain model bytes, not sealed", key),
    }
    for what, (data, with_key) in cases.items():
        with pytest.raises(SealError):
            b"".join(unseal_chunks([data], with_key))
        assert what


def test_two_seals_of_one_file_differ_so_a_nonce_never_repeats() -> None:
    key = new_key()
    assert Sealer(key).finish() != Sealer(key).finish()


def test_a_result_names_its_model_and_bounds_its_fields() -> None:
    result = ResultMessage(
        model="detector", version="1.2.0", release=3, sha256="a" * 64, runtime=ModelRuntime.ONNX,
        source="schedule", input_ref="/data/cam/0001.npy", latency_ms=4.2, label="cat",
        confidence=0.93,
    )  # fmt: skip
    assert decode(ResultMessage, result.to_payload()) == result
    with pytest.raises(ValidationError):
        result.model_validate({**result.model_dump(), "confidence": 1.5})
    with pytest.raises(ValidationError):
        result.model_validate({**result.model_dump(), "model": "a/b"})


def test_a_desired_state_names_each_model_once() -> None:
    signed = sign_manifest(_manifest(), Ed25519PrivateKey.generate())
    assignment = ModelAssignment(release_id="rel1", manifest=signed)
    assert assignment.name == "detector"
    state = DesiredState(generation=1, models=[assignment])
    assert decode(DesiredState, state.to_payload()) == state
    with pytest.raises(ValidationError, match="at most once"):
        DesiredState(generation=2, models=[assignment, assignment])
