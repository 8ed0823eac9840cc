"""Devices: the registry and telemetry history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from fleet_service.api.deps import SessionDep, ViewerDep
from fleet_service.errors import ServiceError
from fleet_service.registry import MAX_HISTORY_POINTS, get_device, list_devices, telemetry_history
from fleet_service.schemas import DevicePublic, TelemetryPoint

__all__ = ["router"]

router = APIRouter(prefix="/devices", tags=["devices"])


@router.get("")
def list_all(session: SessionDep, viewer: ViewerDep) -> list[DevicePublic]:
    """Every device (within the caller's tag, for a tag-scoped token) with status, tags, last
    seen and latest telemetry."""
    return list_devices(session, scope=viewer)


@router.get("/{device_id}")
def one(device_id: str, session: SessionDep, viewer: ViewerDep) -> DevicePublic:
    """One device."""
    return get_device(session, device_id, scope=viewer)


@router.get("/{device_id}/telemetry")
def telemetry(
    device_id: str,
    session: SessionDep,
    viewer: ViewerDep,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_POINTS)] = MAX_HISTORY_POINTS,
) -> list[TelemetryPoint]:
    """Telemetry between ``since`` (default: an hour ago) and ``until`` (default: now)."""
    end = until or datetime.now(UTC)
    start = since or end - timedelta(hours=1)
    if start > end:
        raise ServiceError(f"since ({start.isoformat()}) is after until ({end.isoformat()})")
    return telemetry_history(session, device_id, start, end, limit, scope=viewer)
