"""Request and response shapes of the REST API (tables stay out of the API surface)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from fleet_protocol import InferenceSchedule, ModelReport, ModelRuntime, ResultSource, RuntimeConfig
from fleet_protocol.control import COMMAND_TYPE_PATTERN

__all__ = [
    "CanaryMetric",
    "CanaryPublic",
    "CanarySpec",
    "CommandBroadcast",
    "CommandCreate",
    "CommandPublic",
    "CommandStatus",
    "DeploymentCreate",
    "DeploymentPreview",
    "DeploymentPublic",
    "DeploymentState",
    "DeploymentTargetPublic",
    "DesiredModelPublic",
    "DesiredPublic",
    "DesiredUpdate",
    "DevicePublic",
    "HealthPublic",
    "IncompatibleDevice",
    "IngestStats",
    "LogRecordPublic",
    "ModelConstraintsPublic",
    "ModelFilePublic",
    "ModelReleasePublic",
    "RegistrationKeyCreate",
    "RegistrationKeyCreated",
    "RegistrationKeyPublic",
    "ReleaseUrlsPublic",
    "ResultHourPublic",
    "ResultPublic",
    "ResultSummary",
    "SigningKeyPublic",
    "SigningKeysPublic",
    "TargetState",
    "TelemetryPoint",
]

TagKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
TagValue = Annotated[str, Field(max_length=128)]


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


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
    # Set on hourly points (``resolution=hour``): the values above are the hour's means
    # (counters: its highest value), these its sample count and extremes.
    samples: int | None = None
    cpu_percent_min: float | None = None
    cpu_percent_max: float | None = None
    memory_percent_min: float | None = None
    memory_percent_max: float | None = None
    load_1_min: float | None = None
    load_1_max: float | None = None
    temperature_c_min: float | None = None
    temperature_c_max: float | None = None


class ResultHourPublic(_Public):
    """One device's results of one model in one UTC hour (from the hourly rollups)."""

    hour: AwareDatetime
    device_id: str
    model: str
    results: int
    errors: int
    latency_mean_ms: float
    latency_min_ms: float
    latency_max_ms: float
    tokens: int


class DesiredModelPublic(_Public):
    """One model assignment in a device's desired state (never its key)."""

    name: str
    release_id: str
    version: str
    release: int


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
    # What the device reports per model, and the releases its desired state names.
    models: dict[str, ModelReport] = Field(default_factory=dict)
    desired_models: list[DesiredModelPublic] = Field(default_factory=list)
    # Set when the device's identity was revoked (and when it was decommissioned): its history
    # stays, it can no longer connect, and its token is refused.
    revoked_at: AwareDatetime | None = None
    decommissioned_at: AwareDatetime | None = None


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


# --- deployments and results (helper D) ---------------------------------------------------------

CanaryMetric = Literal["error_rate", "p95_latency_ms", "mean_confidence", "tokens_per_s"]
DeploymentState = Literal["running", "paused", "halted", "completed", "rolled_back"]
TargetState = Literal["waiting", "incompatible", "sent", "running", "failed", "rolled_back"]
# Devices one deployment may name; a bigger fleet is targeted by tag.
MAX_DEPLOYMENT_DEVICES = 10_000


class CanarySpec(BaseModel):
    """The optional gate on the first batch: compare the new release with the one it replaces.

    ``margin`` is in the metric's own unit (a fraction for error_rate, milliseconds for
    p95_latency_ms, confidence points, tokens per second); the gate fails when the new release
    is worse than the old by more than that.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: CanaryMetric
    margin: Annotated[float, Field(ge=0)]
    # Results each side needs before the gate judges; fewer are noise.
    min_results: Annotated[int, Field(ge=1, le=100_000)] = 20


class CanaryPublic(CanarySpec):
    """The gate's settings and, once judged or while waiting, where it stands."""

    verdict: Literal["waiting", "passed", "failed"] | None = None
    baseline: float | None = None
    candidate: float | None = None
    baseline_results: int = 0
    candidate_results: int = 0


