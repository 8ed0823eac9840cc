"""The contract between devices and the control plane: topics, payloads, enrollment. No I/O."""

from fleet_protocol.control import (
    MAX_RECEIPT_IDS,
    CommandMessage,
    DesiredState,
    ReceiptMessage,
    RuntimeConfig,
)
from fleet_protocol.enrollment import (
    EnrollRequest,
    EnrollResponse,
    InvalidJoinTokenError,
    JoinToken,
    ca_fingerprint,
)
from fleet_protocol.messages import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    AckMessage,
    AckStatus,
    DeviceMessage,
    DeviceState,
    LogLevel,
    LogMessage,
    MalformedPayloadError,
    ReportedState,
    StatusMessage,
    TelemetryMessage,
    decode,
)
from fleet_protocol.topics import (
    DEFAULT_PREFIX,
    DeviceTopic,
    InvalidTopicError,
    TopicKind,
    device_topic,
    parse_device_topic,
    subscription_for,
    validate_device_id,
)

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_PAYLOAD_BYTES",
    "MAX_RECEIPT_IDS",
    "SCHEMA_VERSION",
    "AckMessage",
    "AckStatus",
    "CommandMessage",
    "DesiredState",
    "DeviceMessage",
    "DeviceState",
    "DeviceTopic",
    "EnrollRequest",
    "EnrollResponse",
    "InvalidJoinTokenError",
    "InvalidTopicError",
    "JoinToken",
    "LogLevel",
    "LogMessage",
    "MalformedPayloadError",
    "ReceiptMessage",
    "ReportedState",
    "RuntimeConfig",
    "StatusMessage",
    "TelemetryMessage",
    "TopicKind",
    "ca_fingerprint",
    "decode",
    "device_topic",
    "parse_device_topic",
    "subscription_for",
    "validate_device_id",
]

__version__ = "0.1.0"
