"""Commands: store first, publish to the device's session, follow its acks, expire the silent.

Lifecycle: pending (stored, maybe not yet handed to the broker) -> accepted -> running ->
succeeded / failed / rejected, or expired when ``expires_at`` passes with no final answer, or
dropped when a device's queue of waiting commands is full. A final state is never overwritten.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from fleet_protocol import AckMessage, AckStatus, CommandMessage
from fleet_service.config import CommandLimits
from fleet_service.errors import NotFoundError, ServiceError
from fleet_service.registry import Scope, in_scope, visible_device, visible_device_ids
from fleet_service.schemas import CommandCreate, CommandPublic
from fleet_service.tables import Command, Device

__all__ = [
    "FINAL_STATES",
    "CommandLimits",
    "apply_ack",
    "command_message",
    "command_public",
    "create_command",
    "create_for_tag",
    "due_for_publishing",
    "expire_overdue",
    "get_command",
    "list_commands",
    "pending_for_device",
]

FINAL_STATES = frozenset({"succeeded", "failed", "rejected", "expired", "dropped"})
# Order of the non-final states; an ack may only move a command forward.
_RANK = {"pending": 0, "accepted": 1, "running": 2}


def command_public(command: Command) -> CommandPublic:
    """The API shape of a command."""
    return CommandPublic.model_validate(command)


def command_message(command: Command) -> CommandMessage:
    """What the device receives."""
    return CommandMessage(
        id=command.id,
        type=command.type,
        params=dict(command.params),
        issued_at=command.issued_at,
        expires_at=command.expires_at,
    )


def _waiting(session: Session, device_id: str) -> int:
    return session.exec(
        select(func.count())
        .select_from(Command)
        .where(Command.device_id == device_id, col(Command.status).not_in(FINAL_STATES))
    ).one()


def create_command(
    session: Session,
    device_id: str,
    body: CommandCreate,
    *,
    issued_by: str,
    limits: CommandLimits,
    scope: Scope = None,
) -> Command:
    """Store a command for one device within ``scope`` (published by the dispatcher)."""
    visible_device(session, device_id, scope)
    now = datetime.now(UTC)
    command = Command(
        id="cmd-" + secrets.token_hex(8),
        device_id=device_id,
        type=body.type,
        params=dict(body.params),
        issued_by=issued_by,
        issued_at=now,
        expires_at=now + timedelta(seconds=body.expires_in_s),
        updated_at=now,
    )
    if _waiting(session, device_id) >= limits.queue_max:
        command.status = "dropped"
        command.detail = (
            f"{limits.queue_max} commands already wait for this device; "
            "dropped instead of queued (use desired state for settings that must converge)"
        )
    session.add(command)
    return command


def create_for_tag(
    session: Session,
    tag: str,
    body: CommandCreate,
    *,
    issued_by: str,
    limits: CommandLimits,
    scope: Scope = None,
) -> list[Command]:
    """The same command for every device within ``scope`` carrying ``key=value``."""
    key, _, value = tag.partition("=")
    devices = [
        d for d in session.exec(select(Device)) if d.tags.get(key) == value and in_scope(d, scope)
    ]
    if not devices:
        raise ServiceError(f"no device carries the tag {tag!r}", status=404)
    return [
        create_command(session, d.id, body, issued_by=issued_by, limits=limits) for d in devices
    ]


def get_command(session: Session, command_id: str, *, scope: Scope = None) -> Command:
    """One command (to a device within ``scope``) or :class:`NotFoundError`."""
    command = session.get(Command, command_id)
    device = session.get(Device, command.device_id) if command is not None else None
    if command is None or (scope is not None and (device is None or not in_scope(device, scope))):
        raise NotFoundError(f"command {command_id!r} does not exist")
    return command


def list_commands(
    session: Session,
    device_id: str | None,
    status: str | None,
    limit: int,
    *,
    scope: Scope = None,
) -> list[CommandPublic]:
    """Newest first, optionally for one device and in one state; only to devices within
    ``scope``."""
    query = select(Command).order_by(col(Command.issued_at).desc()).limit(limit)
    if device_id is not None:
        query = query.where(Command.device_id == device_id)
    visible = visible_device_ids(session, scope)
    if visible is not None:
        query = query.where(col(Command.device_id).in_(visible))
    if status is not None:
        query = query.where(Command.status == status)
    return [command_public(c) for c in session.exec(query)]


def apply_ack(command: Command, status: AckStatus, ack: AckMessage, now: datetime) -> bool:
    """Move ``command`` forward by ``ack``; False when the ack is stale or after the end."""
    if command.status in FINAL_STATES:
        return False
    if status is AckStatus.REJECTED and command.status != "pending":
        # A refusal of a second delivery (the device's replay guard) after the first one was
        # accepted must not undo it.
        return False
    if not status.is_final and _RANK[status.value] <= _RANK[command.status]:
        return False
    command.status = status.value
    command.detail = ack.detail
    if ack.result is not None:
        command.result = dict(ack.result)
    command.updated_at = now
    return True


def expire_overdue(session: Session, now: datetime) -> list[str]:
    """Mark every unanswered command past its expiry as expired; returns their ids."""
    overdue = list(
        session.exec(
            select(Command.id).where(
                col(Command.status).not_in(FINAL_STATES), col(Command.expires_at) <= now
            )
        )
    )
    if overdue:
        session.execute(
            update(Command)
            .where(col(Command.id).in_(overdue), col(Command.status).not_in(FINAL_STATES))
            .values(status="expired", detail="no final answer before expires_at", updated_at=now)
        )
    return overdue


def due_for_publishing(
    session: Session, now: datetime, limit: int, limits: CommandLimits
) -> list[Command]:
    """Pending, unexpired commands not yet handed to the broker, oldest first, honouring the
    per-device in-flight cap."""
    in_flight = dict(
        session.exec(
            select(Command.device_id, func.count())
            .where(
                col(Command.published_at).is_not(None),
                col(Command.status).not_in(FINAL_STATES),
            )
            .group_by(Command.device_id)
        ).all()
    )
    # Only devices that have connected once: before that the broker holds no session for them
    # and would discard a QoS 1 message to their topic.
    waiting = session.exec(
        select(Command)
        .join(Device, col(Device.id) == col(Command.device_id))
        .where(
            Command.status == "pending",
            col(Command.published_at).is_(None),
            col(Command.expires_at) > now,
            Device.status != "unknown",
        )
        .order_by(col(Command.issued_at))
        .limit(limit)
    ).all()
    due = []
    for command in waiting:
        if in_flight.get(command.device_id, 0) < limits.in_flight_max:
            in_flight[command.device_id] = in_flight.get(command.device_id, 0) + 1
            due.append(command)
    return due


def pending_for_device(
    session: Session, device_id: str, now: datetime, limits: CommandLimits
) -> list[Command]:
    """Unexpired commands the device has not answered yet, oldest first (HTTPS polling)."""
    return list(
        session.exec(
            select(Command)
            .where(
                Command.device_id == device_id,
                Command.status == "pending",
                col(Command.expires_at) > now,
            )
            .order_by(col(Command.issued_at))
            .limit(limits.in_flight_max)
        )
    )
