"""What a device may fetch: the fleet's trusted signing keys, and URLs of its assigned releases."""

from __future__ import annotations

from sqlmodel import Session

from fleet_protocol.manifest import public_key_text
from fleet_service.artifacts.errors import ReleaseNotAssignedError
from fleet_service.artifacts.releases import get_release, signed_manifest_of
from fleet_service.artifacts.signing import ReleaseSigner
from fleet_service.artifacts.store import ArtifactStore
from fleet_service.errors import NotFoundError
from fleet_service.schemas import ReleaseUrlsPublic, SigningKeyPublic, SigningKeysPublic
from fleet_service.tables import Device

__all__ = ["release_urls", "signing_keys"]


def signing_keys(signer: ReleaseSigner) -> SigningKeysPublic:
    """Every public key a device should trust for manifests."""
    return SigningKeysPublic(
        keys=[
            SigningKeyPublic(key_id=key_id, public_key=public_key_text(key))
            for key_id, key in signer.trusted().items()
        ]
    )


def release_urls(
    session: Session, store: ArtifactStore, *, device_id: str, release_id: str
) -> ReleaseUrlsPublic:
    """Short-lived download URLs of each file of ``release_id``, for ``device_id`` only.

    Refused (ReleaseNotAssignedError) unless the release is in the device's desired state: a
    device can fetch what it was told to run, nothing else.
    """
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    if not any(m.get("release_id") == release_id for m in device.desired_models):
        raise ReleaseNotAssignedError(
            f"release {release_id!r} is not in the desired state of {device_id}; a device may "
            "download only the releases deployed to it"
        )
    manifest = signed_manifest_of(get_release(session, release_id)).manifest
    signed = {
        f.name: store.signed_url(f.stored_sha256, device_id=device_id) for f in manifest.files
    }
    return ReleaseUrlsPublic(
        release_id=release_id,
        expires_at=min(u.expires_at for u in signed.values()),
        urls={name: u.url for name, u in signed.items()},
    )
