"""Registration keys: create (shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, status

from fleet_service.api.deps import ContextDep, OperatorDep, SessionDep
from fleet_service.keys import create_key, list_keys, revoke_key
from fleet_service.schemas import (
    RegistrationKeyCreate,
    RegistrationKeyCreated,
    RegistrationKeyPublic,
)

__all__ = ["router"]

router = APIRouter(prefix="/keys", tags=["registration keys"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create(
    body: RegistrationKeyCreate, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> RegistrationKeyCreated:
    """Create a key; the answer holds the key and its join token, which are never shown again."""
    return create_key(
        session,
        body,
        created_by=operator,
        service_url=context.settings.service_url,
        ca_fingerprint=context.authority.fingerprint,
    )


@router.get("")
def list_all(session: SessionDep, _operator: OperatorDep) -> list[RegistrationKeyPublic]:
    """Every key with its state (active, expired, used-up, revoked)."""
    return list_keys(session)


@router.post("/{key_id}/revoke")
def revoke(key_id: str, session: SessionDep, _operator: OperatorDep) -> RegistrationKeyPublic:
    """Stop a key from enrolling more devices; devices already enrolled are unaffected."""
    return revoke_key(session, key_id)
