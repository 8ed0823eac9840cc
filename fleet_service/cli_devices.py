"""Device commands run on the control-plane host, straight against its database.

The running service's dispatcher publishes a stored command within ``dispatch_interval_s``.
"""

from __future__ import annotations

import time

from sqlmodel import Session

from fleet_service import audit
from fleet_service.cli_keys import in_session
from fleet_service.commands import command_public, create_command, create_for_tag, get_command
from fleet_service.config import ServiceSettings
from fleet_service.registry import list_devices
from fleet_service.roles import Principal
from fleet_service.schemas import CommandCreate, CommandPublic, DevicePublic

__all__ = ["list_all", "send_command", "wait_for_final"]

_FINAL = frozenset({"succeeded", "failed", "rejected", "expired", "dropped"})


def list_all(settings: ServiceSettings) -> list[DevicePublic]:
    """Every device."""
    return in_session(settings, list_devices)


def send_command(
    settings: ServiceSettings, target: str | None, tag: str | None, body: CommandCreate
) -> list[CommandPublic]:
    """Store a command for one device or for every device with ``tag``."""

    actor = Principal.cli()

    def work(session: Session) -> list[CommandPublic]:
        limits = settings.command_limits
        if tag is not None:
            commands = create_for_tag(session, tag, body, issued_by=actor.name, limits=limits)
            detail = {"type": body.type, "commands": len(commands)}
            audit.record(session, actor, "command.broadcast", tag, detail=detail)
        else:
            assert target is not None
            commands = [create_command(session, target, body, issued_by=actor.name, limits=limits)]
            detail = {"type": body.type, "command_id": commands[0].id}
            audit.record(session, actor, "command.create", target, detail=detail)
        session.flush()
        return [command_public(c) for c in commands]

    return in_session(settings, work)


def wait_for_final(
    settings: ServiceSettings, command_ids: list[str], timeout_s: float
) -> list[CommandPublic]:
    """Poll until every command is final or ``timeout_s`` passes; the latest states."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = in_session(
            settings, lambda s: [command_public(get_command(s, i)) for i in command_ids]
        )
        if all(c.status in _FINAL for c in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)
