"""Build, parse and validate the MQTT topics of the edgefleet contract.

Every device owns one subtree, ``{prefix}/devices/{device_id}/...``; the broker's ACL confines a
device to it. These helpers are pure functions so both sides, tests and the ACL templates agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "DEFAULT_PREFIX",
    "DEVICE_ID_PATTERN",
    "DeviceTopic",
    "InvalidTopicError",
    "TopicKind",
    "device_topic",
    "parse_device_topic",
    "subscription_for",
    "validate_device_id",
]

DEFAULT_PREFIX = "fleet/v1"

# Device ids are issued by the service (``dev-`` + hex). They must never contain MQTT wildcards or
# separators, or a device could escape its subtree through the ACL's ``%u`` substitution.
DEVICE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")


class InvalidTopicError(ValueError):
    """A topic or device id does not fit the edgefleet contract."""


class TopicKind(StrEnum):
    """The leaf of a device topic; says which way it flows in DESIGN.md's topic table."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    RESULTS = "results"
    LOGS = "logs"
    COMMANDS = "commands"
    RECEIPTS = "receipts"
    ACKS = "acks"
    DESIRED = "desired"
    REPORTED = "reported"
    # Certificate renewal: a device asks with a CSR, the service answers on ``certificate``.
    CSR = "csr"
    CERTIFICATE = "certificate"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed device topic."""

    device_id: str
    kind: TopicKind
    model: str | None = None  # only for ``results/{model}``


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged, or raise :class:`InvalidTopicError`."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise InvalidTopicError(
            f"invalid device id {device_id!r}: expected 3-63 characters of a-z, 0-9 and '-'"
        )
    return device_id


def device_topic(
    device_id: str, kind: TopicKind, *, prefix: str = DEFAULT_PREFIX, model: str | None = None
) -> str:
    """Build ``{prefix}/devices/{device_id}/{kind}`` (``.../results/{model}`` for results)."""
    validate_device_id(device_id)
    base = f"{prefix}/devices/{device_id}/{kind.value}"
    if kind is TopicKind.RESULTS:
        if not model or any(c in model for c in "+#/"):
            raise InvalidTopicError(f"results topics need a model name without '+#/': {model!r}")
        return f"{base}/{model}"
    return base


def subscription_for(kind: TopicKind, *, prefix: str = DEFAULT_PREFIX) -> str:
    """The wildcard subscription the service uses to receive ``kind`` from every device."""
    suffix = "/+" if kind is TopicKind.RESULTS else ""
    return f"{prefix}/devices/+/{kind.value}{suffix}"


def parse_device_topic(topic: str, *, prefix: str = DEFAULT_PREFIX) -> DeviceTopic:
    """Parse a concrete device topic; raise :class:`InvalidTopicError` for anything else."""
    head = f"{prefix}/devices/"
    if not topic.startswith(head):
        raise InvalidTopicError(f"topic {topic!r} is not under {head!r}")
    parts = topic[len(head) :].split("/")
    if len(parts) < 2:
        raise InvalidTopicError(f"topic {topic!r} has no kind after the device id")
    device_id = validate_device_id(parts[0])
    try:
        kind = TopicKind(parts[1])
    except ValueError as exc:
        raise InvalidTopicError(f"topic {topic!r} has an unknown kind {parts[1]!r}") from exc
    if kind is TopicKind.RESULTS:
        if len(parts) != 3 or not parts[2]:
            raise InvalidTopicError(f"results topic {topic!r} must end in /results/<model>")
        return DeviceTopic(device_id, kind, parts[2])
    if len(parts) != 2:
        raise InvalidTopicError(f"topic {topic!r} has extra levels after {kind.value!r}")
    return DeviceTopic(device_id, kind)
