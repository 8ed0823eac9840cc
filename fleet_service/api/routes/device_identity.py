"""Device identity: revoke a device, or decommission it (revoke and clear its retained topics).

Both keep the device's history. The answer comes once the broker enforces the change (CRL
reloaded, session dropped), or after ``revocation_apply_timeout_s`` on a busy or remote
broker, in which case the primary's broker policy loop finishes the job within its poll.
"""

from __future__ import annotations

from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from fleet_service import audit
from fleet_service.api.deps import AdminDep, ContextDep, SessionDep
from fleet_service.errors import ServiceError
from fleet_service.registry import device_public
from fleet_service.revocation import revoke_device
from fleet_service.roles import Principal
from fleet_service.schemas import DevicePublic

__all__ = ["RevokeRequest", "router"]

router = APIRouter(prefix="/devices", tags=["device identity"])

_ERRORS: dict[int | str, dict[str, str]] = {
    404: {"description": "no such device (or outside the caller's tag)"},
    409: {"description": "the device is already revoked"},
}


class RevokeRequest(BaseModel):
    """Body of ``POST /devices/{id}/revoke`` (optional)."""

    model_config = ConfigDict(extra="forbid")

    # Why, for the audit log and the certificates' records.
    reason: Annotated[str | None, Field(min_length=1, max_length=200)] = None


def _revoke(
    context: ContextDep,
    session: SessionDep,
    admin: Principal,
    device_id: str,
    reason: str | None,
    *,
    decommission: bool,
) -> DevicePublic:
    action = "device.decommission" if decommission else "device.revoke"
    try:
        device = revoke_device(session, device_id, admin, reason=reason, decommission=decommission)
        session.commit()
    except ServiceError as exc:
        session.rollback()
        audit.record_apart(
            context.engine, admin, action, device_id, outcome="failed", detail={"error": exc.detail}
        )
        raise
    # Committed: now have the broker reload its CRL and drop the session before answering.
    anyio.from_thread.run(context.apply_broker_policy)
    return device_public(device)


@router.post("/{device_id}/revoke", responses=_ERRORS, name="device.revoke")
def revoke(
    device_id: str,
    context: ContextDep,
    session: SessionDep,
    admin: AdminDep,
    body: RevokeRequest | None = None,
) -> DevicePublic:
    """Revoke a device: its certificates go on the CRL, the broker reloads it and drops its
    session, its device token stops working. Its history stays."""
    reason = body.reason if body is not None else None
    return _revoke(context, session, admin, device_id, reason, decommission=False)


@router.delete("/{device_id}", responses={404: _ERRORS[404]}, name="device.decommission")
def decommission(
    device_id: str, context: ContextDep, session: SessionDep, admin: AdminDep
) -> DevicePublic:
    """Decommission a device: revoke it (if not yet) and clear its retained topics (status,
    desired, reported). Its history stays; asking again changes nothing."""
    return _revoke(context, session, admin, device_id, None, decommission=True)
