"""``edgefleet audit``: the fleet security audit on demand, as a table or JSON, with an exit code
that cron and CI can act on."""

from __future__ import annotations

import typer

from fleet_service.cli_keys import in_session
from fleet_service.config import ServiceSettings
from fleet_service.home import FleetHome
from fleet_service.security_audit import AuditPolicy, SecurityFindings, Severity, run_audit

__all__ = ["audit", "exit_code", "print_report", "render_table"]


def audit(settings: ServiceSettings) -> SecurityFindings:
    """Run every check against this fleet's database and broker log."""
    policy = AuditPolicy.from_settings(settings, FleetHome(settings.home))
    return in_session(settings, lambda session: run_audit(session, policy))


def exit_code(report: SecurityFindings, fail_on: Severity) -> int:
    """1 when a finding is at least as severe as ``fail_on``, else 0."""
    return int(any(f.severity.rank >= fail_on.rank for f in report.findings))


def render_table(report: SecurityFindings) -> list[str]:
    """Lines of a plain table (one finding per line, its fix indented below), grep-friendly."""
    if not report.findings:
        return [f"no findings ({report.generated_at:%Y-%m-%d %H:%M %Z})"]
    width = max(len(f.target) for f in report.findings)
    kind_width = max(len(f.kind) for f in report.findings)
    lines = [f"{'SEVERITY':<8}  {'KIND':<{kind_width}}  {'TARGET':<{width}}  DETAIL"]
    for f in report.findings:
        lines.append(
            f"{f.severity.value:<8}  {f.kind:<{kind_width}}  {f.target:<{width}}  {f.detail}"
        )
        lines.append(f"{'':<8}  fix: {f.fix}")
    counts = ", ".join(f"{report.count(s)} {s.value}" for s in Severity)
    lines.append(f"{len(report.findings)} finding(s): {counts}")
    return lines


def print_report(report: SecurityFindings, *, as_json: bool) -> None:
    """Write the report to stdout."""
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    for line in render_table(report):
        typer.echo(line)
