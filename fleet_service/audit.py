"""The audit log: every state-changing action, written in the same transaction as the change."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Engine
from sqlmodel import Session

from fleet_service.db import session_scope
from fleet_service.roles import Principal
from fleet_service.tables import AuditEvent

__all__ = ["Outcome", "record", "record_apart"]

logger = logging.getLogger(__name__)

Outcome = Literal["success", "denied", "failed"]


def record(
    session: Session,
    who: Principal,
    action: str,
    target: str | None = None,
    *,
    outcome: Outcome = "success",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit event to ``session``: it commits (or rolls back) with the change itself."""
    event = AuditEvent(
        at=datetime.now(UTC),
        actor=who.name,
        actor_kind=who.kind,
        role=who.role.value,
        action=action,
        target=target,
        address=who.address,
        outcome=outcome,
        detail=detail,
    )
    session.add(event)
    logger.info(
        "audit action=%s target=%s actor=%s outcome=%s",
        action,
        target,
        who.name,
        outcome,
        extra={"actor": who.name, "action": action, "target": target, "outcome": outcome},
    )
    return event


def record_apart(
    engine: Engine,
    who: Principal,
    action: str,
    target: str | None = None,
    *,
    outcome: Outcome,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record a refused or failed action in its own transaction (the change's rolled back)."""
    with session_scope(engine) as session:
        record(session, who, action, target, outcome=outcome, detail=detail)
