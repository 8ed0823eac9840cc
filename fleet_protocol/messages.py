"""Frozen pydantic payloads of the MQTT topics; bytes become these models at the edge.

Every device-originated message carries ``schema_version``, a unique ``message_id`` and a
``timestamp``, so the service can store each message once however often it is redelivered.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from fleet_protocol.manifest import MODEL_NAME_PATTERN, ModelRuntime
from fleet_protocol.topics import DEVICE_ID_PATTERN

__all__ = [
    "CERT_SERIAL_PATTERN",
    "MAX_CSR_PEM_CHARS",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "CsrMessage",
    "DeviceMessage",
    "DeviceState",
    "MalformedPayloadError",
    "StatusMessage",
    "TelemetryMessage",
    "decode",
]

SCHEMA_VERSION = 1

# Telemetry and status are a few hundred bytes; anything near this is a bug or an attack. The
# broker's own limit (broker/templates) is set higher, so this check is what names the problem.
MAX_PAYLOAD_BYTES = 64 * 1024

NonNegative = Annotated[float, Field(ge=0)]
Percent = Annotated[float, Field(ge=0, le=100)]
Counter = Annotated[int, Field(ge=0)]
M = TypeVar("M", bound=BaseModel)

# A certificate serial as lowercase hex without leading zeros: X.509 serials are at most 20 bytes.
CERT_SERIAL_PATTERN = r"^[0-9a-f]{1,40}$"
# A PEM CSR for an EC P-384 or RSA 4096 key is under 2 KiB; the bound is the enrollment API's.
MAX_CSR_PEM_CHARS = 16_384


class MalformedPayloadError(ValueError):
    """A payload is not valid JSON for its topic's model, or is too large."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # a short, stable label for metrics: "json", "schema", "size"
        self.detail = detail


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


class DeviceMessage(BaseModel):
    """Fields every device-originated message carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    message_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = (
        Field(default_factory=_new_id)
    )
    timestamp: AwareDatetime = Field(default_factory=_now)

    def to_payload(self) -> bytes:
        """Serialise for MQTT."""
        return self.model_dump_json().encode()


class DeviceState(StrEnum):
    """Connection state announced on ``status``."""

    ONLINE = "online"
    OFFLINE = "offline"


class StatusMessage(DeviceMessage):
    """Retained on ``devices/{id}/status``: birth ``online`` on connect, Last Will ``offline``."""

    state: DeviceState
    agent_version: Annotated[str, Field(max_length=64)]
    reason: Annotated[str, Field(max_length=200)] | None = None


class TelemetryMessage(DeviceMessage):
    """Published on ``devices/{id}/telemetry`` every ``telemetry_interval`` seconds."""

    cpu_percent: Percent
    load_1: NonNegative
    load_5: NonNegative
    load_15: NonNegative
    memory_percent: Percent
    memory_used_bytes: Counter
    memory_total_bytes: Counter
    disk_percent: Percent
    disk_used_bytes: Counter
    disk_total_bytes: Counter
    net_bytes_sent: Counter
    net_bytes_recv: Counter
    temperature_c: Annotated[float, Field(ge=-80, le=200)] | None = None
    uptime_s: NonNegative
    agent_version: Annotated[str, Field(max_length=64)]
    architecture: Annotated[str, Field(max_length=32)]
    platform: Annotated[str, Field(max_length=200)]
    # What a deployment's constraint check reads: memory a new model could still take, and the
    # runtimes that import on this device. Optional so older agents stay valid.
    memory_available_bytes: Counter | None = None
    runtimes: Annotated[list[ModelRuntime], Field(max_length=8)] = Field(default_factory=list)
    # The client certificate the agent holds now (it renews it before ``cert_not_after``), so an
    # operator sees a device that failed to renew before the broker starts refusing it.
    cert_serial: Annotated[str, Field(pattern=CERT_SERIAL_PATTERN)] | None = None
    cert_not_after: AwareDatetime | None = None


class AckStatus(StrEnum):
    """A command's lifecycle as the device reports it on ``acks``."""

    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """Whether no later status can follow this one."""
        return self in (
            AckStatus.SUCCEEDED,
            AckStatus.FAILED,
            AckStatus.REJECTED,
            AckStatus.EXPIRED,
        )


JsonScalar = str | int | float | bool | None


