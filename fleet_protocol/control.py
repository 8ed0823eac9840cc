"""Payloads the control plane sends to a device: commands, receipts, desired state and renewed
certificates."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from fleet_protocol.manifest import SignedManifest
from fleet_protocol.messages import CERT_SERIAL_PATTERN, JsonScalar, LogLevel

__all__ = [
    "COMMAND_TYPE_PATTERN",
    "MAX_CERTIFICATE_PEM_CHARS",
    "MAX_RECEIPT_IDS",
    "CertificateMessage",
    "CommandMessage",
    "DesiredState",
    "InferenceSchedule",
    "ModelAssignment",
    "ReceiptMessage",
    "RuntimeConfig",
    "ScheduleSource",
]

# Command types are registry keys on both sides: lowercase words joined by '-'.
COMMAND_TYPE_PATTERN = r"^[a-z][a-z0-9-]{1,63}$"
# One receipt names at most this many message ids, so it stays far below the payload limit
# (a hex id is 32 bytes; 500 of them plus JSON quoting is about 18 KiB).
MAX_RECEIPT_IDS = 500
# A leaf plus the fleet CA in PEM is about 1.5 KiB; room for a longer chain, far below the limit.
MAX_CERTIFICATE_PEM_CHARS = 32_768

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


class CertificateMessage(_ControlMessage):
    """On ``devices/{id}/certificate`` (QoS 1, not retained): the answer to one ``csr``.

    Either the renewed certificate (``certificate_pem`` holds the leaf then the fleet CA, with
    the leaf's ``serial`` and ``not_after``) or a refusal (``refused`` says why and what to do);
    never both. ``request_id`` is the ``message_id`` of the CSR it answers.
    """

    request_id: MessageId
    certificate_pem: (
        Annotated[str, Field(min_length=1, max_length=MAX_CERTIFICATE_PEM_CHARS)] | None
    ) = None
    serial: Annotated[str, Field(pattern=CERT_SERIAL_PATTERN)] | None = None
    not_after: AwareDatetime | None = None
    refused: Annotated[str, Field(min_length=1, max_length=2000)] | None = None

    @model_validator(mode="after")
    def _certificate_or_refusal(self) -> CertificateMessage:
        issued = (self.certificate_pem, self.serial, self.not_after)
        if self.refused is None and None in issued:
            raise ValueError("a certificate answer needs certificate_pem, serial and not_after")
        if self.refused is not None and issued != (None, None, None):
            raise ValueError("a refusal carries no certificate_pem, serial or not_after")
        return self


class RuntimeConfig(_ControlMessage):
    """Agent settings an operator can change remotely; None leaves the agent's own value."""

    telemetry_interval_s: Annotated[float, Field(ge=1, le=86_400)] | None = None
    log_level: LogLevel | None = None
    # Records at or above this level are forwarded on ``logs``.
    log_forward_level: LogLevel | None = None


class ScheduleSource(StrEnum):
    """Where a scheduled inference takes its input from."""

    # One file, read afresh every interval.
    FILE = "file"
    # Every new file that appears in a folder, each once.
    FOLDER = "folder"
    # The stdout of a command the agent runs (argv[0] must be on the agent's allow list).
    COMMAND = "command"
    # The newest input pushed to the local API's ``/v1/push/{model}`` since the last run.
    HTTP = "http"


class InferenceSchedule(_ControlMessage):
    """Run the assigned model on input from ``source`` every ``interval_s`` seconds."""

    source: ScheduleSource
    path: Annotated[str, Field(min_length=1, max_length=1000)] | None = None
    argv: Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=32)] | None = (
        None
    )
    interval_s: Annotated[float, Field(ge=1, le=86_400)]

    @model_validator(mode="after")
    def _source_has_its_input(self) -> InferenceSchedule:
        needs_path = self.source in (ScheduleSource.FILE, ScheduleSource.FOLDER)
        if needs_path and not self.path:
            raise ValueError(f"a {self.source.value} schedule needs a path")
        if self.source is ScheduleSource.COMMAND and not self.argv:
            raise ValueError("a command schedule needs an argv")
        return self


class ModelAssignment(_ControlMessage):
    """One model release a device should run, inside :class:`DesiredState`.

    ``key`` (base64 AES-256) is present only for an encrypted release, and only in the desired
    state of the devices a deployment targets: it travels over their own mTLS session and
    retained topic, which the broker's ACL lets no one else read.
    """

    release_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    manifest: SignedManifest
    key: Annotated[str, Field(min_length=44, max_length=44)] | None = None
    schedules: Annotated[list[InferenceSchedule], Field(max_length=8)] = Field(default_factory=list)

    @property
    def name(self) -> str:
        """The model's name (unique within a desired state)."""
        return self.manifest.manifest.name


class DesiredState(_ControlMessage):
    """Retained on ``devices/{id}/desired``: what the device should converge to."""

    generation: Annotated[int, Field(ge=0)]
    config: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: Annotated[list[ModelAssignment], Field(max_length=16)] = Field(default_factory=list)

    @model_validator(mode="after")
    def _model_names_unique(self) -> DesiredState:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("a desired state names each model at most once")
        return self
