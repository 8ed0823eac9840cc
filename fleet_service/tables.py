"""SQLModel tables of the control plane (a "model" in this package means an ML model)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Dialect, Index, String, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "Command",
    "CommandAck",
    "Deployment",
    "DeploymentTarget",
    "Device",
    "DeviceLog",
    "InferenceResult",
    "ModelRelease",
    "RegistrationKey",
    "TelemetrySample",
    "UTCDateTime",
    "User",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite drops the zone; this puts it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _utc_column(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class User(SQLModel, table=True):
    """An operator who logs in to the API and dashboard."""

    __tablename__ = "app_user"  # "user" is reserved in PostgreSQL

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    password_hash: str
    role: str = "admin"
    created_at: datetime = _utc_column()


class RegistrationKey(SQLModel, table=True):
    """An owner-generated key that lets devices enroll; only its hash is stored."""

    __tablename__ = "registration_key"

    id: str = Field(primary_key=True, max_length=32)
    key_hash: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    created_at: datetime = _utc_column()
    expires_at: datetime = _utc_column()
    max_uses: int
    uses: int = 0
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    revoked_at: datetime | None = _utc_column(nullable=True)
    created_by: str


class Device(SQLModel, table=True):
    """An enrolled device, with its current status and latest telemetry for fast listing."""

    id: str = Field(primary_key=True, max_length=64)
    hostname: str = ""
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    enrolled_at: datetime = _utc_column()
    registration_key_id: str | None = None
    token_hash: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    cert_serial: str
    cert_not_after: datetime = _utc_column()
    status: str = "unknown"
    # Status is applied in arrival order: a Last Will is stamped when the agent connects, so its
    # timestamp is older than the birth it follows. The id stops a redelivered retained copy of
    # the status already applied from being counted as news.
    status_message_id: str | None = Field(default=None, max_length=64)
    status_changed_at: datetime | None = _utc_column(nullable=True)
    last_seen: datetime | None = _utc_column(nullable=True)
    agent_version: str | None = None
    latest_telemetry: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Desired state: bumped by operators, published retained; the device reports what it applied.
    desired_generation: int = 0
    desired_config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    desired_updated_at: datetime | None = _utc_column(nullable=True)
    reported_generation: int | None = None
    reported_applied: bool | None = None
    reported_detail: str | None = None
    reported_message_id: str | None = Field(default=None, max_length=64)
    # Model assignments (fleet_protocol ModelAssignment dicts) published in the desired state, and
    # the device's per-model reports (ModelReport dicts by model name).
    desired_models: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    reported_models: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}")
    )


class TelemetrySample(SQLModel, table=True):
    """One telemetry message; ``message_id`` is unique so a redelivery is stored once."""

    __tablename__ = "telemetry_sample"
    __table_args__ = (
        UniqueConstraint("message_id", name="uq_telemetry_message_id"),
        Index("ix_telemetry_device_time", "device_id", "timestamp"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    message_id: str = Field(max_length=64)
    timestamp: datetime = _utc_column()
    received_at: datetime = _utc_column()
    cpu_percent: float
    load_1: float
    load_5: float
    load_15: float
    memory_percent: float
    memory_used_bytes: int = Field(sa_type=BigInteger)  # byte counters pass 2**31
    memory_total_bytes: int = Field(sa_type=BigInteger)  # byte counters pass 2**31
    disk_percent: float
    disk_used_bytes: int = Field(sa_type=BigInteger)  # byte counters pass 2**31
    disk_total_bytes: int = Field(sa_type=BigInteger)  # byte counters pass 2**31
    net_bytes_sent: int = Field(sa_type=BigInteger)  # byte counters pass 2**31
    net_bytes_recv: int = Field(sa_type=BigInteger)  # byte counters pass 2**31
    temperature_c: float | None = None
    uptime_s: float
    agent_version: str
    architecture: str
    platform: str


class Command(SQLModel, table=True):
    """A command to one device; stored before it is published, updated by the device's acks."""

    __table_args__ = (Index("ix_command_device_status", "device_id", "status"),)

    id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    type: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", max_length=16)
    detail: str | None = None
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    issued_by: str = Field(max_length=64)
    issued_at: datetime = _utc_column()
    expires_at: datetime = _utc_column(index=True)
    # When it was handed to the broker; None while it waits (service offline, device queue full).
    published_at: datetime | None = _utc_column(nullable=True)
    updated_at: datetime = _utc_column()


