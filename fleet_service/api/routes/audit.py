"""The audit log [admin], read-only: no route changes or deletes an event."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from fleet_service.api.deps import AdminDep, SessionDep
from fleet_service.audit_log import MAX_EVENTS, AuditFilter, AuditLog, list_events

__all__ = ["router"]

router = APIRouter(tags=["audit"])

Text = Annotated[str | None, Query(max_length=200)]


@router.get("/audit")
def audit_log(
    session: SessionDep,
    _admin: AdminDep,
    actor: Text = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    target: Text = None,
    outcome: Literal["success", "denied", "failed"] | None = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 100,
) -> AuditLog:
    """Recorded actions, newest first: who, what, target, when, from where, outcome. ``action``
    ending in ``*`` matches a prefix (``user.*``)."""
    wanted = AuditFilter(
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        since=since,
        until=until,
        limit=limit,
    )
    return AuditLog(events=list_events(session, wanted))
