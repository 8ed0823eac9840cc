"""The protocol package: topics, payload validation, join tokens, and the AsyncAPI document."""

from __future__ import annotations

import json
import re

import pytest

from fleet_protocol import (
    MAX_PAYLOAD_BYTES,
    DeviceState,
    InvalidJoinTokenError,
    InvalidTopicError,
    JoinToken,
    MalformedPayloadError,
    StatusMessage,
    TelemetryMessage,
    TopicKind,
    decode,
    device_topic,
    parse_device_topic,
    subscription_for,
)
from fleet_protocol.asyncapi import CHECKED_IN, render


def test_topics_round_trip() -> None:
    topic = device_topic("dev-abc123", TopicKind.TELEMETRY)
    assert topic == "fleet/v1/devices/dev-abc123/telemetry"
    parsed = parse_device_topic(topic)
    assert (parsed.device_id, parsed.kind) == ("dev-abc123", TopicKind.TELEMETRY)
    results = parse_device_topic(device_topic("dev-abc123", TopicKind.RESULTS, model="yolo"))
    assert results.model == "yolo"
    assert subscription_for(TopicKind.STATUS) == "fleet/v1/devices/+/status"


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/dev-abc/telemetry",
        "fleet/v1/devices/dev-abc",
        "fleet/v1/devices/DEV+/telemetry",
        "fleet/v1/devices/dev-abc/nonsense",
        "fleet/v1/devices/dev-abc/telemetry/extra",
        "fleet/v1/devices/dev-abc/results",
    ],
)
def test_wrong_topics_are_refused(topic: str) -> None:
    with pytest.raises(InvalidTopicError):
        parse_device_topic(topic)


@pytest.mark.parametrize("device_id", ["a", "dev/x", "dev+", "dev#", "DEV-UPPER"])
def test_device_ids_with_wildcards_or_separators_cannot_build_topics(device_id: str) -> None:
    with pytest.raises(InvalidTopicError):
        device_topic(device_id, TopicKind.STATUS)


def test_status_round_trips_and_carries_id_and_timestamp() -> None:
    message = StatusMessage(state=DeviceState.ONLINE, agent_version="0.1.0")
    decoded = decode(StatusMessage, message.to_payload())
    assert decoded == message
    assert decoded.timestamp.tzinfo is not None
    assert decoded.schema_version == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "json"),
        (b'{"state": "sleeping", "agent_version": "1"}', "schema"),
        (b'{"state": "online", "agent_version": "1", "extra": 1}', "schema"),
        (b'{"state": "online", "agent_version": "1", "schema_version": 99}', "schema"),
        (b"x" * (MAX_PAYLOAD_BYTES + 1), "size"),
    ],
)
def test_malformed_payloads_name_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayloadError) as caught:
        decode(StatusMessage, payload)
    assert caught.value.reason == reason


def test_telemetry_rejects_impossible_values() -> None:
    with pytest.raises(MalformedPayloadError, match="cpu_percent"):
        decode(TelemetryMessage, json.dumps({"cpu_percent": 900}).encode())


def test_join_token_round_trips_and_damage_is_reported() -> None:
    token = JoinToken.model_validate(
        {"url": "https://10.0.0.2:8443", "key": "efk_" + "a" * 40, "ca": "sha256:" + "0" * 64}
    )
    assert JoinToken.decode(token.encode()) == token
    with pytest.raises(InvalidJoinTokenError, match="starts with"):
        JoinToken.decode("hello")
    with pytest.raises(InvalidJoinTokenError, match="damaged"):
        JoinToken.decode(token.encode()[:-10])


def test_checked_in_asyncapi_document_is_current() -> None:
    assert CHECKED_IN.read_text() == render(), "run `make asyncapi` and commit the result"
    document = json.loads(CHECKED_IN.read_text())
    assert document["asyncapi"].startswith("3.")
    refs = set(re.findall(r'"#/components/schemas/([A-Za-z]+)"', CHECKED_IN.read_text()))
    assert refs <= set(document["components"]["schemas"]), "a schema $ref points nowhere"
    assert set(document["channels"]) == {
        "status",
        "telemetry",
        "acks",
        "results",
        "logs",
        "reported",
        "commands",
        "receipts",
        "desired",
    }
