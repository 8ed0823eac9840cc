"""Operator authentication: argon2 passwords, login sessions with rotating refresh tokens, and
short-lived JWT access tokens that name their session.

A login creates an :class:`~fleet_service.tables.AuthSession` holding the hash of a refresh
token. Access tokens carry the session id (``sid``) and every request checks that session, so
logout, disabling the user, or reuse of a spent refresh token stops them at once. A refresh
token is good for one refresh: it is replaced by a new one each time, and presenting an old one
again (someone copied it) revokes the whole session.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from fleet_service.config import ServiceSettings
from fleet_service.errors import AuthenticationError, ConflictError
from fleet_service.keys import hash_secret
from fleet_service.oidc import OidcVerifier
from fleet_service.tables import AuthSession, User

__all__ = [
    "REFRESH_PREFIX",
    "AccessClaims",
    "LoginTokens",
    "RefreshReusedError",
    "TokenIssuer",
    "authenticate",
    "create_user",
    "generate_password",
    "hash_password",
    "refresh_session",
    "revoke_session",
    "revoke_user_sessions",
    "session_user",
    "start_session",
]

_hasher = PasswordHasher()
AUDIENCE = "edgefleet-api"
_ALGORITHM = "HS256"
REFRESH_PREFIX = "efr_"
# Ended sessions stay this long (the audit log, not this table, is the record of logins).
_KEEP_ENDED = timedelta(days=7)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username is unknown, so it costs as much as a wrong password
    (no user enumeration). Made on first use: hashing costs ~0.2 s, which every CLI command and
    process start importing this module would otherwise pay."""
    return _hasher.hash("edgefleet-timing-equaliser")


def generate_password() -> str:
    """A password for a new user, shown once."""
    return secrets.token_urlsafe(18)


def hash_password(password: str) -> str:
    """The argon2 hash stored for ``password``."""
    return _hasher.hash(password)


def create_user(session: Session, username: str, password: str, role: str = "admin") -> User:
    """Add an operator; refuses a taken name."""
    if session.exec(select(User).where(User.username == username)).first():
        raise ConflictError(f"user {username!r} already exists")
    user = User(
        username=username,
        password_hash=hash_password(password),
        role=role,
        created_at=datetime.now(UTC),
    )
    session.add(user)
    return user


