"""Every check, in the order they run, and ``run_audit`` running them all once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from sqlmodel import Session

from fleet_service.security_audit.access_checks import (
    check_admin_count,
    check_api_tokens,
    check_integration_grants,
    check_registration_keys,
    check_stale_logins,
)
from fleet_service.security_audit.broker_log import read_broker_log
from fleet_service.security_audit.context import Audit
from fleet_service.security_audit.findings import SecurityFinding, SecurityFindings
from fleet_service.security_audit.identity_checks import (
    check_device_certs,
    check_duplicate_connections,
    check_home_certs,
    check_integration_certs,
    check_revoked_devices_seen,
    check_revoked_integrations_seen,
    check_silent_devices,
)
from fleet_service.security_audit.policy import AuditPolicy

__all__ = ["CHECKS", "Check", "run_audit"]

logger = logging.getLogger(__name__)

Check = Callable[[Audit], Iterable[SecurityFinding]]

CHECKS: tuple[Check, ...] = (
    check_device_certs,
    check_integration_certs,
    check_home_certs,
    check_revoked_devices_seen,
    check_revoked_integrations_seen,
    check_duplicate_connections,
    check_silent_devices,
    check_registration_keys,
    check_integration_grants,
    check_stale_logins,
    check_api_tokens,
    check_admin_count,
)


def run_audit(
    session: Session, policy: AuditPolicy, *, now: datetime | None = None
) -> SecurityFindings:
    """Run every check once (blocking: database reads and the broker log); most urgent first."""
    now = now or datetime.now(UTC)
    broker = read_broker_log(policy.broker_logs)
    if broker is None and policy.broker_logs:
        logger.info(
            "security audit: no broker log at %s; connection checks skipped",
            policy.broker_logs[-1],
        )
    audit = Audit(session=session, policy=policy, now=now, broker=broker)
    findings = [finding for check in CHECKS for finding in check(audit)]
    findings.sort(key=lambda f: (-f.severity.rank, f.kind, f.target))
    return SecurityFindings(generated_at=now, findings=findings)
