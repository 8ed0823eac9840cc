"""Payloads the control plane sends to a device: commands, receipts and desired state."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from fleet_protocol.messages import JsonScalar, LogLevel

__all__ = [
    "COMMAND_TYPE_PATTERN",
    "MAX_RECEIPT_IDS",
    "CommandMessage",
    "DesiredState",
    "ReceiptMessage",
    "RuntimeConfig",
]

# Command types are registry keys on both sides: lowercase words joined by '-'.
COMMAND_TYPE_PATTERN = r"^[a-z][a-z0-9-]{1,63}$"
# One receipt names at most this many message ids, so it stays far below the payload limit
# (a hex id is 32 bytes; 500 of them plus JSON quoting is about 18 KiB).
MAX_RECEIPT_IDS = 500

MessageId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class _ControlMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_payload(self) -> bytes:
        """Serialise for MQTT."""
        return self.model_dump_json().encode()


class CommandMessage(_ControlMessage):
    """On ``devices/{id}/commands`` (QoS 1): one command; the device answers on ``acks``."""

    id: MessageId
    type: Annotated[str, Field(pattern=COMMAND_TYPE_PATTERN)]
    params: Annotated[dict[str, JsonScalar], Field(max_length=64)] = Field(default_factory=dict)
    issued_at: AwareDatetime
    expires_at: AwareDatetime

    def is_expired(self, now: datetime) -> bool:
        """Whether a device must refuse it as expired at ``now``."""
        return now >= self.expires_at


class ReceiptMessage(_ControlMessage):
    """On ``devices/{id}/receipts``: ids of the device's messages the service has committed."""

    message_ids: Annotated[list[MessageId], Field(min_length=1, max_length=MAX_RECEIPT_IDS)]


class RuntimeConfig(_ControlMessage):
    """Agent settings an operator can change remotely; None leaves the agent's own value."""

    telemetry_interval_s: Annotated[float, Field(ge=1, le=86_400)] | None = None
    log_level: LogLevel | None = None
    # Records at or above this level are forwarded on ``logs``.
    log_forward_level: LogLevel | None = None


class DesiredState(_ControlMessage):
    """Retained on ``devices/{id}/desired``: what the device should converge to."""

    generation: Annotated[int, Field(ge=0)]
    config: RuntimeConfig = Field(default_factory=RuntimeConfig)
