"""Fleet security audit: small checks over the database and the broker log, each returning the
findings an owner should fix (what, how bad, where, why, and what to do about it).

``run_audit`` runs every check once (the REST route and ``edgefleet audit``);
``SecurityAuditor`` runs it periodically inside the service, logs each finding and tells the
dashboard's event stream that new results exist.

Modules, lowest first: ``findings`` (what a run reports), ``policy`` (the thresholds),
``broker_log`` (mosquitto's log), ``context`` (what every check reads), ``identity_checks`` and
``access_checks`` (the checks), ``checks`` (their order and ``run_audit``), ``loop`` (the
periodic run).
"""

from fleet_service.security_audit.broker_log import (
    BrokerActivity,
    parse_broker_log,
    read_broker_log,
)
from fleet_service.security_audit.checks import CHECKS, run_audit
from fleet_service.security_audit.context import Audit
from fleet_service.security_audit.findings import (
    SecurityAuditSummary,
    SecurityFinding,
    SecurityFindings,
    Severity,
)
from fleet_service.security_audit.loop import SecurityAuditor
from fleet_service.security_audit.policy import AuditPolicy

__all__ = [
    "CHECKS",
    "Audit",
    "AuditPolicy",
    "BrokerActivity",
    "SecurityAuditSummary",
    "SecurityAuditor",
    "SecurityFinding",
    "SecurityFindings",
    "Severity",
    "parse_broker_log",
    "read_broker_log",
    "run_audit",
]
