"""Model release manifests: what files a model version needs, where it may run, and its signature.

The service signs each manifest with the fleet's Ed25519 key; a device verifies it against the
public keys it trusts (several, so the signing key can be rotated) before it fetches a byte. The
signature covers a canonical JSON form (sorted keys, no whitespace), so both sides agree on the
bytes whatever pydantic version serialised the model.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "FILE_NAME_PATTERN",
    "MODEL_NAME_PATTERN",
    "Encryption",
    "FileRole",
    "ManifestError",
    "ManifestFile",
    "ModelManifest",
    "ModelRuntime",
    "SignedManifest",
    "TargetConstraints",
    "key_id_of",
    "normalise_architecture",
    "public_key_from_text",
    "public_key_text",
    "sign_manifest",
    "verify_manifest",
]

# A model name is also the last level of ``results/{model}`` and a directory on the device, so it
# carries no MQTT wildcard, separator or dot-dot.
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# File names inside a release: one directory level, no separators.
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ByteCount = Annotated[int, Field(ge=0)]


# The same CPU under the names different platforms report (platform.machine(): Windows says
# AMD64, macOS arm64), mapped to the Linux spelling manifests and telemetry use.
_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "armv8": "aarch64",
    "armv8l": "aarch64",
    "i686": "x86",
    "i386": "x86",
}


def normalise_architecture(name: str) -> str:
    """One name per CPU architecture (``AMD64`` and ``x86_64`` are the same thing)."""
    lowered = name.strip().lower()
    return _ARCH_ALIASES.get(lowered, lowered)


class ManifestError(ValueError):
    """A manifest cannot be trusted; ``reason`` is one of signature, unknown-key, expired."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"manifest refused ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class ModelRuntime(StrEnum):
    """The runtime a model needs on the device."""

    GGUF = "gguf"
    TFLITE = "tflite"
    ONNX = "onnx"


class FileRole(StrEnum):
    """What a file in a release is for; exactly one is the weights."""

    WEIGHTS = "weights"
    TOKENIZER = "tokenizer"
    LABELS = "labels"
    CONFIG = "config"
    OTHER = "other"


class Encryption(StrEnum):
    """How the stored files are sealed; see :mod:`fleet_protocol.sealing`."""

    NONE = "none"
    AES_256_GCM_CHUNKED = "aes-256-gcm-chunked"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ManifestFile(_Frozen):
    """One file of a release: its plaintext digest and length, and those of the stored bytes.

    The stored bytes are what a device downloads (and what the artifact store is addressed by);
    they equal the plaintext unless the release is encrypted.
    """

    name: Annotated[str, Field(pattern=FILE_NAME_PATTERN)]
    role: FileRole
    sha256: Sha256Hex
    size: ByteCount
    stored_sha256: Sha256Hex
    stored_size: ByteCount


class TargetConstraints(_Frozen):
    """Where a release may run; empty ``architectures`` means any."""

    architectures: Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=16)] = (
        Field(default_factory=list)
    )
    min_ram_bytes: ByteCount = 0
    min_disk_bytes: ByteCount = 0


class ModelManifest(_Frozen):
    """Everything a device needs to know about one release of a model, before it is signed."""

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    runtime: ModelRuntime
    # Rises by one with every release of ``name``; a device refuses one below its accepted floor.
    release: Annotated[int, Field(ge=1)]
    files: Annotated[list[ManifestFile], Field(min_length=1, max_length=16)]
    constraints: TargetConstraints = Field(default_factory=TargetConstraints)
    encryption: Encryption = Encryption.NONE
    created_at: AwareDatetime
    expires_at: AwareDatetime

    @model_validator(mode="after")
    def _one_weights_file_and_unique_names(self) -> ModelManifest:
        weights = [f for f in self.files if f.role is FileRole.WEIGHTS]
        if len(weights) != 1:
            raise ValueError(f"a manifest needs exactly one weights file, found {len(weights)}")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("file names in a manifest must be unique")
        if self.encryption is Encryption.NONE and any(
            f.sha256 != f.stored_sha256 or f.size != f.stored_size for f in self.files
        ):
            raise ValueError("an unencrypted file's stored digest and size must equal its own")
        return self

    @property
    def weights(self) -> ManifestFile:
        """The weights file."""
        return next(f for f in self.files if f.role is FileRole.WEIGHTS)

    @property
    def stored_bytes(self) -> int:
        """Bytes a device downloads for this release."""
        return sum(f.stored_size for f in self.files)

    @property
    def installed_bytes(self) -> int:
        """Bytes the release occupies once installed (plaintext)."""
        return sum(f.size for f in self.files)

    def signing_bytes(self) -> bytes:
        """The canonical bytes the signature covers."""
        document = self.model_dump(mode="json")
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


class SignedManifest(_Frozen):
    """A manifest with the Ed25519 signature over its canonical bytes and the signer's key id."""

    manifest: ModelManifest
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    signature: Annotated[str, Field(min_length=86, max_length=88)]  # base64 of 64 bytes


def public_key_text(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64: how keys travel in JSON."""
    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """The inverse of :func:`public_key_text`; ValueError for anything else."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError("a signing public key must be base64") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id_of(key: Ed25519PublicKey) -> str:
    """A short stable name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> SignedManifest:
    """Sign ``manifest`` with ``key``."""
    signature = key.sign(manifest.signing_bytes())
    return SignedManifest(
        manifest=manifest,
        key_id=key_id_of(key.public_key()),
        signature=base64.b64encode(signature).decode(),
    )


def verify_manifest(
    signed: SignedManifest, trusted: Mapping[str, Ed25519PublicKey], *, now: datetime
) -> ModelManifest:
    """The manifest if a trusted key signed it and it is unexpired, else :class:`ManifestError`."""
    key = trusted.get(signed.key_id)
    if key is None:
        raise ManifestError(
            "unknown-key",
            f"signed by key {signed.key_id}, which this device does not trust "
            f"(trusted: {', '.join(sorted(trusted)) or 'none'})",
        )
    try:
        key.verify(base64.b64decode(signed.signature), signed.manifest.signing_bytes())
    except (InvalidSignature, ValueError) as exc:
        raise ManifestError(
            "signature", f"the signature of {signed.manifest.name} does not match its contents"
        ) from exc
    if now >= signed.manifest.expires_at:
        raise ManifestError(
            "expired",
            f"{signed.manifest.name} {signed.manifest.version} expired at "
            f"{signed.manifest.expires_at.isoformat()}",
        )
    return signed.manifest
