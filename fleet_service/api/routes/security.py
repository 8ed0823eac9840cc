"""The fleet security audit's findings, fresh on every request."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_service.api.deps import AdminDep, ContextDep, SessionDep
from fleet_service.security_audit import AuditPolicy, SecurityFindings, run_audit

__all__ = ["router"]

router = APIRouter(prefix="/security", tags=["security"])


@router.get("/findings")
def findings(context: ContextDep, session: SessionDep, _admin: AdminDep) -> SecurityFindings:
    """Run the security audit now: what an owner should fix, most urgent first.

    Each finding has a ``kind`` (the check), a ``severity`` (high, medium, low), a ``target``
    (``device:ID``, ``key:ID``, ``user:NAME``, ``integration:NAME``, ``token:ID``, ...), a
    ``detail`` and a ``fix``.
    """
    return run_audit(session, AuditPolicy.from_settings(context.settings, context.home))
