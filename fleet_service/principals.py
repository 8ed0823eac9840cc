"""Who sent a bearer credential: a user's access token, an API token, or a token of the
owner's OIDC provider, each turned into a :class:`~fleet_service.roles.Principal`.

Every request re-reads what it depends on (the login session and the user, or the API token
row), so logout, disabling a user, changing their role or revoking a token takes effect on the
very next request, not when some token expires.
"""

from __future__ import annotations

from sqlalchemy import Engine

from fleet_service.api_tokens import TOKEN_PREFIX, authenticate_token, token_tag
from fleet_service.auth import TokenIssuer, session_user
from fleet_service.db import session_scope
from fleet_service.errors import AuthenticationError
from fleet_service.roles import Principal, Role

__all__ = ["resolve_bearer"]


def resolve_bearer(
    engine: Engine, tokens: TokenIssuer, credential: str, address: str | None
) -> Principal:
    """The principal behind ``credential``, or :class:`AuthenticationError` (401) saying why
    not, or :class:`ForbiddenError` (403) for an OIDC identity that maps to no role."""
    if credential.startswith(TOKEN_PREFIX):
        with session_scope(engine) as session:
            row = authenticate_token(session, credential)
            return Principal(
                name=f"token:{row.name}",
                kind="token",
                role=Role(row.role),
                tag=token_tag(row),
                address=address,
            )
    if tokens.oidc is not None and tokens.oidc.owns(credential):
        # Outside any database session: this may wait on the provider for its keys.
        identity = tokens.oidc.verify(credential)
        return Principal(name=identity.name, kind="oidc", role=identity.role, address=address)
    claims = tokens.verify(credential)
    with session_scope(engine) as session:
        user = session_user(session, claims.session_id)
    if user.username != claims.username:
        raise AuthenticationError("this access token does not match its session; log in again")
    return Principal(
        name=user.username,
        kind="user",
        role=Role(user.role),
        address=address,
        session_id=claims.session_id,
    )
