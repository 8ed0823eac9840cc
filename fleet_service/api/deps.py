"""FastAPI dependencies as ``Annotated`` aliases: the context, a DB session, the operator, the
calling device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, OAuth2PasswordBearer
from sqlmodel import Session, select

from fleet_service.context import ServiceContext
from fleet_service.db import session_scope
from fleet_service.errors import AuthenticationError
from fleet_service.keys import hash_secret
from fleet_service.tables import Device

__all__ = ["ContextDep", "DeviceIdDep", "OperatorDep", "OptionalDeviceIdDep", "SessionDep"]

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


def _operator(context: ContextDep, token: Annotated[str | None, Depends(_bearer)]) -> str:
    if not token:
        raise AuthenticationError("log in first: send Authorization: Bearer <access token>")
    return context.tokens.verify(token)


OperatorDep = Annotated[str, Depends(_operator)]


DeviceCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_device_bearer)]


def _optional_device_id(context: ContextDep, credentials: DeviceCredentials) -> str | None:
    if credentials is None:
        return None
    with session_scope(context.engine) as session:
        token_hash = hash_secret(credentials.credentials)
        device = session.exec(select(Device).where(Device.token_hash == token_hash)).first()
    if device is None:
        raise AuthenticationError("unknown device token; re-enroll the device")
    return device.id


def _device_id(device_id: Annotated[str | None, Depends(_optional_device_id)]) -> str:
    if device_id is None:
        raise AuthenticationError("send the device token as Authorization: Bearer <token>")
    return device_id


# The device whose enrollment token the request carries (401 without one, or an unknown one).
DeviceIdDep = Annotated[str, Depends(_device_id)]
# The same where the token is optional (a signed artifact URL is its own credential).
OptionalDeviceIdDep = Annotated[str | None, Depends(_optional_device_id)]
