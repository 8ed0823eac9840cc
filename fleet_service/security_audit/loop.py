"""The service's periodic security audit: run, log each finding, tell the event stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import Engine

from fleet_service.background import background_task
from fleet_service.db import session_scope
from fleet_service.events import EventHub
from fleet_service.security_audit.checks import run_audit
from fleet_service.security_audit.findings import SecurityAuditSummary, SecurityFindings, Severity
from fleet_service.security_audit.policy import AuditPolicy

__all__ = ["SecurityAuditor", "log_findings"]

logger = logging.getLogger(__name__)


def log_findings(report: SecurityFindings) -> None:
    """One structured record per finding (high as a warning), then the counts."""
    for finding in report.findings:
        logger.log(
            logging.WARNING if finding.severity is Severity.HIGH else logging.INFO,
            "security finding kind=%s severity=%s target=%s detail=%r fix=%r",
            finding.kind,
            finding.severity.value,
            finding.target,
            finding.detail,
            finding.fix,
            extra={"security_finding": finding.model_dump(mode="json")},
        )
    logger.info(
        "security audit done findings=%d high=%d medium=%d low=%d",
        len(report.findings),
        report.count(Severity.HIGH),
        report.count(Severity.MEDIUM),
        report.count(Severity.LOW),
    )


class SecurityAuditor:
    """Owns the ``security-audit`` loop: audit now and every ``interval_s`` after."""

    def __init__(
        self, engine: Engine, policy: AuditPolicy, hub: EventHub, *, interval_s: float
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._hub = hub
        self._interval_s = interval_s

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SecurityAuditor]:
        """Run the loop until the context exits."""
        async with background_task("security-audit", self._run):
            yield self

    def run_once(self) -> SecurityFindings:
        """One audit, logged (blocking)."""
        with session_scope(self._engine) as session:
            report = run_audit(session, self._policy)
        log_findings(report)
        return report

    async def _run(self) -> None:
        while True:
            try:
                report = await asyncio.to_thread(self.run_once)
            except Exception:  # supervisor loop: log and audit again next time
                logger.exception("security audit failed; retrying in %.0f s", self._interval_s)
            else:
                self._hub.publish("security", SecurityAuditSummary.of(report))
            await asyncio.sleep(self._interval_s)
