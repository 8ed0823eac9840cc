"""The artifact package's error tree; each maps to one problem+json response.

ServiceError
└── ArtifactError
    ├── BlobNotFoundError         404  no stored blob has that sha256
    ├── ReleaseInvalidError       422  a release cannot be built from what was given
    ├── UploadTooLargeError       413  an upload passed ``max_artifact_bytes``
    ├── UrlRefusedError           403  an artifact URL expired, was tampered with or is another
    │                                  device's (``reason``: expired|signature|device)
    ├── ReleaseNotAssignedError   403  a device asked for a release its desired state lacks
    ├── StoreUnavailableError     503  the S3 endpoint cannot be reached or refused the request
    └── SigningKeyError           500  the fleet's signing keys are missing, broken or exposed
"""

from __future__ import annotations

from fleet_service.errors import ServiceError

__all__ = [
    "ArtifactError",
    "BlobNotFoundError",
    "ReleaseInvalidError",
    "ReleaseNotAssignedError",
    "SigningKeyError",
    "StoreUnavailableError",
    "UploadTooLargeError",
    "UrlRefusedError",
]


class ArtifactError(ServiceError):
    """Base of the artifact store, release and URL errors."""


class BlobNotFoundError(ArtifactError):
    """No blob with this sha256 is stored."""

    status = 404
    title = "artifact not found"


class ReleaseInvalidError(ArtifactError):
    """The release request is invalid; the message names the field and the fix."""

    status = 422
    title = "invalid model release"


class UploadTooLargeError(ArtifactError):
    """An upload is larger than the ``max_artifact_bytes`` setting allows."""

    status = 413
    title = "upload too large"


class UrlRefusedError(ArtifactError):
    """A signed artifact URL is not valid (any more) for this request."""

    status = 403
    title = "artifact URL refused"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ReleaseNotAssignedError(ArtifactError):
    """The device asked for URLs of a release that is not in its desired state."""

    status = 403
    title = "release not assigned to this device"


class StoreUnavailableError(ArtifactError):
    """The artifact store (S3) could not be reached or refused the request."""

    status = 503
    title = "artifact store unavailable"


class SigningKeyError(ArtifactError):
    """The release signing keys cannot be used."""

    status = 500
    title = "signing key problem"
