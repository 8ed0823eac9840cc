"""Operator login (OAuth2 password flow), refresh, logout and who-am-I."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel, ConfigDict, Field

from fleet_service.api.audit_trail import record_unverified, unverified_event
from fleet_service.api.deps import ContextDep, PrincipalDep, SessionDep, client_address
from fleet_service.audit import record
from fleet_service.auth import (
    LoginTokens,
    RefreshReusedError,
    authenticate,
    refresh_session,
    revoke_session,
    start_session,
)
from fleet_service.db import session_scope
from fleet_service.errors import AuthenticationError, ServiceError
from fleet_service.roles import Principal, Role

__all__ = ["router"]

router = APIRouter(prefix="/auth", tags=["auth"])


class RefreshRequest(BaseModel):
    """Body of ``POST /api/v1/auth/refresh``."""

    model_config = ConfigDict(extra="forbid")

    refresh_token: Annotated[str, Field(min_length=1, max_length=200)]


class Me(BaseModel):
    """The caller as the service sees them."""

    name: str
    kind: Literal["user", "token", "oidc", "cli", "system"]
    role: Role
    tag: str | None


@router.post("/token", name="auth.login")
def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    request: Request,
    context: ContextDep,
    session: SessionDep,
) -> LoginTokens:
    """Exchange a username and password for an access token and a refresh token.

    Limited per username and per client address (429 with Retry-After past the limit)."""
    address = client_address(request)
    # This route writes its own audit events, failed ones included.
    request.state.audited = True
    try:
        context.limits.hit("login-address", address or "-", what=f"login attempts from {address}")
        # Usernames are at most 64 characters: a longer one is counted by its first 64.
        claimed = form.username[:64]
        context.limits.hit("login-user", claimed, what=f"login attempts for {claimed!r}")
        user = authenticate(session, form.username, form.password)
    except ServiceError as exc:
        record_unverified(
            context.engine,
            form.username or "anonymous",
            "auth.login",
            form.username,
            outcome="failed" if isinstance(exc, AuthenticationError) else "denied",
            detail={"reason": exc.detail},
            address=address,
        )
        raise
    tokens = start_session(session, user, context.tokens, address=address)
    who = Principal(name=user.username, kind="user", role=Role(user.role), address=address)
    record(session, who, "auth.login", user.username)
    return tokens


@router.post("/refresh", name="auth.refresh")
def refresh(
    body: RefreshRequest, request: Request, context: ContextDep, session: SessionDep
) -> LoginTokens:
    """A new access token and a new refresh token for a refresh token, which is then spent.
    Presenting a spent one again revokes the whole session."""
    address = client_address(request)
    request.state.audited = True
    try:
        tokens, user = refresh_session(session, body.refresh_token, context.tokens)
    except RefreshReusedError as exc:
        session.rollback()  # frees SQLite's write lock for the revocation below
        with session_scope(context.engine) as apart:
            revoke_session(apart, exc.session_id)
            reason = "a spent refresh token was presented again: the session is revoked"
            apart.add(
                unverified_event(
                    exc.username,
                    "auth.refresh",
                    exc.username,
                    "denied",
                    {"reason": reason},
                    address,
                )
            )
        raise
    except AuthenticationError as exc:
        record_unverified(
            context.engine,
            "anonymous",
            "auth.refresh",
            None,
            outcome="denied",
            detail={"reason": exc.detail},
            address=address,
        )
        raise
    who = Principal(name=user.username, kind="user", role=Role(user.role), address=address)
    record(session, who, "auth.refresh", user.username)
    return tokens


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, name="auth.logout")
def logout(principal: PrincipalDep, session: SessionDep) -> Response:
    """End the caller's login session: its access and refresh tokens stop working at once."""
    if principal.session_id is None:
        raise ServiceError(
            f"{principal.name} is not a login session; an API token is revoked with "
            "POST /api/v1/tokens/{id}/revoke"
        )
    revoke_session(session, principal.session_id)
    record(session, principal, "auth.logout", principal.name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/me")
def me(principal: PrincipalDep) -> Me:
    """Who the caller is, with their role and the tag they are limited to (if any)."""
    tag = "=".join(principal.tag) if principal.tag else None
    return Me(name=principal.name, kind=principal.kind, role=principal.role, tag=tag)
