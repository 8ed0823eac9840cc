"""The manifest signing keys this device trusts, cached in ``<state_dir>/signing_keys.json``.

A manifest names the key that signed it. A key id already in the cache is used as it is; an
unknown one makes the agent ask the service (``GET /api/v1/agent/signing-keys``, device token,
pinned CA) for the keys it trusts now and replace the cache with them: that is how a rotated
signing key reaches the devices, and how a retired one stops being trusted. Keys come only from
the service over the pinned-CA session, never from the manifest or the desired state itself.

Verification needs no network when the key is cached, so a device that restarts offline still
verifies the manifests it already has.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from device_agent.artifacts import ServiceClient
from device_agent.durable import write_atomically
from fleet_protocol import ModelManifest, SignedManifest, verify_manifest
from fleet_protocol.manifest import key_id_of, public_key_from_text, public_key_text

__all__ = ["SIGNING_KEYS_FILE", "TrustedKeys"]

logger = logging.getLogger(__name__)

SIGNING_KEYS_FILE = "signing_keys.json"


class _CachedKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: str
    public_key: str


class _Cache(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: list[_CachedKey]


class TrustedKeys:
    """The cached signing keys; :meth:`verify` refreshes them when a manifest needs a new one."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / SIGNING_KEYS_FILE
        self._keys = self._load()
        self._lock = asyncio.Lock()

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys trusted now, sorted."""
        return sorted(self._keys)

    async def verify(
        self, signed: SignedManifest, client: ServiceClient, *, now: datetime
    ) -> ModelManifest:
        """The manifest if a trusted key signed it and it is unexpired; else ManifestError.

        A key id not in the cache fetches the service's current keys once, then verifies
        against those. Raises :class:`~device_agent.artifacts.ArtifactError` when the keys
        are needed and the service cannot give them.
        """
        async with self._lock:
            if signed.key_id not in self._keys:
                logger.info(
                    "manifest of %s names signing key %s, not cached; fetching the service's keys",
                    signed.manifest.name,
                    signed.key_id,
                )
                keys = await client.signing_keys()
                await asyncio.to_thread(self._store, keys)
            return verify_manifest(signed, self._keys, now=now)

    def verify_cached(self, signed: SignedManifest, *, now: datetime) -> ModelManifest:
        """:meth:`verify` without the network: an unknown key is a ManifestError."""
        return verify_manifest(signed, self._keys, now=now)

    def _store(self, keys: dict[str, Ed25519PublicKey]) -> None:
        cache = _Cache(
            keys=[
                _CachedKey(key_id=key_id, public_key=public_key_text(key))
                for key_id, key in sorted(keys.items())
            ]
        )
        write_atomically(self._path, cache.model_dump_json(indent=2).encode() + b"\n")
        self._keys = dict(keys)
        logger.info("trusted signing keys now: %s", ", ".join(sorted(keys)) or "none")

    def _load(self) -> dict[str, Ed25519PublicKey]:
        try:
            cache = _Cache.model_validate_json(self._path.read_bytes())
            keys = {item.key_id: public_key_from_text(item.public_key) for item in cache.keys}
        except FileNotFoundError:
            return {}
        except (OSError, ValidationError, ValueError) as exc:
            # Nothing is lost: the keys are fetched again when a manifest needs one.
            logger.warning(
                "ignoring unreadable %s (%s); keys will be fetched again", self._path, exc
            )
            return {}
        for key_id, key in list(keys.items()):
            if key_id_of(key) != key_id:
                logger.warning("dropping cached signing key %s: its id does not match", key_id)
                del keys[key_id]
        return keys
