"""Model artifacts on the service: the blob store (filesystem or S3), signed download URLs, the
fleet's release-signing keys, and model releases built from them."""

from fleet_service.artifacts.delivery import release_urls, signing_keys
from fleet_service.artifacts.errors import (
    ArtifactError,
    BlobNotFoundError,
    ReleaseInvalidError,
    ReleaseNotAssignedError,
    SigningKeyError,
    StoreUnavailableError,
    UploadTooLargeError,
    UrlRefusedError,
)
from fleet_service.artifacts.releases import (
    ProgressHook,
    ReleaseFile,
    constraints_from,
    create_release,
    get_release,
    list_releases,
    release_public,
    resign_release,
    signed_manifest_of,
)
from fleet_service.artifacts.signing import ReleaseSigner, SigningKeyInfo
from fleet_service.artifacts.store import (
    ArtifactStore,
    StoredBlob,
    artifacts_dir,
    open_store,
)
from fleet_service.artifacts.urls import SignedUrl, UrlSigner

__all__ = [
    "ArtifactError",
    "ArtifactStore",
    "BlobNotFoundError",
    "ProgressHook",
    "ReleaseFile",
    "ReleaseInvalidError",
    "ReleaseNotAssignedError",
    "ReleaseSigner",
    "SignedUrl",
    "SigningKeyError",
    "SigningKeyInfo",
    "StoreUnavailableError",
    "StoredBlob",
    "UploadTooLargeError",
    "UrlRefusedError",
    "UrlSigner",
    "artifacts_dir",
    "constraints_from",
    "create_release",
    "get_release",
    "list_releases",
    "open_store",
    "release_public",
    "release_urls",
    "resign_release",
    "signed_manifest_of",
    "signing_keys",
]
