"""Operator authentication: argon2 password hashes and short-lived JWT access tokens."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import Session, select

from fleet_service.errors import AuthenticationError, ConflictError
from fleet_service.tables import User

__all__ = [
    "TokenIssuer",
    "authenticate",
    "create_user",
    "generate_password",
]

_hasher = PasswordHasher()
_AUDIENCE = "edgefleet-api"
_ALGORITHM = "HS256"
# Hashed once so an unknown username costs as much as a wrong password (no user enumeration).
_DUMMY_HASH = _hasher.hash("edgefleet-timing-equaliser")


def generate_password() -> str:
    """A password for a new admin, printed once by ``edgefleet init``."""
    return secrets.token_urlsafe(18)


def create_user(session: Session, username: str, password: str, role: str = "admin") -> User:
    """Add an operator; refuses a taken name."""
    if session.exec(select(User).where(User.username == username)).first():
        raise ConflictError(f"user {username!r} already exists")
    user = User(
        username=username,
        password_hash=_hasher.hash(password),
        role=role,
        created_at=datetime.now(UTC),
    )
    session.add(user)
    return user


def authenticate(session: Session, username: str, password: str) -> User:
    """The user whose password this is, or :class:`AuthenticationError`."""
    user = session.exec(select(User).where(User.username == username)).first()
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        user = None
    if user is None:
        raise AuthenticationError("incorrect username or password")
    return user


class TokenIssuer:
    """Issues and checks operator access tokens signed with the fleet's HMAC secret."""

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(self, user: User) -> str:
        """A signed access token for ``user``."""
        now = datetime.now(UTC)
        claims = {
            "sub": user.username,
            "role": user.role,
            "aud": _AUDIENCE,
            "iat": now,
            "exp": now + timedelta(seconds=self.ttl_s),
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> str:
        """The username in a valid token, or :class:`AuthenticationError` saying why not."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=_AUDIENCE,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("access token expired; log in again") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError("invalid access token; log in again") from exc
        return str(claims["sub"])
