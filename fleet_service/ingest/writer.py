"""Write one batch of validated device messages in one transaction (blocking: run in a thread).

Each device message id is stored at most once: a redelivered or replayed message is counted as
a duplicate and still receipted, so the device's outbox can let go of it. Inference results
land in their own table; a reported state also carries the device's per-model reports.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from fleet_protocol import (
    AckMessage,
    AckStatus,
    DeviceTopic,
    LogMessage,
    MalformedPayloadError,
    ReportedState,
    ResultMessage,
    StatusMessage,
    TelemetryMessage,
    TopicKind,
    decode,
)
from fleet_service.commands import apply_ack, command_public
from fleet_service.db import session_scope
from fleet_service.events import EventHub
from fleet_service.registry import device_public
from fleet_service.schemas import CommandPublic, DevicePublic, LogRecordPublic, ResultPublic
from fleet_service.tables import (
    Command,
    CommandAck,
    Device,
    DeviceLog,
    InferenceResult,
    TelemetrySample,
)
from fleet_service.webhooks import queue_deliveries

__all__ = [
    "MODELS_BY_KIND",
    "BatchResult",
    "DeviceMessageAny",
    "Incoming",
    "decode_for_topic",
    "write_batch",
]

DeviceMessageAny = (
    StatusMessage | TelemetryMessage | AckMessage | LogMessage | ReportedState | ResultMessage
)

# What each device topic carries; MQTT and the HTTPS fallback validate against the same table.
MODELS_BY_KIND: dict[TopicKind, type[DeviceMessageAny]] = {
    TopicKind.STATUS: StatusMessage,
    TopicKind.TELEMETRY: TelemetryMessage,
    TopicKind.ACKS: AckMessage,
    TopicKind.LOGS: LogMessage,
    TopicKind.REPORTED: ReportedState,
    TopicKind.RESULTS: ResultMessage,
}
# Telemetry fields kept only in Device.latest_telemetry (what the deployment check reads, and
# the certificate the device holds now), not in the history table.
_LATEST_ONLY_TELEMETRY = {
    "schema_version",
    "memory_available_bytes",
    "runtimes",
    "cert_serial",
    "cert_not_after",
}


def decode_for_topic(topic: DeviceTopic, payload: bytes) -> DeviceMessageAny:
    """The payload as its topic's model; :class:`MalformedPayloadError` for anything else,
    including a result whose ``model`` is not the one its topic names (reason ``topic-model``)."""
    message = decode(MODELS_BY_KIND[topic.kind], payload)
    if isinstance(message, ResultMessage) and message.model != topic.model:
        raise MalformedPayloadError(
            "topic-model",
            f"a result for model {message.model!r} was published on the results topic of "
            f"{topic.model!r}; publish it on results/{message.model}",
        )
    return message


@dataclass(frozen=True, slots=True)
class Incoming:
    """A validated message from ``device_id`` as it came off the broker."""

    device_id: str
    message: DeviceMessageAny
    received_at: datetime


@dataclass
class BatchResult:
    """What a batch did, for counters, receipts and the event hub."""

    stored: int = 0  # rows inserted plus state changes applied
    duplicates: int = 0
    unknown_devices: int = 0
    unknown_commands: int = 0
    changed: list[DevicePublic] = field(default_factory=list)
    commands: list[CommandPublic] = field(default_factory=list)
    logs: list[LogRecordPublic] = field(default_factory=list)
    results: list[ResultPublic] = field(default_factory=list)
    # Per device, the ids now safely stored (new or already there): the device's receipt.
    receipts: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def announce(self, hub: EventHub) -> None:
        """Tell the dashboard's event streams what this batch changed."""
        for device in self.changed:
            hub.publish("device", device)
        for command in self.commands:
            hub.publish("command", command)
        for log in self.logs:
            hub.publish("log", log)
        for result in self.results:
            hub.publish("result", result)


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


def _insert_ignoring_duplicates(engine: Engine, model: Any) -> Any:
    # Core, not ORM: the ORM's bulk-insert bookkeeping was 60% of the writer's time in
    # bench/ingest.py. The unique message id is the last word on duplicates if writers race.
    table = _table(model)
    if engine.dialect.name == "postgresql":
        return pg_insert(table).on_conflict_do_nothing(index_elements=["message_id"])
    if engine.dialect.name == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing(index_elements=["message_id"])
    return insert(table)