class CommandAck(SQLModel, table=True):
    """Every ack a device sent, once per message id: the command's history."""

    __tablename__ = "command_ack"
    __table_args__ = (UniqueConstraint("message_id", name="uq_command_ack_message_id"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(max_length=64)
    command_id: str = Field(max_length=64, index=True)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    status: str = Field(max_length=16)
    detail: str | None = None
    timestamp: datetime = _utc_column()
    received_at: datetime = _utc_column()


class DeviceLog(SQLModel, table=True):
    """One agent log record, stored once per message id."""

    __tablename__ = "device_log"
    __table_args__ = (
        UniqueConstraint("message_id", name="uq_device_log_message_id"),
        Index("ix_device_log_device_time", "device_id", "timestamp"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    message_id: str = Field(max_length=64)
    timestamp: datetime = _utc_column()
    received_at: datetime = _utc_column()
    level: str = Field(max_length=16)
    level_no: int  # for "at or above" filters
    logger: str = Field(max_length=200)
    message: str


class ModelRelease(SQLModel, table=True):
    """One signed release of a model: its manifest, and the key if its files are sealed."""

    __tablename__ = "model_release"
    __table_args__ = (UniqueConstraint("name", "release", name="uq_model_release_number"),)

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=64, index=True)
    version: str = Field(max_length=64)
    runtime: str = Field(max_length=16)
    # Rises by one per release of ``name``; a rollback is a new release of older files.
    release: int
    # The fleet_protocol SignedManifest, exactly as signed.
    signed_manifest: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # Base64 AES-256 key for a sealed release; it leaves the service only inside the desired
    # state of targeted devices.
    encryption_key: str | None = Field(default=None, max_length=64)
    stored_bytes: int = Field(sa_type=BigInteger)
    rollback_of: str | None = Field(default=None, max_length=32)
    created_by: str = Field(max_length=64)
    created_at: datetime = _utc_column()
    expires_at: datetime = _utc_column()


class Deployment(SQLModel, table=True):
    """Put a release on a set of devices, batch by batch."""

    id: str = Field(primary_key=True, max_length=32)
    release_id: str = Field(foreign_key="model_release.id", max_length=32, index=True)
    model_name: str = Field(max_length=64, index=True)
    target_tag: str | None = Field(default=None, max_length=200)
    target_device_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    batch_size: int
    pause_s: float
    max_failure_ratio: float
    # {"metric": "error_rate"|"p95_latency_ms"|"mean_confidence"|"tokens_per_s",
    #  "margin": float, "min_results": int} or None for no canary gate.
    canary: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # InferenceSchedule dicts that ride along with the assignment.
    schedules: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    state: str = Field(max_length=16, index=True)
    current_batch: int = 0
    batch_started_at: datetime | None = _utc_column(nullable=True)
    next_batch_at: datetime | None = _utc_column(nullable=True)
    detail: str | None = None
    created_by: str = Field(max_length=64)
    created_at: datetime = _utc_column()
    updated_at: datetime = _utc_column()


class DeploymentTarget(SQLModel, table=True):
    """One device in a deployment: its batch and how it fared."""

    __tablename__ = "deployment_target"
    __table_args__ = (
        UniqueConstraint("deployment_id", "device_id", name="uq_deployment_target_device"),
    )

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: str = Field(foreign_key="deployment.id", max_length=32, index=True)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    batch: int
    state: str = Field(max_length=16)
    # The release the device ran before, so a rollback knows where to go back to.
    previous_release_id: str | None = Field(default=None, max_length=32)
    # The desired generation that carried the release (or its rollback) to the device: only a
    # report of that generation or later speaks about it (migration 0004).
    sent_generation: int | None = None
    detail: str | None = None
    updated_at: datetime = _utc_column()


class InferenceResult(SQLModel, table=True):
    """One inference result from a device, stored once per message id."""

    __tablename__ = "inference_result"
    __table_args__ = (
        UniqueConstraint("message_id", name="uq_inference_result_message_id"),
        Index("ix_inference_result_model_time", "model", "timestamp"),
        Index("ix_inference_result_device_model_time", "device_id", "model", "timestamp"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=64)
    message_id: str = Field(max_length=64)
    timestamp: datetime = _utc_column()
    received_at: datetime = _utc_column()
    model: str = Field(max_length=64)
    version: str = Field(max_length=64)
    release: int
    sha256: str = Field(max_length=64)
    runtime: str = Field(max_length=16)
    source: str = Field(max_length=16)
    input_ref: str | None = Field(default=None, max_length=500)
    latency_ms: float
    label: str | None = Field(default=None, max_length=200)
    confidence: float | None = None
    scores: dict[str, float] | None = Field(default=None, sa_column=Column(JSON))
    text: str | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    error: str | None = None
