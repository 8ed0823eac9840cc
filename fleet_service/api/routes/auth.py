"""Operator login (OAuth2 password flow)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import OAuth2PasswordRequestForm

from fleet_service.api.deps import ContextDep, SessionDep
from fleet_service.auth import authenticate
from fleet_service.schemas import TokenResponse

__all__ = ["router"]

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/token")
def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    context: ContextDep,
    session: SessionDep,
) -> TokenResponse:
    """Exchange a username and password for a bearer access token."""
    user = authenticate(session, form.username, form.password)
    return TokenResponse(access_token=context.tokens.issue(user), expires_in=context.tokens.ttl_s)
