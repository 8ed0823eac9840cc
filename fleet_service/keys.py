"""Registration keys: create, list, revoke, and spend one atomically at enrollment."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from fleet_protocol import JoinToken
from fleet_service.errors import NotFoundError, RegistrationKeyError
from fleet_service.schemas import (
    RegistrationKeyCreate,
    RegistrationKeyCreated,
    RegistrationKeyPublic,
)
from fleet_service.tables import RegistrationKey

__all__ = [
    "consume_key",
    "create_key",
    "hash_secret",
    "list_keys",
    "parse_duration",
    "revoke_key",
]

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def hash_secret(secret: str) -> str:
    """Hex sha256 of a generated secret.

    Registration keys and device tokens are 256-bit random values, so a fast hash is enough to
    make a stolen database useless; argon2 is for low-entropy human passwords.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(text: str) -> int:
    """Seconds in ``30m``, ``24h``, ``7d``; raises ValueError with the accepted forms."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number and s, m, h or d (e.g. 24h)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _state(key: RegistrationKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at <= now:
        return "expired"
    if key.uses >= key.max_uses:
        return "used-up"
    return "active"


def _public(key: RegistrationKey, now: datetime) -> RegistrationKeyPublic:
    return RegistrationKeyPublic(
        id=key.id,
        created_at=key.created_at,
        expires_at=key.expires_at,
        max_uses=key.max_uses,
        uses=key.uses,
        tags=dict(key.tags),
        revoked_at=key.revoked_at,
        state=_state(key, now),
    )


def create_key(
    session: Session,
    request: RegistrationKeyCreate,
    *,
    created_by: str,
    service_url: str,
    ca_fingerprint: str,
) -> RegistrationKeyCreated:
    """Store a new key's hash and return the key and its join token, shown this once."""
    now = datetime.now(UTC)
    key_id = "key-" + secrets.token_hex(6)
    secret = "efk_" + secrets.token_urlsafe(32)
    row = RegistrationKey(
        id=key_id,
        key_hash=hash_secret(secret),
        created_at=now,
        expires_at=now + timedelta(seconds=request.expires_in_s),
        max_uses=request.max_uses,
        tags=dict(request.tags),
        created_by=created_by,
    )
    session.add(row)
    token = JoinToken.model_validate({"url": service_url, "key": secret, "ca": ca_fingerprint})
    return RegistrationKeyCreated(
        **_public(row, now).model_dump(), key=secret, join_token=token.encode()
    )


def list_keys(session: Session) -> list[RegistrationKeyPublic]:
    """Every key, newest first."""
    now = datetime.now(UTC)
    rows = session.exec(select(RegistrationKey).order_by(col(RegistrationKey.created_at).desc()))
    return [_public(row, now) for row in rows]


def revoke_key(session: Session, key_id: str) -> RegistrationKeyPublic:
    """Revoke a key; enrolled devices keep their identity. Revoking twice is harmless."""
    row = session.get(RegistrationKey, key_id)
    if row is None:
        raise NotFoundError(f"registration key {key_id!r} does not exist")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        session.add(row)
    return _public(row, datetime.now(UTC))


def consume_key(session: Session, secret: str) -> RegistrationKey:
    """Spend one use of the key ``secret``, or raise saying exactly why it cannot be used.

    The use is counted by one conditional UPDATE, so concurrent enrollments can never exceed
    ``max_uses`` on SQLite or PostgreSQL. The caller's transaction rolls it back on failure.
    """
    key_hash = hash_secret(secret)
    now = datetime.now(UTC)
    spent = session.execute(
        update(RegistrationKey)
        .where(
            col(RegistrationKey.key_hash) == key_hash,
            col(RegistrationKey.revoked_at).is_(None),
            col(RegistrationKey.expires_at) > now,
            col(RegistrationKey.uses) < col(RegistrationKey.max_uses),
        )
        .values(uses=col(RegistrationKey.uses) + 1)
    )
    row = session.exec(select(RegistrationKey).where(RegistrationKey.key_hash == key_hash)).first()
    if row is None:
        raise RegistrationKeyError(
            "registration key not recognised; check the join token or create a new key",
            status=401,
        )
    if spent.rowcount == 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
        return row
    state = _state(row, now)
    raise RegistrationKeyError(
        f"registration key {row.id} is {state}; ask the fleet owner for a new join token"
    )
