"""SQLModel tables of the control plane (a "model" in this package means an ML model)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Dialect, Index, String, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "ApiToken",
    "AuditEvent",
    "AuthSession",
    "Command",
    "CommandAck",
    "Deployment",
    "DeploymentTarget",
    "Device",
    "DeviceLog",
    "InferenceResult",
    "Integration",
    "IssuedCertificate",
    "MaintenanceCursor",
    "ModelRelease",
    "RegistrationKey",
    "ResultHourly",
    "TelemetryHourly",
    "TelemetrySample",
    "UTCDateTime",
    "User",
    "Webhook",
    "WebhookDelivery",
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


def _utc_column(*, nullable: bool = False, index: bool = False, primary_key: bool = False) -> Any:
    return Field(
        sa_column=Column(UTCDateTime(), nullable=nullable, index=index, primary_key=primary_key)
    )


class User(SQLModel, table=True):
    """An operator who logs in to the API and dashboard."""

    __tablename__ = "app_user"  # "user" is reserved in PostgreSQL

    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    password_hash: str
    role: str = "admin"  # admin, operator or viewer (fleet_service.roles)
    created_at: datetime = _utc_column()
    # Migration 0005: the audit flags operators who have not logged in for long; a disabled
    # user keeps their audit trail but can no longer log in or refresh.
    last_login_at: datetime | None = _utc_column(nullable=True)
    disabled_at: datetime | None = _utc_column(nullable=True)


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
    # Migration 0005: a revoked device keeps its history but its certificates are on the CRL, its
    # token is refused and its identity cannot enroll again.
    revoked_at: datetime | None = _utc_column(nullable=True)
    revoked_by: str | None = Field(default=None, max_length=200)
    # Set by decommissioning (a revocation that also clears the device's retained topics); the
    # primary's broker policy loop clears them again after each start, in case the broker's
    # periodic persistence lost the clearing.
    decommissioned_at: datetime | None = _utc_column(nullable=True)
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


class AuthSession(SQLModel, table=True):
    """One login: its refresh token (hashed) and the access tokens that name it (``sid``).

    Logout or a refresh-token reuse revokes it, and with it every access token it issued.
    """

    __tablename__ = "auth_session"

    id: str = Field(primary_key=True, max_length=32)
    user_id: int = Field(foreign_key="app_user.id", index=True)
    refresh_hash: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    created_at: datetime = _utc_column()
    expires_at: datetime = _utc_column()
    last_used_at: datetime = _utc_column()
    revoked_at: datetime | None = _utc_column(nullable=True)
    address: str | None = Field(default=None, max_length=64)


class ApiToken(SQLModel, table=True):
    """A bearer token for automation: a role, optionally confined to one device tag."""

    __tablename__ = "api_token"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=64)
    token_hash: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    role: str = Field(max_length=16)
    tag: str | None = Field(default=None, max_length=200)  # "key=value"; None: every device
    created_by: str = Field(max_length=200)
    created_at: datetime = _utc_column()
    expires_at: datetime = _utc_column()
    last_used_at: datetime | None = _utc_column(nullable=True)
    revoked_at: datetime | None = _utc_column(nullable=True)


class AuditEvent(SQLModel, table=True):
    """One state-changing action: who, what, on which target, when, from where, outcome.

    Written in the same transaction as the change it records; the API only reads it.
    """

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_at", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _utc_column()
    actor: str = Field(max_length=200)  # "alice", "token:ci-bot", "oidc:bob", "cli:root"
    actor_kind: str = Field(max_length=16)  # user, token, oidc, cli, device, system
    role: str | None = Field(default=None, max_length=16)
    action: str = Field(max_length=64, index=True)  # e.g. "device.revoke"
    target: str | None = Field(default=None, max_length=200)
    address: str | None = Field(default=None, max_length=64)
    outcome: str = Field(max_length=16)  # success, denied, failed
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class IssuedCertificate(SQLModel, table=True):
    """Every client certificate the fleet CA issued; the CRL lists the revoked, unexpired ones."""

    __tablename__ = "issued_certificate"

    serial: str = Field(primary_key=True, max_length=64)  # hex
    identity: str = Field(max_length=200, index=True)  # the CN
    kind: str = Field(max_length=16)  # device, integration
    issued_at: datetime = _utc_column()
    not_after: datetime = _utc_column()
    revoked_at: datetime | None = _utc_column(nullable=True)
    reason: str | None = Field(default=None, max_length=200)
    # "sha256:<hex>" of the certified public key (pki.public_key_fingerprint): enrollment
    # refuses a key that a revoked certificate held, so a revoked identity cannot come back
    # under a new id. None for certificates recorded before migration 0005.
    public_key_sha256: str | None = Field(default=None, max_length=71, index=True)


class Integration(SQLModel, table=True):
    """A third-party system that reads granted device topics over MQTT with its own cert."""

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    identity: str = Field(sa_column=Column(String(200), unique=True, nullable=False))  # cert CN
    grants: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tag: str | None = Field(default=None, max_length=200)  # "key=value"; None: every device
    cert_serial: str = Field(max_length=64)
    cert_not_after: datetime = _utc_column()
    created_by: str = Field(max_length=200)
    created_at: datetime = _utc_column()
    revoked_at: datetime | None = _utc_column(nullable=True)


class Webhook(SQLModel, table=True):
    """An HTTP endpoint that receives results, signed with its own HMAC secret."""

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(sa_column=Column(String(64), unique=True, nullable=False))
    url: str = Field(max_length=2000)
    # Kept to sign each delivery (HMAC needs the secret itself, not a hash); shown once.
    secret: str = Field(max_length=128)
    models: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tag: str | None = Field(default=None, max_length=200)
    created_by: str = Field(max_length=200)
    created_at: datetime = _utc_column()
    disabled_at: datetime | None = _utc_column(nullable=True)


class WebhookDelivery(SQLModel, table=True):
    """One result to deliver to one webhook: queued with the result, retried with backoff."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        UniqueConstraint("webhook_id", "message_id", name="uq_webhook_delivery_message"),
        Index("ix_webhook_delivery_due", "state", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: str = Field(foreign_key="webhook.id", max_length=32, index=True)
    message_id: str = Field(max_length=64)
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    state: str = Field(max_length=16)  # pending, delivered, failed, cancelled (webhook disabled)
    attempts: int = 0
    next_attempt_at: datetime = _utc_column()
    last_status: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = _utc_column()
    delivered_at: datetime | None = _utc_column(nullable=True)


# Migration 0006: hourly rollups, kept after the raw rows are deleted (fleet_service/retention.py).
# Sums and counts rather than means, so an hour rolled up in several passes (late data, an hour
# still running) merges exactly.


class TelemetryHourly(SQLModel, table=True):
    """One device's telemetry in one UTC hour: min, max and sum of the charted values."""

    __tablename__ = "telemetry_hourly"

    device_id: str = Field(foreign_key="device.id", max_length=64, primary_key=True)
    hour: datetime = _utc_column(primary_key=True)
    samples: int
    cpu_min: float
    cpu_max: float
    cpu_sum: float
    memory_min: float
    memory_max: float
    memory_sum: float
    disk_sum: float
    load_min: float
    load_max: float
    load_sum: float
    # Devices without a sensor send no temperature: its own count.
    temperature_samples: int = 0
    temperature_min: float | None = None
    temperature_max: float | None = None
    temperature_sum: float = 0.0
    memory_used_sum: float
    memory_total_max: int = Field(sa_type=BigInteger)
    # Counters: the hour's highest value, so charts derive an hourly rate between two hours.
    net_sent_max: int = Field(sa_type=BigInteger)
    net_recv_max: int = Field(sa_type=BigInteger)
    uptime_max: float


class ResultHourly(SQLModel, table=True):
    """One device's results of one model in one UTC hour."""

    __tablename__ = "result_hourly"
    __table_args__ = (Index("ix_result_hourly_model_hour", "model", "hour"),)

    device_id: str = Field(foreign_key="device.id", max_length=64, primary_key=True)
    model: str = Field(max_length=64, primary_key=True)
    hour: datetime = _utc_column(primary_key=True)
    results: int
    errors: int
    latency_min_ms: float
    latency_max_ms: float
    latency_sum_ms: float
    tokens: int = Field(default=0, sa_type=BigInteger)


class MaintenanceCursor(SQLModel, table=True):
    """How far a background job got through a table: the highest row id it has handled."""

    __tablename__ = "maintenance_cursor"

    name: str = Field(primary_key=True, max_length=64)
    last_id: int = Field(default=0, sa_type=BigInteger)
    updated_at: datetime = _utc_column()
