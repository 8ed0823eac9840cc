"""Registration-key commands run on the control-plane host, straight against its database."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlmodel import Session

from fleet_service import audit
from fleet_service.authority import CertificateAuthority
from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine, migrate, session_scope
from fleet_service.home import FleetHome
from fleet_service.keys import create_key, list_keys, parse_duration, revoke_key
from fleet_service.roles import Principal
from fleet_service.schemas import (
    RegistrationKeyCreate,
    RegistrationKeyCreated,
    RegistrationKeyPublic,
)

__all__ = ["create", "in_session", "list_all", "revoke"]

T = TypeVar("T")


def in_session(settings: ServiceSettings, work: Callable[[Session], T]) -> T:
    FleetHome(settings.home).require_initialised()
    url = settings.resolved_database_url
    migrate(url)
    engine = create_db_engine(url)
    try:
        with session_scope(engine) as session:
            return work(session)
    finally:
        engine.dispose()


def create(
    settings: ServiceSettings, expires: str, max_uses: int, tags: dict[str, str]
) -> RegistrationKeyCreated:
    """Create a key as the local admin."""
    request = RegistrationKeyCreate(
        expires_in_s=parse_duration(expires), max_uses=max_uses, tags=tags
    )
    fingerprint = CertificateAuthority.load(FleetHome(settings.home)).fingerprint
    actor = Principal.cli()

    def work(session: Session) -> RegistrationKeyCreated:
        created = create_key(
            session,
            request,
            created_by=actor.name,
            service_url=settings.service_url,
            ca_fingerprint=fingerprint,
        )
        detail = {"max_uses": max_uses, "expires_in_s": request.expires_in_s, "tags": tags}
        audit.record(session, actor, "key.create", created.id, detail=detail)
        return created

    return in_session(settings, work)


def list_all(settings: ServiceSettings) -> list[RegistrationKeyPublic]:
    """Every key."""
    return in_session(settings, list_keys)


def revoke(settings: ServiceSettings, key_id: str) -> RegistrationKeyPublic:
    """Revoke one key."""

    def work(session: Session) -> RegistrationKeyPublic:
        revoked = revoke_key(session, key_id)
        audit.record(session, Principal.cli(), "key.revoke", key_id)
        return revoked

    return in_session(settings, work)
