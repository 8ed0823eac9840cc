"""Desired state: an operator sets a device's runtime config; each change is a new generation."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Session

from fleet_protocol import RuntimeConfig
from fleet_service.errors import NotFoundError
from fleet_service.schemas import DesiredPublic
from fleet_service.tables import Device

__all__ = ["desired_public", "get_desired", "set_desired"]


def desired_public(device: Device) -> DesiredPublic:
    """The API shape of a device's desired state."""
    return DesiredPublic(
        device_id=device.id,
        generation=device.desired_generation,
        config=RuntimeConfig.model_validate(device.desired_config or {}),
        updated_at=device.desired_updated_at,
        reported_generation=device.reported_generation,
        reported_applied=device.reported_applied,
    )


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    return device


def get_desired(session: Session, device_id: str) -> DesiredPublic:
    """A device's desired state."""
    return desired_public(_device(session, device_id))


def set_desired(session: Session, device_id: str, config: RuntimeConfig) -> DesiredPublic:
    """Replace the desired config and bump the generation (row-locked on PostgreSQL)."""
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    device.desired_generation += 1
    device.desired_config = config.model_dump(exclude_none=True)
    device.desired_updated_at = datetime.now(UTC)
    session.add(device)
    return desired_public(device)
