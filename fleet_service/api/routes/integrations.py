"""Third-party integrations: create (the key is shown once), list, revoke."""

from __future__ import annotations

import anyio.from_thread
from fastapi import APIRouter, status

from fleet_service import audit
from fleet_service.api.deps import AdminDep, ContextDep, SessionDep
from fleet_service.errors import ServiceError
from fleet_service.integrations import (
    IntegrationCreate,
    IntegrationCreated,
    IntegrationPublic,
    create_integration,
    list_integrations,
    revoke_integration,
)

__all__ = ["router"]

router = APIRouter(prefix="/integrations", tags=["integrations"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "an integration with this name exists"}},
    name="integration.create",
)
def create(
    body: IntegrationCreate, context: ContextDep, session: SessionDep, admin: AdminDep
) -> IntegrationCreated:
    """Issue a client certificate bundle that may read the granted topics of every device (or
    of the devices carrying ``tag``) and nothing else. The key is in this answer only."""
    settings = context.settings
    try:
        created = create_integration(
            session,
            body,
            admin,
            context.authority,
            broker_host=settings.advertise_host,
            broker_port=settings.mqtt_port,
            topic_prefix=settings.topic_prefix,
            cert_days=settings.integration_cert_days,
        )
        session.commit()
    except ServiceError as exc:
        session.rollback()
        audit.record_apart(
            context.engine,
            admin,
            "integration.create",
            body.name,
            outcome="failed",
            detail={"error": exc.detail},
        )
        raise
    # Committed: the bundle works as soon as the caller has it (its grants are in the ACL).
    anyio.from_thread.run(context.apply_broker_policy)
    return created


@router.get("")
def list_all(session: SessionDep, _admin: AdminDep) -> list[IntegrationPublic]:
    """Every integration, revoked ones included; keys are never shown again."""
    return list_integrations(session)


@router.post(
    "/{integration_id}/revoke",
    responses={
        404: {"description": "no such integration"},
        409: {"description": "already revoked"},
    },
    name="integration.revoke",
)
def revoke(
    integration_id: str, context: ContextDep, session: SessionDep, admin: AdminDep
) -> IntegrationPublic:
    """Revoke an integration: its certificate goes on the CRL, its grants leave the ACL, and
    the broker drops its connection."""
    try:
        revoked = revoke_integration(session, integration_id, admin)
        session.commit()
    except ServiceError as exc:
        session.rollback()
        audit.record_apart(
            context.engine,
            admin,
            "integration.revoke",
            integration_id,
            outcome="failed",
            detail={"error": exc.detail},
        )
        raise
    anyio.from_thread.run(context.apply_broker_policy)
    return revoked
