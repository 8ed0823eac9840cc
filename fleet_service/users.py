"""Operator accounts managed by admins: list, create, change role, disable, reset password.

Disabling a user or changing their password ends their login sessions at once. The last enabled
admin can be neither demoted nor disabled, so a fleet always keeps someone who can manage it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func
from sqlmodel import Session, col, select

from fleet_service.auth import (
    create_user,
    generate_password,
    hash_password,
    revoke_user_sessions,
)
from fleet_service.errors import ConflictError, NotFoundError
from fleet_service.roles import Role
from fleet_service.tables import User

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "UserCreate",
    "UserCreated",
    "UserPublic",
    "UserUpdate",
    "add_user",
    "get_user",
    "list_users",
    "update_user",
    "user_public",
]

USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
# Below this a password falls to an offline guess even through argon2; generated ones are 24.
MIN_PASSWORD_LENGTH = 12
Password = Annotated[str, Field(min_length=MIN_PASSWORD_LENGTH, max_length=1024)]


class UserPublic(BaseModel):
    """An operator account as listed."""

    username: str
    role: Role
    created_at: datetime
    last_login_at: datetime | None
    disabled: bool


class UserCreate(BaseModel):
    """Body of ``POST /api/v1/users``; without a password one is generated and shown once."""

    model_config = ConfigDict(extra="forbid")

    username: Annotated[str, Field(pattern=USERNAME_PATTERN)]
    role: Role
    password: Password | None = None


class UserCreated(BaseModel):
    """Answer to user creation: the password is shown only here."""

    user: UserPublic
    password: str


class UserUpdate(BaseModel):
    """Body of ``PATCH /api/v1/users/{username}``: each field given is changed."""

    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    disabled: bool | None = None
    password: Password | None = None


def user_public(user: User) -> UserPublic:
    """The API shape of a user."""
    return UserPublic(
        username=user.username,
        role=Role(user.role),
        created_at=user.created_at,
        last_login_at=user.last_login_at,
        disabled=user.disabled_at is not None,
    )


def list_users(session: Session) -> list[UserPublic]:
    """Every user, by name."""
    return [user_public(u) for u in session.exec(select(User).order_by(col(User.username)))]


def get_user(session: Session, username: str) -> User:
    """One user, or :class:`NotFoundError`."""
    user = session.exec(select(User).where(User.username == username)).first()
    if user is None:
        raise NotFoundError(f"user {username!r} does not exist; `edgefleet users list`")
    return user


def add_user(session: Session, body: UserCreate) -> UserCreated:
    """Create a user; the password is the one given or a generated one."""
    password = body.password or generate_password()
    user = create_user(session, body.username, password, role=body.role.value)
    return UserCreated(user=user_public(user), password=password)


def _other_enabled_admins(session: Session, user: User) -> int:
    return session.exec(
        select(func.count())
        .select_from(User)
        .where(User.role == Role.ADMIN.value, col(User.disabled_at).is_(None), User.id != user.id)
    ).one()


def update_user(session: Session, username: str, body: UserUpdate) -> tuple[User, list[str]]:
    """Apply ``body`` to ``username``; the user and what changed (for the audit log)."""
    user = get_user(session, username)
    changed: list[str] = []
    losing_admin = (body.role is not None and body.role is not Role.ADMIN) or body.disabled
    if (
        losing_admin
        and user.role == Role.ADMIN.value
        and user.disabled_at is None
        and _other_enabled_admins(session, user) == 0
    ):
        raise ConflictError(
            f"{username} is the last enabled admin; make another user admin first, or nobody "
            "could manage users any more"
        )
    if body.role is not None and body.role.value != user.role:
        user.role = body.role.value
        changed.append("role")
    if body.disabled is not None and body.disabled != (user.disabled_at is not None):
        user.disabled_at = datetime.now(UTC) if body.disabled else None
        changed.append("disabled" if body.disabled else "enabled")
    if body.password is not None:
        user.password_hash = hash_password(body.password)
        changed.append("password")
    if "disabled" in changed or "password" in changed:
        # Whoever held a session of theirs must not keep it past this.
        revoke_user_sessions(session, user)
    session.add(user)
    return user, changed
