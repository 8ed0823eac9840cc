"""An owner's own identity provider (OIDC): check its bearer tokens against its published keys
and map one of their claims to an edgefleet role.

The issuer's discovery document (``/.well-known/openid-configuration``) names its JWKS; keys are
fetched with :class:`jwt.PyJWKClient` and cached (a key id the cache does not hold is fetched at
once, so the provider can rotate keys). Only asymmetric algorithms are accepted: a token signed
with a shared secret or with ``none`` is refused whatever it claims.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import jwt

from fleet_service.errors import AuthenticationError, ForbiddenError, ServiceError
from fleet_service.roles import Role

if TYPE_CHECKING:
    from fleet_service.config import ServiceSettings

__all__ = ["OidcIdentity", "OidcVerifier", "unverified_issuer"]

logger = logging.getLogger(__name__)

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
# Discovery and key fetches wait this long: a slow provider fails one login, not the API.
FETCH_TIMEOUT_S = 5.0
# Clock difference tolerated between the provider and this host when checking exp/nbf/iat.
LEEWAY_S = 30


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a JWT claims, without checking anything; None when it is no JWT."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None


def _same_issuer(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _check_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ServiceError(
            f"the identity provider's {what} {url} is not https; edgefleet fetches keys over "
            "https only (plain http on loopback)",
            status=503,
        )


@dataclass(frozen=True)
class OidcIdentity:
    """A caller vouched for by the identity provider."""

    name: str  # "oidc:<preferred_username, email or sub>"
    role: Role


class OidcVerifier:
    """Validates tokens of one issuer: signature (its JWKS), ``exp``, ``aud`` and ``iss``."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        role_claim: str = "roles",
        role_map: Mapping[str, str] | None = None,
        cache_s: int = 300,
        cooldown_s: float = 30.0,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.role_claim = role_claim
        self.role_map = {key: Role(value) for key, value in (role_map or {}).items()}
        self._cache_s = cache_s
        self._cooldown_s = cooldown_s
        self._jwks: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> OidcVerifier | None:
        """The verifier ``settings`` ask for, or None when no issuer is configured."""
        if settings.oidc_issuer is None or settings.oidc_audience is None:
            return None
        return cls(
            settings.oidc_issuer,
            settings.oidc_audience,
            role_claim=settings.oidc_role_claim,
            role_map=settings.oidc_role_map,
            cache_s=settings.oidc_jwks_cache_s,
            cooldown_s=settings.oidc_jwks_cooldown_s,
        )

    def owns(self, token: str) -> bool:
        """True when ``token`` claims to come from this issuer (nothing is verified yet)."""
        issuer = unverified_issuer(token)
        return issuer is not None and _same_issuer(issuer, self.issuer)

    def _keys(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._jwks is None:
                self._jwks = jwt.PyJWKClient(
                    self._discover(),
                    cache_jwk_set=True,
                    lifespan=self._cache_s,
                    timeout=FETCH_TIMEOUT_S,
                    cooldown_duration=self._cooldown_s,
                )
            return self._jwks

    def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        _check_url(url, "discovery document")
        try:
            response = httpx.get(url, timeout=FETCH_TIMEOUT_S)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServiceError(
                f"cannot read the identity provider's discovery document {url}: {exc}; check "
                "oidc_issuer and that the provider is reachable from this host",
                status=503,
            ) from exc
        issuer, jwks_uri = document.get("issuer"), document.get("jwks_uri")
        if not isinstance(issuer, str) or not _same_issuer(issuer, self.issuer):
            raise ServiceError(
                f"the discovery document at {url} names the issuer {issuer!r}, not "
                f"{self.issuer!r}; set oidc_issuer to exactly the provider's issuer",
                status=503,
            )
        if not isinstance(jwks_uri, str):
            raise ServiceError(f"the discovery document at {url} has no jwks_uri", status=503)
        _check_url(jwks_uri, "jwks_uri")
        return jwks_uri

    def verify(self, token: str) -> OidcIdentity:
        """The identity and role in a valid token of this issuer.

        :class:`AuthenticationError` when the token is not valid, :class:`ForbiddenError` when
        it is but maps to no role.
        """
        try:
            key = self._keys().get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise ServiceError(
                f"cannot fetch the signing keys of {self.issuer}: {exc}", status=503
            ) from exc
        except (jwt.PyJWKClientError, jwt.InvalidTokenError) as exc:
            raise AuthenticationError(
                f"the token is not signed by a key {self.issuer} publishes: {exc}"
            ) from exc
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError(
                f"the token from {self.issuer} expired; get a new one from your identity provider"
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError(
                f"the token from {self.issuer} is not meant for edgefleet (its audience is not "
                f"{self.audience!r})"
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError(f"invalid token from {self.issuer}: {exc}") from exc
        name = next(
            (
                str(claims[field])
                for field in ("preferred_username", "email", "sub")
                if isinstance(claims.get(field), str) and claims[field]
            ),
            "unknown",
        )
        return OidcIdentity(name=f"oidc:{name}"[:200], role=self._role(claims, name))

    def _role(self, claims: Mapping[str, Any], name: str) -> Role:
        raw = claims.get(self.role_claim)
        values = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        roles = [self._map(value) for value in values if isinstance(value, str)]
        granted = [role for role in roles if role is not None]
        if not granted:
            mapped = ", ".join(sorted(self.role_map)) or "admin, operator, viewer"
            raise ForbiddenError(
                f"{name} signed in through {self.issuer}, but the claim {self.role_claim!r} "
                f"({raw!r}) holds none of the values edgefleet maps to a role ({mapped}); ask "
                "the owner to add you to one, or to map yours in oidc_role_map"
            )
        return max(granted, key=lambda role: role.rank)

    def _map(self, value: str) -> Role | None:
        if self.role_map:
            return self.role_map.get(value)
        try:
            return Role(value)
        except ValueError:
            return None