def authenticate(session: Session, username: str, password: str) -> User:
    """The enabled user whose password this is, or :class:`AuthenticationError`."""
    user = session.exec(select(User).where(User.username == username)).first()
    try:
        _hasher.verify(user.password_hash if user else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        user = None
    if user is None:
        raise AuthenticationError("incorrect username or password")
    # Said only to someone who knows the password, so it reveals nothing to a guesser.
    if user.disabled_at is not None:
        raise AuthenticationError(f"user {username!r} is disabled; an admin can enable it again")
    return user


@dataclass(frozen=True)
class AccessClaims:
    """What a valid access token says: who, and which login session it belongs to."""

    username: str
    session_id: str


class LoginTokens(BaseModel):
    """Answer to a login or a refresh (OAuth2 password flow, plus a refresh token)."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105  (the OAuth2 token type)
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    username: str
    role: str


class TokenIssuer:
    """Issues and checks access tokens signed with the fleet's HMAC secret; knows the external
    OIDC issuer when one is configured."""

    def __init__(
        self,
        secret: bytes,
        ttl_s: int,
        *,
        refresh_ttl_s: int = 12 * 3600,
        oidc: OidcVerifier | None = None,
    ) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self.oidc = oidc

    @classmethod
    def from_settings(cls, settings: ServiceSettings, secret: bytes) -> TokenIssuer:
        """The issuer a service with ``settings`` uses."""
        return cls(
            secret,
            settings.access_token_ttl_s,
            refresh_ttl_s=settings.refresh_token_ttl_s,
            oidc=OidcVerifier.from_settings(settings),
        )

    def issue(self, user: User, session_id: str) -> str:
        """A signed access token for ``user`` in login session ``session_id``."""
        now = datetime.now(UTC)
        claims = {
            "sub": user.username,
            "role": user.role,  # informative: each request reads the current role
            "sid": session_id,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + timedelta(seconds=self.ttl_s),
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid token, or :class:`AuthenticationError` saying why not."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=AUDIENCE,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError(
                "access token expired; refresh it (POST /api/v1/auth/refresh) or log in again"
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError(
                "access token is meant for another service (wrong audience); log in here"
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError("invalid access token; log in again") from exc
        if not isinstance(claims.get("sid"), str):
            # Signed with the fleet secret but names no login session: never issued by this
            # version, so it cannot be logged out and is not accepted.
            raise AuthenticationError("access token without a session; log in again")
        return AccessClaims(str(claims["sub"]), claims["sid"])


def _refresh_token(session_id: str) -> tuple[str, str]:
    """A new refresh token for ``session_id`` and its hash."""
    token = f"{REFRESH_PREFIX}{session_id}_{secrets.token_urlsafe(32)}"
    return token, hash_secret(token)


def _answer(tokens: TokenIssuer, user: User, auth: AuthSession, refresh: str) -> LoginTokens:
    now = datetime.now(UTC)
    return LoginTokens(
        access_token=tokens.issue(user, auth.id),
        expires_in=tokens.ttl_s,
        refresh_token=refresh,
        refresh_expires_in=max(0, int((auth.expires_at - now).total_seconds())),
        username=user.username,
        role=user.role,
    )


def start_session(
    session: Session, user: User, tokens: TokenIssuer, *, address: str | None
) -> LoginTokens:
    """Open a login session for ``user`` (who just proved their password)."""
    assert user.id is not None  # a stored user
    now = datetime.now(UTC)
    session_id = secrets.token_hex(16)
    refresh, refresh_hash = _refresh_token(session_id)
    auth = AuthSession(
        id=session_id,
        user_id=user.id,
        refresh_hash=refresh_hash,
        created_at=now,
        expires_at=now + timedelta(seconds=tokens.refresh_ttl_s),
        last_used_at=now,
        address=address[:64] if address else None,
    )
    user.last_login_at = now
    session.add(auth)
    session.add(user)
    # Sessions of this user that ended long ago are of no further use: each login tidies up.
    session.execute(
        delete(AuthSession).where(
            col(AuthSession.user_id) == user.id,
            col(AuthSession.expires_at) < now - _KEEP_ENDED,
        )
    )
    return _answer(tokens, user, auth, refresh)


class RefreshReusedError(AuthenticationError):
    """A spent refresh token came back: someone else holds a copy. The session must end."""

    def __init__(self, session_id: str, username: str) -> None:
        super().__init__(
            "this refresh token was already used, so a copy of it may be in other hands: the "
            "session is now revoked; log in again"
        )
        self.session_id = session_id
        self.username = username


def _live_user(session: Session, auth: AuthSession, now: datetime) -> User:
    """The user of a session that is still good, or :class:`AuthenticationError`."""
    if auth.revoked_at is not None:
        raise AuthenticationError("this session has ended (logged out or revoked); log in again")
    if auth.expires_at <= now:
        raise AuthenticationError("this session has expired; log in again")
    user = session.get(User, auth.user_id)
    if user is None:
        raise AuthenticationError("the user of this session no longer exists; log in again")
    if user.disabled_at is not None:
        raise AuthenticationError(
            f"user {user.username!r} is disabled; an admin can enable it again"
        )
    return user


def refresh_session(
    session: Session, refresh_token: str, tokens: TokenIssuer
) -> tuple[LoginTokens, User]:
    """Swap a refresh token for a new access token and a new refresh token.

    Raises :class:`RefreshReusedError` when the token is one this session already spent; the
    caller revokes the session in its own transaction (this one is rolled back by the error).
    """
    prefix, _, rest = refresh_token.partition(REFRESH_PREFIX)
    session_id, sep, secret = rest.partition("_")
    if prefix or not sep or not secret or len(session_id) != 32:
        raise AuthenticationError("not a refresh token; log in again")
    now = datetime.now(UTC)
    auth = session.get(AuthSession, session_id)
    if auth is None:
        raise AuthenticationError("unknown refresh token; log in again")
    user = _live_user(session, auth, now)
    refresh, refresh_hash = _refresh_token(session_id)
    # Swapped only if the presented token is still the current one: of two refreshes racing
    # with one token, exactly one wins, on SQLite as on PostgreSQL.
    swapped = session.execute(
        update(AuthSession)
        .where(
            col(AuthSession.id) == session_id,
            col(AuthSession.refresh_hash) == hash_secret(refresh_token),
            col(AuthSession.revoked_at).is_(None),
        )
        .values(refresh_hash=refresh_hash, last_used_at=now)
    )
    if swapped.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
        raise RefreshReusedError(session_id, user.username)
    session.refresh(auth)
    return _answer(tokens, user, auth, refresh), user


def session_user(session: Session, session_id: str) -> User:
    """The user of a live login session (checked on every request with an access token)."""
    auth = session.get(AuthSession, session_id)
    if auth is None:
        raise AuthenticationError("this session does not exist; log in again")
    return _live_user(session, auth, datetime.now(UTC))


def revoke_session(session: Session, session_id: str) -> bool:
    """End one login session; False when it had already ended."""
    result = session.execute(
        update(AuthSession)
        .where(col(AuthSession.id) == session_id, col(AuthSession.revoked_at).is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]  # CursorResult of an UPDATE


def revoke_user_sessions(session: Session, user: User) -> int:
    """End every live session of ``user``; how many there were."""
    result = session.execute(
        update(AuthSession)
        .where(col(AuthSession.user_id) == user.id, col(AuthSession.revoked_at).is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # CursorResult of an UPDATE
