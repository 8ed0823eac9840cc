"""API tokens for automation: a role, an optional device tag, an expiry; shown once, stored
hashed, listed, revoked.

A token is sent as ``Authorization: Bearer eft_...``. Its secret is 256 random bits, so the
stored sha256 (:func:`fleet_service.keys.hash_secret`) is as good as argon2 and costs nothing
per request.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session, col, select

from fleet_service.errors import AuthenticationError, ConflictError, NotFoundError, ServiceError
from fleet_service.keys import hash_secret, parse_duration
from fleet_service.roles import Role, parse_tag
from fleet_service.tables import ApiToken

__all__ = [
    "TOKEN_PREFIX",
    "ApiTokenCreate",
    "ApiTokenCreated",
    "ApiTokenPublic",
    "authenticate_token",
    "create_token",
    "list_tokens",
    "revoke_token",
    "token_public",
    "token_tag",
]

TOKEN_PREFIX = "eft_"  # noqa: S105  (a prefix that tells tokens apart, not a secret)
DEFAULT_EXPIRY = "90d"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# last_used_at is written at most this often per token: automation calling many times a second
# must not turn every read into a write.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class ApiTokenCreate(BaseModel):
    """Body of ``POST /api/v1/tokens``."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=_NAME)]
    role: Role
    # "key=value": the token only sees and acts on devices carrying this tag.
    tag: Annotated[str, Field(max_length=200)] | None = None
    # How long it lives: 30m, 12h, 90d (at most the api_token_max_ttl_s setting).
    expires_in: Annotated[str, Field(max_length=16)] = DEFAULT_EXPIRY

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None:
            parse_tag(value)
        return value

    @field_validator("expires_in")
    @classmethod
    def _expiry(cls, value: str) -> str:
        parse_duration(value)
        return value


class ApiTokenPublic(BaseModel):
    """A token as listed: never its secret."""

    id: str
    name: str
    role: Role
    tag: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    state: Literal["active", "expired", "revoked"]


class ApiTokenCreated(BaseModel):
    """Answer to token creation: the only time the secret is shown."""

    token: ApiTokenPublic
    secret: str


def _state(row: ApiToken, now: datetime) -> Literal["active", "expired", "revoked"]:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at <= now:
        return "expired"
    return "active"


def token_public(row: ApiToken) -> ApiTokenPublic:
    """The API shape of a token row."""
    return ApiTokenPublic(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        tag=row.tag,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        state=_state(row, datetime.now(UTC)),
    )


def create_token(
    session: Session, body: ApiTokenCreate, *, created_by: str, max_ttl_s: int
) -> ApiTokenCreated:
    """Store a new token (hashed) and return it with its secret, shown this once."""
    ttl_s = parse_duration(body.expires_in)
    if ttl_s < 60:
        raise ServiceError(f"expires_in {body.expires_in}: a token must live at least 1 minute")
    if ttl_s > max_ttl_s:
        raise ServiceError(
            f"expires_in {body.expires_in} is longer than this fleet allows "
            f"({max_ttl_s // 86_400} days, setting api_token_max_ttl_s); ask for less"
        )
    if body.tag is not None and body.role is Role.ADMIN:
        raise ServiceError(
            "an admin token cannot be limited to a tag: admin actions (users, tokens, audit) "
            "are fleet-wide. Give the tag-scoped token the operator or viewer role"
        )
    taken = session.exec(
        select(ApiToken).where(
            ApiToken.name == body.name,
            col(ApiToken.revoked_at).is_(None),
            col(ApiToken.expires_at) > datetime.now(UTC),
        )
    ).first()
    if taken is not None:
        raise ConflictError(
            f"an active token is already named {body.name!r} ({taken.id}); revoke it or pick "
            "another name"
        )
    now = datetime.now(UTC)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id="tok-" + secrets.token_hex(8),
        name=body.name,
        token_hash=hash_secret(secret),
        role=body.role.value,
        tag=body.tag,
        created_by=created_by,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    session.add(row)
    return ApiTokenCreated(token=token_public(row), secret=secret)


def list_tokens(session: Session) -> list[ApiTokenPublic]:
    """Every token, newest first."""
    rows = session.exec(select(ApiToken).order_by(col(ApiToken.created_at).desc()))
    return [token_public(row) for row in rows]


def revoke_token(session: Session, token_id: str) -> ApiTokenPublic:
    """Revoke a token: the next request with it gets 401."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"API token {token_id!r} does not exist; `edgefleet tokens list`")
    if row.revoked_at is not None:
        raise ConflictError(f"API token {token_id} was already revoked")
    row.revoked_at = datetime.now(UTC)
    session.add(row)
    return token_public(row)


def authenticate_token(session: Session, secret: str) -> ApiToken:
    """The live token whose secret this is (its last use noted), or :class:`AuthenticationError`
    naming why not."""
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret))).first()
    if row is None:
        raise AuthenticationError("unknown API token; create one with `edgefleet tokens create`")
    now = datetime.now(UTC)
    if row.revoked_at is not None:
        raise AuthenticationError(
            f"API token {row.name!r} ({row.id}) was revoked at {row.revoked_at:%Y-%m-%d %H:%M %Z}"
            "; ask an admin for a new one"
        )
    if row.expires_at <= now:
        raise AuthenticationError(
            f"API token {row.name!r} ({row.id}) expired at {row.expires_at:%Y-%m-%d %H:%M %Z}; "
            "ask an admin for a new one"
        )
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.add(row)
    return row


def token_tag(row: ApiToken) -> tuple[str, str] | None:
    """The (key, value) a token is limited to, if any."""
    return parse_tag(row.tag) if row.tag else None
