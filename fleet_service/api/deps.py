"""FastAPI dependencies as ``Annotated`` aliases: the context, a DB session, the operator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from fleet_service.context import ServiceContext
from fleet_service.db import session_scope
from fleet_service.errors import AuthenticationError

__all__ = ["ContextDep", "OperatorDep", "SessionDep"]

_bearer = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


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
