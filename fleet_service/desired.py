"""Desired state: runtime config and model assignments per device; each change is a new
generation, published retained by the dispatcher."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlmodel import Session

from fleet_protocol import InferenceSchedule, ModelAssignment, RuntimeConfig
from fleet_service.artifacts.releases import signed_manifest_of
from fleet_service.errors import ConflictError, NotFoundError
from fleet_service.schemas import DesiredModelPublic, DesiredPublic
from fleet_service.tables import Device, ModelRelease

__all__ = [
    "assign_model",
    "desired_assignments",
    "desired_model_summaries",
    "desired_public",
    "desired_release_id",
    "get_desired",
    "model_assignment",
    "remove_model",
    "set_desired",
]


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


# DesiredState.models holds at most this many assignments (fleet_protocol.control).
MAX_MODELS_PER_DEVICE = 16


def model_assignment(
    release: ModelRelease, schedules: Sequence[InferenceSchedule] = ()
) -> ModelAssignment:
    """What a device is told to run for ``release``; the key goes in only for a sealed release."""
    return ModelAssignment(
        release_id=release.id,
        manifest=signed_manifest_of(release),
        key=release.encryption_key,
        schedules=list(schedules),
    )


def desired_assignments(device: Device) -> list[ModelAssignment]:
    """The model assignments in ``device``'s desired state."""
    return [ModelAssignment.model_validate(m) for m in device.desired_models or []]


def desired_model_summaries(device: Device) -> list[DesiredModelPublic]:
    """Names and releases of ``device``'s assignments, for the API (the keys stay out)."""
    return [
        DesiredModelPublic(
            name=a.name,
            release_id=a.release_id,
            version=a.manifest.manifest.version,
            release=a.manifest.manifest.release,
        )
        for a in desired_assignments(device)
    ]


def desired_release_id(device: Device, model_name: str) -> str | None:
    """The release of ``model_name`` that ``device`` is told to run, if any."""
    for model in device.desired_models or []:
        if model["manifest"]["manifest"]["name"] == model_name:
            release_id: str = model["release_id"]
            return release_id
    return None


def _lock(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id, with_for_update=True, populate_existing=True)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled")
    return device


def _replace_models(session: Session, device: Device, models: list[ModelAssignment]) -> None:
    # A new list object: SQLAlchemy only notices a JSON column change on assignment.
    device.desired_models = [m.model_dump(mode="json") for m in models]
    device.desired_generation += 1
    device.desired_updated_at = datetime.now(UTC)
    session.add(device)


def assign_model(session: Session, device_id: str, assignment: ModelAssignment) -> Device:
    """Put ``assignment`` in the device's desired state in place of any release of that model
    (row-locked on PostgreSQL); the generation goes up by one."""
    device = _lock(session, device_id)
    others = [a for a in desired_assignments(device) if a.name != assignment.name]
    if len(others) >= MAX_MODELS_PER_DEVICE:
        raise ConflictError(
            f"device {device_id} already runs {len(others)} models, the most one desired state "
            f"holds; remove one before adding {assignment.name}"
        )
    _replace_models(session, device, [*others, assignment])
    return device


def remove_model(session: Session, device_id: str, model_name: str) -> Device:
    """Take ``model_name`` out of the device's desired state; the generation goes up by one."""
    device = _lock(session, device_id)
    kept = [a for a in desired_assignments(device) if a.name != model_name]
    _replace_models(session, device, kept)
    return device
