"""What every check reads (``Audit``), and how checks write times and spans in their findings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import Session

from fleet_service.security_audit.broker_log import BrokerActivity
from fleet_service.security_audit.findings import Severity
from fleet_service.security_audit.policy import AuditPolicy

__all__ = ["Audit", "by_role", "span", "when"]


@dataclass(frozen=True)
class Audit:
    """What every check reads: the database, the thresholds, the time, the broker's log."""

    session: Session
    policy: AuditPolicy
    now: datetime
    broker: BrokerActivity | None = None


def when(at: datetime) -> str:
    """``at`` as a finding shows it: UTC, to the minute."""
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def span(delta: timedelta) -> str:
    """``delta`` (either sign) rounded to its largest unit, e.g. "3 days", "1 hour"."""
    seconds = abs(delta.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:.0f} seconds"


def by_role(role: str) -> Severity:
    """An admin's stale access is worth more attention than anyone else's."""
    return Severity.MEDIUM if role == "admin" else Severity.LOW