class AckMessage(DeviceMessage):
    """Published on ``devices/{id}/acks`` as a command moves through its lifecycle."""

    command_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    status: AckStatus
    detail: Annotated[str, Field(max_length=2000)] | None = None
    result: Annotated[dict[str, JsonScalar], Field(max_length=64)] | None = None


class ModelPhase(StrEnum):
    """Where a device is with one assigned model release."""

    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    LOADING = "loading"
    RUNNING = "running"
    # The release was tried and did not pass (download, verify, load or health check); the
    # previous release, if any, serves again.
    FAILED = "failed"
    # The release was refused before any download: signature, expiry, downgrade, architecture,
    # disk space or a missing runtime.
    REFUSED = "refused"

    @property
    def is_final(self) -> bool:
        """Whether the device has finished with this release, one way or the other."""
        return self in (ModelPhase.RUNNING, ModelPhase.FAILED, ModelPhase.REFUSED)


class ModelReport(BaseModel):
    """One model's state on a device, inside :class:`ReportedState`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    # The release the device was told to run (desired), and how far it got with it.
    release_id: Annotated[str, Field(max_length=64)]
    release: Annotated[int, Field(ge=1)]
    version: Annotated[str, Field(max_length=64)]
    phase: ModelPhase
    healthy: bool = False
    detail: Annotated[str, Field(max_length=2000)] | None = None
    bytes_done: Counter = 0
    bytes_total: Counter = 0
    # What actually serves now (the new release, or the previous one after a failure).
    active_release: Annotated[int, Field(ge=1)] | None = None
    active_version: Annotated[str, Field(max_length=64)] | None = None
    # The highest release this device accepted (passed its health check); lower ones are refused.
    accepted_release: Annotated[int, Field(ge=0)] = 0
    worker_restarts: Counter = 0


class ReportedState(DeviceMessage):
    """Retained on ``devices/{id}/reported``: how far the device got applying a desired state."""

    generation: Annotated[int, Field(ge=0)]
    applied: bool
    detail: Annotated[str, Field(max_length=2000)] | None = None
    config: dict[str, JsonScalar] = Field(default_factory=dict)
    models: Annotated[dict[str, ModelReport], Field(max_length=16)] = Field(default_factory=dict)


class ResultSource(StrEnum):
    """What asked for an inference."""

    COMMAND = "command"
    SCHEDULE = "schedule"
    API = "api"


class ResultMessage(DeviceMessage):
    """On ``devices/{id}/results/{model}``: one inference outcome and where it came from.

    Raw input stays on the device; ``input_ref`` names it (a file path, a command, a request id).
    A failed inference is reported too (``error`` set), so error rates can be computed.
    """

    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    version: Annotated[str, Field(max_length=64)]
    release: Annotated[int, Field(ge=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # of the weights file
    runtime: ModelRuntime
    source: ResultSource
    input_ref: Annotated[str, Field(max_length=500)] | None = None
    latency_ms: NonNegative
    label: Annotated[str, Field(max_length=200)] | None = None
    confidence: Annotated[float, Field(ge=0, le=1)] | None = None
    scores: Annotated[dict[str, float], Field(max_length=100)] | None = None
    text: Annotated[str, Field(max_length=8000)] | None = None
    tokens: Counter | None = None
    tokens_per_s: NonNegative | None = None
    error: Annotated[str, Field(max_length=2000)] | None = None


class CsrMessage(DeviceMessage):
    """On ``devices/{id}/csr`` (QoS 1): renew this device's certificate for a new key.

    The CSR is made on the device for a key that never leaves it, with an empty subject and no
    extensions, as at enrollment: the service decides what the certificate says. ``device_id``
    must be the id of the topic it is sent on. The answer, on ``certificate``, names this
    message's ``message_id`` as its ``request_id``.
    """

    device_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern)]
    csr_pem: Annotated[str, Field(min_length=1, max_length=MAX_CSR_PEM_CHARS)]


class LogLevel(StrEnum):
    """Log levels a device forwards, as in Python's logging."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class LogMessage(DeviceMessage):
    """One agent log record on ``devices/{id}/logs``."""

    level: LogLevel
    logger: Annotated[str, Field(max_length=200)]
    message: Annotated[str, Field(max_length=8000)]


def decode(model: type[M], payload: bytes) -> M:
    """Validate ``payload`` as ``model`` or raise :class:`MalformedPayloadError`."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedPayloadError("size", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = "json" if first["type"] == "json_invalid" else "schema"
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise MalformedPayloadError(reason, f"{where}: {first['msg']}") from exc
