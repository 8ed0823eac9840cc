"""Operator accounts [admin]: list, create (password shown once), change."""

from __future__ import annotations

from fastapi import APIRouter, status

from fleet_service.api.deps import AdminDep, SessionDep
from fleet_service.audit import record
from fleet_service.users import (
    UserCreate,
    UserCreated,
    UserPublic,
    UserUpdate,
    add_user,
    list_users,
    update_user,
    user_public,
)

__all__ = ["router"]

router = APIRouter(prefix="/users", tags=["users"])


@router.get("")
def list_all(session: SessionDep, _admin: AdminDep) -> list[UserPublic]:
    """Every user with role, last login and whether disabled."""
    return list_users(session)


@router.post("", status_code=status.HTTP_201_CREATED, name="user.create")
def create(body: UserCreate, session: SessionDep, admin: AdminDep) -> UserCreated:
    """Create a user; without a password one is generated. The password is shown only here."""
    created = add_user(session, body)
    detail = {"role": body.role.value, "password": "given" if body.password else "generated"}
    record(session, admin, "user.create", body.username, detail=detail)
    return created


@router.patch("/{username}", name="user.update")
def update(username: str, body: UserUpdate, session: SessionDep, admin: AdminDep) -> UserPublic:
    """Change a user's role, disable or enable them, or set their password. Disabling and a new
    password end their sessions at once."""
    user, changed = update_user(session, username, body)
    detail: dict[str, object] = {"changed": changed}
    if "role" in changed:
        detail["role"] = user.role
    record(session, admin, "user.update", username, detail=detail)
    return user_public(user)
