"""Webhooks [admin]: create (secret shown once), list, disable, read the delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from fleet_service.api.deps import AdminDep, ContextDep, SessionDep
from fleet_service.webhooks import (
    MAX_DELIVERIES,
    DeliveriesPublic,
    WebhookCreate,
    WebhookCreated,
    WebhookPublic,
    create_webhook,
    disable_webhook,
    list_deliveries,
    list_webhooks,
)

__all__ = ["router"]

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.post("", status_code=status.HTTP_201_CREATED, name="webhook.create")
def create(
    body: WebhookCreate, context: ContextDep, session: SessionDep, admin: AdminDep
) -> WebhookCreated:
    """Post matching results to ``url`` from now on; the answer holds the signing secret,
    which is never shown again."""
    return create_webhook(
        session, body, by=admin, require_https=context.settings.webhook_require_https
    )


@router.get("")
def list_all(session: SessionDep, _admin: AdminDep) -> list[WebhookPublic]:
    """Every webhook, enabled or disabled (never their secrets)."""
    return list_webhooks(session)


@router.post("/{webhook_id}/disable", name="webhook.disable")
def disable(webhook_id: str, session: SessionDep, admin: AdminDep) -> WebhookPublic:
    """Stop posting to a webhook; its pending deliveries are cancelled, its log kept."""
    return disable_webhook(session, webhook_id, by=admin)


@router.get("/{webhook_id}/deliveries")
def deliveries(
    webhook_id: str,
    session: SessionDep,
    _admin: AdminDep,
    limit: Annotated[int, Query(ge=1, le=MAX_DELIVERIES)] = 100,
) -> DeliveriesPublic:
    """The delivery log of one webhook, newest first: state, attempts, last status and error."""
    return list_deliveries(session, webhook_id, limit)
