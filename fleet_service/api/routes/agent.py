"""The HTTPS fallback for agents that cannot keep an MQTT session (port blocked, proxy only).

Authenticated with the device token from enrollment. Messages posted here go through the same
validation and writer as MQTT ones, and the answer names the ids now stored: the receipt.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from fleet_protocol import (
    CommandMessage,
    DesiredState,
    MalformedPayloadError,
    TopicKind,
    decode,
)
from fleet_service.api.deps import ContextDep, DeviceIdDep
from fleet_service.commands import command_message, pending_for_device
from fleet_service.db import session_scope
from fleet_service.dispatch import desired_message
from fleet_service.ingest.writer import MODELS_BY_KIND, Incoming, write_batch
from fleet_service.tables import Device

__all__ = ["router"]

router = APIRouter(prefix="/agent", tags=["agent (HTTPS fallback)"])

# A poll's worth of messages; an agent with more sends several requests.
MAX_MESSAGES_PER_POST = 500


class AgentMessage(BaseModel):
    """One device message as it would have been published on ``kind``."""

    model_config = ConfigDict(extra="forbid")

    # A result names its model in its payload, which stands in for the topic's last level.
    kind: Literal["telemetry", "acks", "logs", "reported", "results"]
    payload: dict[str, JsonValue]


class AgentMessages(BaseModel):
    """Body of ``POST /api/v1/agent/messages``."""

    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[AgentMessage], Field(min_length=1, max_length=MAX_MESSAGES_PER_POST)]


class Rejected(BaseModel):
    """A message that failed validation; it will never be stored, so drop it."""

    index: int
    reason: str


class AgentReceipt(BaseModel):
    """What was stored (delete these from the outbox) and what was refused."""

    stored: list[str]
    rejected: list[Rejected]


@router.get("/commands")
def commands(context: ContextDep, device_id: DeviceIdDep) -> list[CommandMessage]:
    """Commands waiting for this device; they count as delivered once returned."""
    now = datetime.now(UTC)
    with session_scope(context.engine) as session:
        pending = pending_for_device(session, device_id, now, context.settings.command_limits)
        for command in pending:
            command.published_at = command.published_at or now
            session.add(command)
        return [command_message(c) for c in pending]


@router.get("/desired")
def desired(context: ContextDep, device_id: DeviceIdDep) -> DesiredState:
    """This device's desired state."""
    with session_scope(context.engine) as session:
        device = session.get(Device, device_id)
        assert device is not None  # the token just resolved to it
        return desired_message(device)


@router.post("/messages")
async def messages(
    body: AgentMessages, context: ContextDep, device_id: DeviceIdDep
) -> AgentReceipt:
    """Store device messages exactly as MQTT ingestion would; the answer is the receipt."""
    now = datetime.now(UTC)
    items: list[Incoming] = []
    rejected: list[Rejected] = []
    counters = context.counters
    for index, message in enumerate(body.messages):
        counters.receive(message.kind)
        try:
            model = MODELS_BY_KIND[TopicKind(message.kind)]
            parsed = decode(model, json.dumps(message.payload).encode())
        except MalformedPayloadError as exc:
            counters.reject(exc.reason, message.kind)
            rejected.append(Rejected(index=index, reason=str(exc)))
            continue
        items.append(Incoming(device_id, parsed, now))
    stored: list[str] = []
    if items:
        started = time.perf_counter()
        result = await asyncio.to_thread(write_batch, context.engine, items)
        counters.record(result, size=len(items), seconds=time.perf_counter() - started)
        result.announce(context.hub)
        stored = result.receipts.get(device_id, [])
    return AgentReceipt(stored=stored, rejected=rejected)
