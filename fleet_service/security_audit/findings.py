"""What a security audit reports: findings, their severity, one run's report and its counts."""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict

__all__ = ["SecurityAuditSummary", "SecurityFinding", "SecurityFindings", "Severity"]


class Severity(StrEnum):
    """How urgent a finding is: high is broken or abused now, low is worth a look."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Higher is more urgent."""
        return {Severity.HIGH: 2, Severity.MEDIUM: 1, Severity.LOW: 0}[self]


class SecurityFinding(BaseModel):
    """One thing an owner should fix."""

    model_config = ConfigDict(frozen=True)

    kind: str  # stable name of the check, e.g. "cert-expired"
    severity: Severity
    target: str  # "<object>:<id>", e.g. "device:dev-1a2b", "key:k-9f", "user:alice"
    detail: str  # what was found, with the dates and counts that matter
    fix: str  # what to do about it


class SecurityFindings(BaseModel):
    """One audit run: ``GET /api/v1/security/findings`` and ``edgefleet audit --json``."""

    model_config = ConfigDict(frozen=True)

    generated_at: AwareDatetime
    findings: list[SecurityFinding]

    def count(self, severity: Severity) -> int:
        """How many findings have ``severity``."""
        return sum(1 for f in self.findings if f.severity is severity)


class SecurityAuditSummary(BaseModel):
    """The ``security`` event: counts only, since the event stream is not admin-only; an admin's
    dashboard fetches the findings themselves from the REST route."""

    model_config = ConfigDict(frozen=True)

    generated_at: AwareDatetime
    high: int
    medium: int
    low: int

    @classmethod
    def of(cls, report: SecurityFindings) -> SecurityAuditSummary:
        """The counts of ``report``."""
        return cls(
            generated_at=report.generated_at,
            high=report.count(Severity.HIGH),
            medium=report.count(Severity.MEDIUM),
            low=report.count(Severity.LOW),
        )