def _stored_ids(session: Session, model: Any, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    column = col(model.message_id)
    return set(session.exec(select(column).where(column.in_(ids))))


class _Batch:
    """One transaction's worth of work, split by message kind."""

    def __init__(self, session: Session, batch: Sequence[Incoming]) -> None:
        self.session = session
        self.result = BatchResult()
        ids = {item.device_id for item in batch}
        self.devices = {
            d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))
        }
        self.touched: set[str] = set()
        self.telemetry_rows: list[dict[str, Any]] = []
        self.log_rows: list[dict[str, Any]] = []
        self.result_rows: list[dict[str, Any]] = []
        self.seen = {
            TelemetrySample: _stored_ids(session, TelemetrySample, _ids(batch, TelemetryMessage)),
            DeviceLog: _stored_ids(session, DeviceLog, _ids(batch, LogMessage)),
            CommandAck: _stored_ids(session, CommandAck, _ids(batch, AckMessage)),
            InferenceResult: _stored_ids(session, InferenceResult, _ids(batch, ResultMessage)),
        }

    def once(self, model: Any, item: Incoming) -> bool:
        """Whether ``item`` is new for ``model``'s table; receipts it either way."""
        message_id = item.message.message_id
        self.result.receipts[item.device_id].append(message_id)
        if message_id in self.seen[model]:
            self.result.duplicates += 1
            return False
        self.seen[model].add(message_id)
        return True

    def add(self, item: Incoming) -> None:
        device = self.devices.get(item.device_id)
        if device is None:
            self.result.unknown_devices += 1
            return
        message = item.message
        if isinstance(message, TelemetryMessage):
            self._telemetry(device, item, message)
        elif isinstance(message, StatusMessage):
            self._status(device, item, message)
        elif isinstance(message, AckMessage):
            self._ack(device, item, message)
        elif isinstance(message, LogMessage):
            self._log(device, item, message)
        elif isinstance(message, ResultMessage):
            self._result(device, item, message)
        else:
            self._reported(device, item, message)
        if device.last_seen is None or item.received_at > device.last_seen:
            device.last_seen = item.received_at
            self.touched.add(device.id)

    def _telemetry(self, device: Device, item: Incoming, message: TelemetryMessage) -> None:
        if not self.once(TelemetrySample, item):
            return
        fields = message.model_dump(exclude=_LATEST_ONLY_TELEMETRY)
        self.telemetry_rows.append(
            {**fields, "device_id": device.id, "received_at": item.received_at}
        )
        if _is_newer(message, device.latest_telemetry):
            device.latest_telemetry = message.model_dump(mode="json")
            device.agent_version = message.agent_version
            self.touched.add(device.id)

    def _status(self, device: Device, item: Incoming, message: StatusMessage) -> None:
        # Arrival order: a Last Will carries the time its session started, older than the
        # birth it follows. The id stops a redelivered retained copy from counting as news.
        if message.message_id == device.status_message_id:
            self.result.duplicates += 1
            return
        device.status = message.state.value
        device.status_message_id = message.message_id
        device.status_changed_at = item.received_at
        device.agent_version = message.agent_version
        self.result.stored += 1
        self.touched.add(device.id)

    def _ack(self, device: Device, item: Incoming, message: AckMessage) -> None:
        if not self.once(CommandAck, item):
            return
        self.session.add(
            CommandAck(
                message_id=message.message_id,
                command_id=message.command_id,
                device_id=device.id,
                status=message.status.value,
                detail=message.detail,
                timestamp=message.timestamp,
                received_at=item.received_at,
            )
        )
        self.result.stored += 1
        command = self.session.get(Command, message.command_id)
        if command is None or command.device_id != device.id:
            self.result.unknown_commands += 1
            logging.getLogger(__name__).warning(
                "device %s acked unknown command %s", device.id, message.command_id
            )
            return
        if apply_ack(command, AckStatus(message.status), message, item.received_at):
            self.session.add(command)
            self.result.commands.append(command_public(command))

    def _log(self, device: Device, item: Incoming, message: LogMessage) -> None:
        if not self.once(DeviceLog, item):
            return
        row = {
            "device_id": device.id,
            "message_id": message.message_id,
            "timestamp": message.timestamp,
            "received_at": item.received_at,
            "level": message.level.value,
            "level_no": logging.getLevelName(message.level.value),
            "logger": message.logger,
            "message": message.message,
        }
        self.log_rows.append(row)
        self.result.logs.append(LogRecordPublic.model_validate(row))

    def _result(self, device: Device, item: Incoming, message: ResultMessage) -> None:
        if not self.once(InferenceResult, item):
            return
        row = {
            **message.model_dump(exclude={"schema_version"}),
            "device_id": device.id,
            "received_at": item.received_at,
        }
        self.result_rows.append(row)
        self.result.results.append(ResultPublic.model_validate(row))

    def _reported(self, device: Device, item: Incoming, message: ReportedState) -> None:
        self.result.receipts[device.id].append(message.message_id)
        stale = device.reported_generation is not None and (
            message.generation < device.reported_generation
        )
        if message.message_id == device.reported_message_id or stale:
            self.result.duplicates += 1
            return
        device.reported_generation = message.generation
        device.reported_applied = message.applied
        device.reported_detail = message.detail
        device.reported_message_id = message.message_id
        # A new dict: SQLAlchemy only notices a JSON column change on assignment.
        device.reported_models = {
            name: report.model_dump(mode="json") for name, report in message.models.items()
        }
        self.result.stored += 1
        self.touched.add(device.id)

    def finish(self, engine: Engine) -> BatchResult:
        connection = self.session.connection()
        if self.telemetry_rows:
            connection.execute(
                _insert_ignoring_duplicates(engine, TelemetrySample), self.telemetry_rows
            )
        if self.log_rows:
            connection.execute(_insert_ignoring_duplicates(engine, DeviceLog), self.log_rows)
        if self.result_rows:
            connection.execute(
                _insert_ignoring_duplicates(engine, InferenceResult), self.result_rows
            )
            # Webhooks (issue 6): deliveries commit with the results they carry.
            queue_deliveries(self.session, self.result.results, self.devices)
        self.result.stored += len(self.telemetry_rows) + len(self.log_rows) + len(self.result_rows)
        for device_id in self.touched:
            self.session.add(self.devices[device_id])
        self.session.flush()
        self.result.changed = [device_public(self.devices[d]) for d in sorted(self.touched)]
        return self.result


def _ids(batch: Sequence[Incoming], kind: type[Any]) -> list[str]:
    return [i.message.message_id for i in batch if isinstance(i.message, kind)]


def write_batch(engine: Engine, batch: Sequence[Incoming]) -> BatchResult:
    """Store every message of ``batch`` once per message id, all in one commit."""
    with session_scope(engine) as session:
        work = _Batch(session, batch)
        for item in batch:
            work.add(item)
        return work.finish(engine)


def _is_newer(message: TelemetryMessage, latest: dict[str, Any] | None) -> bool:
    if latest is None:
        return True
    return message.timestamp >= datetime.fromisoformat(latest["timestamp"])
