"""API tokens for automation [admin]: create (secret shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, status

from fleet_service.api.deps import AdminDep, ContextDep, SessionDep
from fleet_service.api_tokens import (
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenPublic,
    create_token,
    list_tokens,
    revoke_token,
)
from fleet_service.audit import record

__all__ = ["router"]

router = APIRouter(prefix="/tokens", tags=["API tokens"])


@router.post("", status_code=status.HTTP_201_CREATED, name="token.create")
def create(
    body: ApiTokenCreate, context: ContextDep, session: SessionDep, admin: AdminDep
) -> ApiTokenCreated:
    """Create a token with a role, an optional tag (``site=lab``) and an expiry (default 90d).
    The secret (``eft_...``) is in this answer only; send it as ``Authorization: Bearer``."""
    created = create_token(
        session,
        body,
        created_by=admin.name,
        max_ttl_s=context.settings.api_token_max_ttl_s,
    )
    token = created.token
    detail = {"name": token.name, "role": token.role.value, "tag": token.tag}
    detail["expires_at"] = token.expires_at.isoformat()
    record(session, admin, "token.create", token.id, detail=detail)
    return created


@router.get("")
def list_all(session: SessionDep, _admin: AdminDep) -> list[ApiTokenPublic]:
    """Every token with its state (active, expired, revoked) and last use; never a secret."""
    return list_tokens(session)


@router.post("/{token_id}/revoke", name="token.revoke")
def revoke(token_id: str, session: SessionDep, admin: AdminDep) -> ApiTokenPublic:
    """Revoke a token: its next request gets 401."""
    token = revoke_token(session, token_id)
    record(session, admin, "token.revoke", token_id, detail={"name": token.name})
    return token
