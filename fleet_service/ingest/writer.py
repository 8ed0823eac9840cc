"""Write one batch of validated device messages in one transaction (blocking: run in a thread)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col, select

from fleet_protocol import StatusMessage, TelemetryMessage
from fleet_service.db import session_scope
from fleet_service.registry import device_public
from fleet_service.schemas import DevicePublic
from fleet_service.tables import Device, TelemetrySample

__all__ = ["BatchResult", "Incoming", "write_batch"]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A validated message from ``device_id`` as it came off the broker."""

    device_id: str
    message: StatusMessage | TelemetryMessage
    received_at: datetime


@dataclass
class BatchResult:
    """What a batch did, for counters and the event hub."""

    stored: int = 0  # telemetry rows inserted plus status changes applied
    duplicates: int = 0
    unknown_devices: int = 0
    changed: list[DevicePublic] = field(default_factory=list)


def _telemetry_row(item: Incoming, message: TelemetryMessage) -> dict[str, Any]:
    fields = message.model_dump(exclude={"schema_version"})
    return {**fields, "device_id": item.device_id, "received_at": item.received_at}


_TELEMETRY_TABLE: Table = TelemetrySample.__table__  # type: ignore[attr-defined]


def _insert_ignoring_duplicates(engine: Engine) -> Any:
    # Core, not ORM: the ORM's bulk-insert bookkeeping was 60% of the writer's time in
    # bench/ingest.py. The unique message id is the last word on duplicates if writers race.
    if engine.dialect.name == "postgresql":
        return pg_insert(_TELEMETRY_TABLE).on_conflict_do_nothing(index_elements=["message_id"])
    if engine.dialect.name == "sqlite":
        return sqlite_insert(_TELEMETRY_TABLE).on_conflict_do_nothing(index_elements=["message_id"])
    return insert(_TELEMETRY_TABLE)


def write_batch(engine: Engine, batch: Sequence[Incoming]) -> BatchResult:
    """Store telemetry once per message id and apply status changes, all in one commit."""
    result = BatchResult()
    device_ids = {item.device_id for item in batch}
    with session_scope(engine) as session:
        devices = {
            d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(device_ids)))
        }
        telemetry_ids = [
            i.message.message_id for i in batch if isinstance(i.message, TelemetryMessage)
        ]
        seen: set[str] = set()
        if telemetry_ids:
            seen.update(
                session.exec(
                    select(TelemetrySample.message_id).where(
                        col(TelemetrySample.message_id).in_(telemetry_ids)
                    )
                )
            )
        rows: list[dict[str, Any]] = []
        touched: set[str] = set()
        for item in batch:
            device = devices.get(item.device_id)
            if device is None:
                result.unknown_devices += 1
                continue
            message = item.message
            if isinstance(message, TelemetryMessage):
                if message.message_id in seen:
                    result.duplicates += 1
                    continue
                seen.add(message.message_id)
                rows.append(_telemetry_row(item, message))
                if _is_newer(message, device.latest_telemetry):
                    device.latest_telemetry = message.model_dump(mode="json")
                    device.agent_version = message.agent_version
            elif message.message_id == device.status_message_id:
                result.duplicates += 1
                continue
            else:
                device.status = message.state.value
                device.status_message_id = message.message_id
                device.status_changed_at = item.received_at
                device.agent_version = message.agent_version
                result.stored += 1
            if device.last_seen is None or item.received_at > device.last_seen:
                device.last_seen = item.received_at
            touched.add(device.id)
        if rows:
            session.connection().execute(_insert_ignoring_duplicates(engine), rows)
        for device_id in touched:
            session.add(devices[device_id])
        result.stored += len(rows)
        session.flush()
        result.changed = [device_public(devices[d]) for d in sorted(touched)]
    return result


def _is_newer(message: TelemetryMessage, latest: dict[str, Any] | None) -> bool:
    if latest is None:
        return True
    return message.timestamp >= datetime.fromisoformat(latest["timestamp"])
