"""Reading the audit log (REST and CLI); it is written only by :mod:`fleet_service.audit`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel
from sqlmodel import Session, col, select

from fleet_service.tables import AuditEvent

__all__ = ["MAX_EVENTS", "AuditEventPublic", "AuditFilter", "AuditLog", "list_events"]

# One page at most; narrow by time to go further back.
MAX_EVENTS = 1000


class AuditEventPublic(BaseModel):
    """One recorded action: who, what, on which target, when, from where, outcome."""

    id: int
    at: datetime
    actor: str
    actor_kind: str
    role: str | None
    action: str
    target: str | None
    address: str | None
    outcome: Literal["success", "denied", "failed"]
    detail: dict[str, Any] | None


class AuditLog(BaseModel):
    """Answer of ``GET /api/v1/audit``, newest first."""

    events: list[AuditEventPublic]


@dataclass(frozen=True)
class AuditFilter:
    """Which events to list; every field set narrows it. ``action`` ending in ``*`` is a
    prefix (``user.*``)."""

    actor: str | None = None
    action: str | None = None
    target: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100


def list_events(session: Session, wanted: AuditFilter) -> list[AuditEventPublic]:
    """The newest events matching ``wanted``, newest first."""
    query = select(AuditEvent)
    if wanted.actor is not None:
        query = query.where(AuditEvent.actor == wanted.actor)
    if wanted.action is not None:
        if wanted.action.endswith("*"):
            query = query.where(
                col(AuditEvent.action).startswith(wanted.action[:-1], autoescape=True)
            )
        else:
            query = query.where(AuditEvent.action == wanted.action)
    if wanted.target is not None:
        query = query.where(AuditEvent.target == wanted.target)
    if wanted.outcome is not None:
        query = query.where(AuditEvent.outcome == wanted.outcome)
    if wanted.since is not None:
        query = query.where(col(AuditEvent.at) >= wanted.since)
    if wanted.until is not None:
        query = query.where(col(AuditEvent.at) <= wanted.until)
    query = query.order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc())
    rows = session.exec(query.limit(min(wanted.limit, MAX_EVENTS)))
    return [AuditEventPublic.model_validate(row, from_attributes=True) for row in rows]
