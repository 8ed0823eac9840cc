"""Request and response shapes of the REST API (tables stay out of the API surface)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from fleet_protocol import RuntimeConfig
from fleet_protocol.control import COMMAND_TYPE_PATTERN

__all__ = [
    "CommandBroadcast",
    "CommandCreate",
    "CommandPublic",
    "CommandStatus",
    "DesiredPublic",
    "DesiredUpdate",
    "DevicePublic",
    "HealthPublic",
    "IngestStats",
    "LogRecordPublic",
    "RegistrationKeyCreate",
    "RegistrationKeyCreated",
    "RegistrationKeyPublic",
    "TelemetryPoint",
    "TokenResponse",
]

TagKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
TagValue = Annotated[str, Field(max_length=128)]


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class TokenResponse(_Public):
    """OAuth2 password-flow answer."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105  (the OAuth2 token type)
    expires_in: int


class HealthPublic(_Public):
    """Liveness of the service and its parts."""

    status: Literal["ok", "degraded"]
    database: bool
    mqtt_connected: bool


class RegistrationKeyCreate(BaseModel):
    """Body of ``POST /api/v1/keys``."""

    model_config = ConfigDict(extra="forbid")

    expires_in_s: Annotated[int, Field(ge=60, le=365 * 86_400)] = 86_400
    max_uses: Annotated[int, Field(ge=1, le=100_000)] = 1
    tags: Annotated[dict[TagKey, TagValue], Field(max_length=32)] = Field(default_factory=dict)


class RegistrationKeyPublic(_Public):
    """A registration key as listed: never the key itself."""

    id: str
    created_at: datetime
    expires_at: datetime
    max_uses: int
    uses: int
    tags: dict[str, str]
    revoked_at: datetime | None
    state: Literal["active", "expired", "used-up", "revoked"]


class RegistrationKeyCreated(RegistrationKeyPublic):
    """Answer to key creation: the only time the key and its join token are shown."""

    key: str
    join_token: str


class TelemetryPoint(_Public):
    """One telemetry sample as charts read it."""

    timestamp: AwareDatetime
    cpu_percent: float
    memory_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_percent: float
    load_1: float
    temperature_c: float | None
    net_bytes_sent: int
    net_bytes_recv: int
    uptime_s: float


class DevicePublic(_Public):
    """A device with its status and latest telemetry."""

    id: str
    hostname: str
    tags: dict[str, str]
    status: Literal["online", "offline", "unknown"]
    last_seen: AwareDatetime | None
    enrolled_at: AwareDatetime
    agent_version: str | None
    architecture: str | None
    platform: str | None
    telemetry: TelemetryPoint | None
    desired_generation: int
    reported_generation: int | None
    reported_applied: bool | None
    reported_detail: str | None


class IngestStats(_Public):
    """Counters of the MQTT ingestion since the service started."""

    connected: bool
    received: int
    stored: int
    duplicates: int
    rejected: dict[str, int]
    batches: int


Scalar = str | int | float | bool | None
CommandStatus = Literal[
    "pending", "accepted", "running", "succeeded", "failed", "rejected", "expired", "dropped"
]


class CommandCreate(BaseModel):
    """Body of ``POST /api/v1/devices/{id}/commands``."""

    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, Field(pattern=COMMAND_TYPE_PATTERN)]
    params: Annotated[dict[str, Scalar], Field(max_length=64)] = Field(default_factory=dict)
    # Long enough for a device on a flaky link to come back; short enough that a stale
    # restart or config change does not surprise anyone hours later.
    expires_in_s: Annotated[int, Field(ge=5, le=7 * 86_400)] = 300


class CommandBroadcast(CommandCreate):
    """Body of ``POST /api/v1/commands``: the same command to every device with a tag."""

    tag: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+=.*$", max_length=200)]


class CommandPublic(_Public):
    """A command and where it is in its lifecycle."""

    id: str
    device_id: str
    type: str
    params: dict[str, Scalar]
    status: CommandStatus
    detail: str | None
    result: dict[str, Scalar] | None
    issued_by: str
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    published_at: AwareDatetime | None
    updated_at: AwareDatetime


class LogRecordPublic(_Public):
    """One stored agent log record."""

    device_id: str
    message_id: str
    timestamp: AwareDatetime
    level: str
    logger: str
    message: str


class DesiredUpdate(BaseModel):
    """Body of ``PUT /api/v1/devices/{id}/desired``."""

    model_config = ConfigDict(extra="forbid")

    config: RuntimeConfig


class DesiredPublic(_Public):
    """A device's desired state and how far the device has applied it."""

    device_id: str
    generation: int
    config: RuntimeConfig
    updated_at: AwareDatetime | None
    reported_generation: int | None
    reported_applied: bool | None
