"""The control plane's error tree; each maps to one problem+json response.

ServiceError
├── NotFoundError            404  a device, key or user does not exist
├── AuthenticationError      401  no, bad or expired operator credentials
├── ForbiddenError           403  the caller's role or tag scope does not cover the action
├── RateLimitedError         429  too many attempts; retry after the stated seconds
├── RegistrationKeyError     401/403  unknown, expired, used-up or revoked registration key
├── CsrRejectedError         422  the device's CSR is malformed or asks for too much
└── ConflictError            409  the action clashes with the current state
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "ForbiddenError",
    "NotFoundError",
    "RateLimitedError",
    "RegistrationKeyError",
    "ServiceError",
]


class ServiceError(Exception):
    """Base of errors that the API turns into problem+json."""

    status: ClassVar[int] = 400
    title: ClassVar[str] = "bad request"

    def __init__(self, detail: str, *, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status  # type: ignore[misc]  # per-instance override of the class default


class NotFoundError(ServiceError):
    """A requested object does not exist."""

    status = 404
    title = "not found"


class AuthenticationError(ServiceError):
    """Operator credentials are missing, wrong or expired."""

    status = 401
    title = "not authenticated"


class ForbiddenError(ServiceError):
    """The caller is known but their role or tag scope does not cover the action."""

    status = 403
    title = "forbidden"


class RateLimitedError(ServiceError):
    """Too many attempts from one user or address; the response carries Retry-After."""

    status = 429
    title = "too many requests"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class RegistrationKeyError(ServiceError):
    """A registration key cannot be used to enroll."""

    status = 403
    title = "registration key refused"


class ConflictError(ServiceError):
    """The request clashes with the current state."""

    status = 409
    title = "conflict"
