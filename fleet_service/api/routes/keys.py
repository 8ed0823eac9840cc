"""Registration keys: create (shown once), list, revoke.

A tag-scoped API token handles only keys whose tags include its own, so every device it lets
enroll lands inside its reach.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlmodel import Session

from fleet_service.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from fleet_service.audit import record
from fleet_service.errors import ForbiddenError, NotFoundError
from fleet_service.keys import create_key, list_keys, revoke_key
from fleet_service.roles import Principal
from fleet_service.schemas import (
    RegistrationKeyCreate,
    RegistrationKeyCreated,
    RegistrationKeyPublic,
)

__all__ = ["router"]

router = APIRouter(prefix="/keys", tags=["registration keys"])


@router.post("", status_code=status.HTTP_201_CREATED, name="key.create")
def create(
    body: RegistrationKeyCreate, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> RegistrationKeyCreated:
    """Create a key; the answer holds the key and its join token, which are never shown again."""
    if not operator.sees(body.tags):
        key, value = operator.tag or ("", "")
        raise ForbiddenError(
            f"{operator.name} is limited to devices tagged {key}={value}: give the key that tag "
            f'("tags": {{"{key}": "{value}"}}) so the devices it enrolls carry it'
        )
    created = create_key(
        session,
        body,
        created_by=operator.name,
        service_url=context.settings.service_url,
        ca_fingerprint=context.authority.fingerprint,
    )
    detail: dict[str, object] = {"max_uses": created.max_uses, "tags": created.tags}
    detail["expires_at"] = created.expires_at.isoformat()
    record(session, operator, "key.create", created.id, detail=detail)
    return created


@router.get("")
def list_all(session: SessionDep, viewer: ViewerDep) -> list[RegistrationKeyPublic]:
    """Every key with its state (active, expired, used-up, revoked)."""
    return [key for key in list_keys(session) if viewer.sees(key.tags)]


def _visible(session: Session, key_id: str, caller: Principal) -> None:
    if caller.tag is None:
        return
    if not any(key.id == key_id and caller.sees(key.tags) for key in list_keys(session)):
        raise NotFoundError(f"registration key {key_id!r} does not exist")


@router.post("/{key_id}/revoke", name="key.revoke")
def revoke(key_id: str, session: SessionDep, operator: OperatorDep) -> RegistrationKeyPublic:
    """Stop a key from enrolling more devices; devices already enrolled are unaffected."""
    _visible(session, key_id, operator)
    revoked = revoke_key(session, key_id)
    record(session, operator, "key.revoke", key_id)
    return revoked
