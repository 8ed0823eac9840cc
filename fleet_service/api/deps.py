"""FastAPI dependencies as ``Annotated`` aliases: the context, a DB session, the calling
principal with the role a route needs, the calling device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, OAuth2PasswordBearer
from sqlmodel import Session, select

from fleet_service.context import ServiceContext
from fleet_service.db import session_scope
from fleet_service.errors import AuthenticationError, ForbiddenError
from fleet_service.keys import hash_secret
from fleet_service.principals import resolve_bearer
from fleet_service.roles import Principal, Role
from fleet_service.tables import Device

__all__ = [
    "AdminDep",
    "ContextDep",
    "DeviceIdDep",
    "FleetViewerDep",
    "OperatorDep",
    "OptionalDeviceIdDep",
    "PrincipalDep",
    "SessionDep",
    "ViewerDep",
    "client_address",
    "require_role",
]

_bearer = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)
_device_bearer = HTTPBearer(auto_error=False)


def _context(request: Request) -> ServiceContext:
    context: ServiceContext = request.app.state.context
    return context


ContextDep = Annotated[ServiceContext, Depends(_context)]


def _session(context: ContextDep) -> Iterator[Session]:
    with session_scope(context.engine) as session:
        yield session


# scope="function": commit before the response is sent, so a client that got 201 can rely on it.
SessionDep = Annotated[Session, Depends(_session, scope="function")]


def client_address(request: Request) -> str | None:
    """The address a request came from (what the audit log and rate limits key on)."""
    return request.client.host if request.client else None


def _principal(
    request: Request, context: ContextDep, token: Annotated[str | None, Depends(_bearer)]
) -> Principal:
    if not token:
        raise AuthenticationError(
            "log in first: send Authorization: Bearer <access token or API token>"
        )
    principal = resolve_bearer(context.engine, context.tokens, token, client_address(request))
    # Kept on the request so a refused or failed action can still be audited with its actor.
    request.state.principal = principal
    return principal


# Whoever sent a valid bearer credential, whatever their role.
PrincipalDep = Annotated[Principal, Depends(_principal)]


def require_role(needed: Role) -> Callable[[Principal], Principal]:
    """A dependency that passes principals whose role covers ``needed`` and refuses others."""

    def check(principal: PrincipalDep) -> Principal:
        if not principal.allows(needed):
            raise ForbiddenError(
                f"this action needs the {needed.value} role; {principal.name} is "
                f"{principal.role.value}. Ask an admin for a role that covers it"
            )
        if needed is Role.ADMIN and principal.tag is not None:
            key, value = principal.tag
            raise ForbiddenError(
                f"{principal.name} is limited to devices tagged {key}={value}; admin actions "
                "are fleet-wide, so they need a token without a tag"
            )
        return principal

    return check


ViewerDep = Annotated[Principal, Depends(require_role(Role.VIEWER))]  # reads
OperatorDep = Annotated[Principal, Depends(require_role(Role.OPERATOR))]  # acts on the fleet
AdminDep = Annotated[Principal, Depends(require_role(Role.ADMIN))]  # manages access


def _fleet_wide(principal: ViewerDep) -> Principal:
    if principal.tag is not None:
        raise ForbiddenError(
            f"this credential is limited to devices tagged {principal.tag}, and these figures "
            "cover the whole fleet; use a credential without a tag"
        )
    return principal


# Fleet-wide aggregates (/metrics, the fleet page): a tag-scoped viewer would learn the size
# and activity of devices outside its tag.
FleetViewerDep = Annotated[Principal, Depends(_fleet_wide)]


DeviceCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_device_bearer)]


def _optional_device_id(context: ContextDep, credentials: DeviceCredentials) -> str | None:
    if credentials is None:
        return None
    with session_scope(context.engine) as session:
        token_hash = hash_secret(credentials.credentials)
        device = session.exec(select(Device).where(Device.token_hash == token_hash)).first()
    if device is None:
        raise AuthenticationError("unknown device token; re-enroll the device")
    if device.revoked_at is not None:
        # Its token dies with its certificates: no HTTPS fallback, no artifact downloads.
        raise AuthenticationError(
            f"device {device.id} was revoked at {device.revoked_at.isoformat()}; its token no "
            "longer works. Enroll the device again (with a new key) if it should rejoin"
        )
    return device.id


def _device_id(device_id: Annotated[str | None, Depends(_optional_device_id)]) -> str:
    if device_id is None:
        raise AuthenticationError("send the device token as Authorization: Bearer <token>")
    return device_id


# The device whose enrollment token the request carries (401 without one, or an unknown one).
DeviceIdDep = Annotated[str, Depends(_device_id)]
# The same where the token is optional (a signed artifact URL is its own credential).
OptionalDeviceIdDep = Annotated[str | None, Depends(_optional_device_id)]
