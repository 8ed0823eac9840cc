"""Commands to devices, and each device's desired state and logs."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import AwareDatetime
from sqlmodel import col, select

from fleet_protocol import LogLevel
from fleet_service.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from fleet_service.audit import record
from fleet_service.commands import (
    command_public,
    create_command,
    create_for_tag,
    get_command,
    list_commands,
)
from fleet_service.desired import get_desired, set_desired
from fleet_service.registry import visible_device
from fleet_service.schemas import (
    CommandBroadcast,
    CommandCreate,
    CommandPublic,
    CommandStatus,
    DesiredPublic,
    DesiredUpdate,
    LogRecordPublic,
)
from fleet_service.tables import DeviceLog

__all__ = ["router"]

router = APIRouter(tags=["commands"])

MAX_LOG_LINES = 5000


def _detail(command_id: str, body: CommandCreate) -> dict[str, object]:
    return {"command_id": command_id, "type": body.type, "params": dict(body.params)}


@router.post(
    "/devices/{device_id}/commands", status_code=status.HTTP_201_CREATED, name="command.create"
)
def send_command(
    device_id: str,
    body: CommandCreate,
    context: ContextDep,
    session: SessionDep,
    operator: OperatorDep,
) -> CommandPublic:
    """Store a command for one device; it is published to the device's session at once."""
    command = create_command(
        session,
        device_id,
        body,
        issued_by=operator.name,
        limits=context.settings.command_limits,
        scope=operator,
    )
    record(session, operator, "command.create", device_id, detail=_detail(command.id, body))
    session.commit()  # the dispatcher reads it from the database: commit before waking it
    context.wake_dispatcher()
    return command_public(command)


@router.post("/commands", status_code=status.HTTP_201_CREATED, name="command.broadcast")
def broadcast_command(
    body: CommandBroadcast, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> list[CommandPublic]:
    """The same command to every device with the tag ``key=value``."""
    commands = create_for_tag(
        session,
        body.tag,
        body,
        issued_by=operator.name,
        limits=context.settings.command_limits,
        scope=operator,
    )
    detail = {"type": body.type, "devices": [c.device_id for c in commands][:100]}
    record(session, operator, "command.broadcast", body.tag, detail=detail)
    session.commit()
    context.wake_dispatcher()
    return [command_public(c) for c in commands]


@router.get("/commands")
def commands(
    session: SessionDep,
    viewer: ViewerDep,
    device_id: str | None = None,
    status: CommandStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CommandPublic]:
    """Recent commands, newest first; filter by device and by state (e.g. ``dropped``)."""
    return list_commands(session, device_id, status, limit, scope=viewer)


@router.get("/commands/{command_id}")
def one_command(command_id: str, session: SessionDep, viewer: ViewerDep) -> CommandPublic:
    """One command with its current state."""
    return command_public(get_command(session, command_id, scope=viewer))


@router.get("/devices/{device_id}/desired")
def desired(device_id: str, session: SessionDep, viewer: ViewerDep) -> DesiredPublic:
    """The device's desired state and the generation it last reported."""
    visible_device(session, device_id, viewer)
    return get_desired(session, device_id)


@router.put("/devices/{device_id}/desired", name="desired.update")
def update_desired(
    device_id: str,
    body: DesiredUpdate,
    context: ContextDep,
    session: SessionDep,
    operator: OperatorDep,
) -> DesiredPublic:
    """Replace the desired runtime config; the generation goes up by one."""
    visible_device(session, device_id, operator)
    result = set_desired(session, device_id, body.config)
    detail = {"generation": result.generation, "config": body.config.model_dump(mode="json")}
    record(session, operator, "desired.update", device_id, detail=detail)
    session.commit()
    context.desired_changed(device_id)
    return result


@router.get("/devices/{device_id}/logs")
def logs(
    device_id: str,
    session: SessionDep,
    viewer: ViewerDep,
    level: LogLevel = LogLevel.DEBUG,
    q: Annotated[str | None, Query(max_length=200)] = None,
    since: AwareDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LOG_LINES)] = 500,
) -> list[LogRecordPublic]:
    """The newest log records at or above ``level`` (containing ``q``), oldest first."""
    visible_device(session, device_id, viewer)
    query = select(DeviceLog).where(
        DeviceLog.device_id == device_id,
        col(DeviceLog.level_no) >= logging.getLevelName(level.value),
    )
    if q:
        query = query.where(col(DeviceLog.message).contains(q))
    if since is not None:
        query = query.where(col(DeviceLog.timestamp) >= since)
    rows = session.exec(query.order_by(col(DeviceLog.timestamp).desc()).limit(limit)).all()
    return [LogRecordPublic.model_validate(row) for row in reversed(rows)]
