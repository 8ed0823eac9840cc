"""Devices: the registry and telemetry history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from fleet_service.api.deps import SessionDep, ViewerDep
from fleet_service.errors import ServiceError
from fleet_service.registry import (
    MAX_HISTORY_POINTS,
    get_device,
    list_devices,
    telemetry_history,
    visible_device,
)
from fleet_service.rollups import telemetry_hours
from fleet_service.schemas import DevicePublic, TelemetryPoint

__all__ = ["router"]

router = APIRouter(prefix="/devices", tags=["devices"])

Resolution = Literal["auto", "raw", "hour"]
# Past this range ``auto`` reads the hourly rollups: two days of 30 s samples is 5 760 points,
# more than a chart shows and than MAX_HISTORY_POINTS returns.
HOURLY_AFTER = timedelta(hours=48)


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
    resolution: Resolution = "auto",
) -> list[TelemetryPoint]:
    """Telemetry between ``since`` (default: an hour ago) and ``until`` (default: now).

    ``raw`` gives the samples (the newest ``limit``); ``hour`` one point per hour from the
    rollups, with each hour's min and max, which outlive the raw rows; ``auto`` is ``hour``
    for ranges over two days.
    """
    end = until or datetime.now(UTC)
    start = since or end - timedelta(hours=1)
    if start > end:
        raise ServiceError(f"since ({start.isoformat()}) is after until ({end.isoformat()})")
    if resolution == "hour" or (resolution == "auto" and end - start > HOURLY_AFTER):
        visible_device(session, device_id, viewer)
        return telemetry_hours(session, device_id, start, end)
    return telemetry_history(session, device_id, start, end, limit, scope=viewer)