class DeploymentCreate(BaseModel):
    """Body of ``POST /api/v1/deployments`` (and ``/preview``): a release onto devices."""

    model_config = ConfigDict(extra="forbid")

    release_id: Annotated[str, Field(min_length=1, max_length=32)]
    device_ids: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=64)]],
            Field(min_length=1, max_length=MAX_DEPLOYMENT_DEVICES),
        ]
        | None
    ) = None
    tag: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+=.*$", max_length=200)] | None = None
    batch_size: Annotated[int, Field(ge=1, le=MAX_DEPLOYMENT_DEVICES)] = 1
    # Seconds between one batch resolving and the next being sent.
    pause_s: Annotated[float, Field(ge=0, le=7 * 86_400)] = 0.0
    # Failed devices over devices sent so far that the rollout tolerates; above it, it halts.
    max_failure_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    canary: CanarySpec | None = None
    schedules: Annotated[list[InferenceSchedule], Field(max_length=8)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_way_to_name_targets(self) -> DeploymentCreate:
        if (self.device_ids is None) == (self.tag is None):
            raise ValueError("name the targets with exactly one of device_ids and tag")
        return self


class IncompatibleDevice(_Public):
    """A device that cannot take a release, and why (sentences an operator can act on)."""

    device_id: str
    reasons: list[str]


class DeploymentPreview(_Public):
    """Which targets can take the release; nothing is sent by a preview."""

    release_id: str
    compatible: list[str]
    incompatible: list[IncompatibleDevice]


class DeploymentTargetPublic(_Public):
    """One device of a deployment, with its progress as the device reports it."""

    device_id: str
    batch: int
    state: TargetState
    detail: str | None
    previous_release_id: str | None
    phase: str | None
    bytes_done: int
    bytes_total: int
    updated_at: AwareDatetime


class DeploymentPublic(_Public):
    """A deployment and each of its targets."""

    id: str
    release_id: str
    model_name: str
    version: str
    release: int
    target_tag: str | None
    state: DeploymentState
    current_batch: int
    batch_count: int
    batch_size: int
    pause_s: float
    max_failure_ratio: float
    canary: CanaryPublic | None
    schedules: list[InferenceSchedule]
    detail: str | None
    next_batch_at: AwareDatetime | None
    created_by: str
    created_at: AwareDatetime
    updated_at: AwareDatetime
    targets: list[DeploymentTargetPublic]


class ResultPublic(_Public):
    """One stored inference result."""

    device_id: str
    message_id: str
    timestamp: AwareDatetime
    received_at: AwareDatetime
    model: str
    version: str
    release: int
    sha256: str
    runtime: ModelRuntime
    source: ResultSource
    input_ref: str | None
    latency_ms: float
    label: str | None
    confidence: float | None
    scores: dict[str, float] | None
    text: str | None
    tokens: int | None
    tokens_per_s: float | None
    error: str | None


class ResultSummary(_Public):
    """Results of one (model, version): how many, how many failed, how fast, how sure.

    Latency percentiles, confidence and tokens/s are over the successful results only.
    """

    model: str
    version: str
    count: int
    errors: int
    error_rate: float
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    mean_confidence: float | None
    mean_tokens_per_s: float | None


# --- model releases and artifacts (fleet_service.artifacts) ---


class ModelFilePublic(_Public):
    """One file of a release: its name on the device, what it is for, its plaintext digest."""

    name: str
    role: Literal["weights", "tokenizer", "labels", "config", "other"]
    sha256: str
    size: int


class ModelConstraintsPublic(_Public):
    """Where a release may run; empty ``architectures`` means any."""

    architectures: list[str]
    min_ram_bytes: int
    min_disk_bytes: int


class ModelReleasePublic(_Public):
    """A signed model release as listed (never its encryption key)."""

    id: str
    name: str
    version: str
    runtime: ModelRuntime
    release: int
    files: list[ModelFilePublic]
    constraints: ModelConstraintsPublic
    encrypted: bool
    stored_bytes: int
    key_id: str
    created_by: str
    created_at: AwareDatetime
    expires_at: AwareDatetime
    rollback_of: str | None


class SigningKeyPublic(_Public):
    """A public key devices trust for manifests: raw 32-byte Ed25519, base64."""

    key_id: str
    public_key: str


class SigningKeysPublic(_Public):
    """Answer of ``GET /api/v1/agent/signing-keys``."""

    keys: list[SigningKeyPublic]


class ReleaseUrlsPublic(_Public):
    """Answer of ``GET /api/v1/agent/releases/{id}/urls``: one download URL per file name."""

    release_id: str
    expires_at: AwareDatetime
    urls: dict[str, str]
