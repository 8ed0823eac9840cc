"""The device registry: read devices and their telemetry history for the API and dashboard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from fleet_protocol import ModelReport
from fleet_service.desired import desired_model_summaries
from fleet_service.errors import NotFoundError
from fleet_service.roles import Principal
from fleet_service.schemas import DevicePublic, TelemetryPoint
from fleet_service.tables import Device, TelemetrySample

__all__ = [
    "Scope",
    "device_public",
    "get_device",
    "in_scope",
    "list_devices",
    "telemetry_history",
    "visible_device",
    "visible_device_ids",
]

# Charts need a bound; a day of 30 s samples is 2,880 points.
MAX_HISTORY_POINTS = 10_000

# Whose reach a query is limited to: the caller of an API request (a tag-scoped API token sees
# only devices carrying its tag), or None for the whole fleet (the CLI, the service's own loops).
Scope = Principal | None


def in_scope(device: Device, scope: Scope) -> bool:
    """True when ``device`` is within ``scope``."""
    return scope is None or scope.sees(device.tags)


def visible_device(session: Session, device_id: str, scope: Scope) -> Device:
    """One device within ``scope``; one outside it is reported missing, exactly like a device
    that does not exist, so a scoped caller learns nothing about the rest of the fleet."""
    row = session.get(Device, device_id)
    if row is None or not in_scope(row, scope):
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    return row


def visible_device_ids(session: Session, scope: Scope) -> list[str] | None:
    """Ids of the devices within ``scope``; None when it covers the whole fleet."""
    if scope is None or scope.tag is None:
        return None
    return [d.id for d in session.exec(select(Device)) if scope.sees(d.tags)]


def device_public(device: Device) -> DevicePublic:
    """The API shape of a device row."""
    latest: dict[str, Any] | None = device.latest_telemetry
    return DevicePublic(
        id=device.id,
        hostname=device.hostname,
        tags=dict(device.tags),
        status=device.status,  # the ingest writer stores only the literals
        last_seen=device.last_seen,
        enrolled_at=device.enrolled_at,
        agent_version=device.agent_version,
        architecture=latest.get("architecture") if latest else None,
        platform=latest.get("platform") if latest else None,
        telemetry=TelemetryPoint.model_validate(latest) if latest else None,
        desired_generation=device.desired_generation,
        reported_generation=device.reported_generation,
        reported_applied=device.reported_applied,
        reported_detail=device.reported_detail,
        models={
            name: ModelReport.model_validate(report)
            for name, report in (device.reported_models or {}).items()
        },
        desired_models=desired_model_summaries(device),
        revoked_at=device.revoked_at,
        decommissioned_at=device.decommissioned_at,
    )


def list_devices(session: Session, *, scope: Scope = None) -> list[DevicePublic]:
    """Every device within ``scope``, by hostname then id."""
    rows = session.exec(select(Device).order_by(col(Device.hostname), col(Device.id)))
    return [device_public(row) for row in rows if in_scope(row, scope)]


def get_device(session: Session, device_id: str, *, scope: Scope = None) -> DevicePublic:
    """One device, or :class:`NotFoundError`."""
    return device_public(visible_device(session, device_id, scope))


def telemetry_history(
    session: Session,
    device_id: str,
    since: datetime,
    until: datetime,
    limit: int = MAX_HISTORY_POINTS,
    *,
    scope: Scope = None,
) -> list[TelemetryPoint]:
    """Telemetry of one device in ``[since, until]``, oldest first (the newest ``limit``)."""
    visible_device(session, device_id, scope)
    rows = session.exec(
        select(TelemetrySample)
        .where(
            TelemetrySample.device_id == device_id,
            col(TelemetrySample.timestamp) >= since,
            col(TelemetrySample.timestamp) <= until,
        )
        .order_by(col(TelemetrySample.timestamp).desc())
        .limit(min(limit, MAX_HISTORY_POINTS))
    ).all()
    return [TelemetryPoint.model_validate(row) for row in reversed(rows)]
