"""The protocol package: topics, payload validation, join tokens, and the AsyncAPI document."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from fleet_protocol import (
    MAX_PAYLOAD_BYTES,
    CertificateMessage,
    CsrMessage,
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
        "csr",
        "certificate",
    }


# -- certificate renewal payloads (csr, certificate) ----------------------------------------------

_CSR_PEM = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
_CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_renewal_topics_round_trip() -> None:
    csr = device_topic("dev-abc123", TopicKind.CSR)
    assert csr == "fleet/v1/devices/dev-abc123/csr"
    assert parse_device_topic(csr).kind is TopicKind.CSR
    certificate = device_topic("dev-abc123", TopicKind.CERTIFICATE)
    assert parse_device_topic(certificate).kind is TopicKind.CERTIFICATE
    assert subscription_for(TopicKind.CSR) == "fleet/v1/devices/+/csr"
    with pytest.raises(InvalidTopicError):
        parse_device_topic("fleet/v1/devices/dev-abc123/csr/extra")


def test_csr_message_round_trips_with_id_and_timestamp() -> None:
    message = CsrMessage(device_id="dev-abc123", csr_pem=_CSR_PEM)
    decoded = decode(CsrMessage, message.to_payload())
    assert decoded == message
    assert decoded.timestamp.tzinfo is not None
    assert len(decoded.message_id) >= 8


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"device_id": "dev/+", "csr_pem": _CSR_PEM}, "device_id"),
        ({"device_id": "DEV-ABC", "csr_pem": _CSR_PEM}, "device_id"),
        ({"device_id": "dev-abc123", "csr_pem": ""}, "csr_pem"),
        ({"device_id": "dev-abc123", "csr_pem": "x" * 16_385}, "csr_pem"),
        ({"device_id": "dev-abc123"}, "csr_pem"),
        ({"device_id": "dev-abc123", "csr_pem": _CSR_PEM, "subject": "CN=x"}, "subject"),
        ({"device_id": "dev-abc123", "csr_pem": _CSR_PEM, "message_id": "a b"}, "message_id"),
    ],
)
def test_malformed_csr_messages_name_the_field(fields: dict[str, object], where: str) -> None:
    with pytest.raises(MalformedPayloadError, match=where) as caught:
        decode(CsrMessage, json.dumps(fields).encode())
    assert caught.value.reason == "schema"


def test_certificate_answer_carries_either_a_certificate_or_a_refusal() -> None:
    issued = CertificateMessage(
        request_id="a" * 32,
        certificate_pem=_CERT_PEM,
        serial="1f2e3d",
        not_after=datetime(2030, 1, 1, tzinfo=UTC),
    )
    assert decode(CertificateMessage, issued.to_payload()) == issued
    refused = CertificateMessage(request_id="a" * 32, refused="device dev-abc123 was revoked")
    assert decode(CertificateMessage, refused.to_payload()) == refused


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs certificate_pem, serial and not_after"),
        ({"certificate_pem": _CERT_PEM, "serial": "1f"}, "needs certificate_pem"),
        (
            {"refused": "no", "certificate_pem": _CERT_PEM},
            "carries no certificate_pem",
        ),
        (
            {"certificate_pem": _CERT_PEM, "serial": "1F", "not_after": "2030-01-01T00:00:00Z"},
            "serial",
        ),
        (
            {"certificate_pem": _CERT_PEM, "serial": "1" * 41, "not_after": "2030-01-01T00:00:00Z"},
            "serial",
        ),
        (
            {"certificate_pem": _CERT_PEM, "serial": "1f", "not_after": "2030-01-01T00:00:00"},
            "not_after",
        ),
        ({"refused": ""}, "refused"),
    ],
)
def test_malformed_certificate_answers_are_refused(fields: dict[str, object], message: str) -> None:
    payload = json.dumps({"request_id": "a" * 32, **fields}).encode()
    with pytest.raises(MalformedPayloadError, match=message):
        decode(CertificateMessage, payload)


def test_certificate_answer_needs_a_request_id() -> None:
    with pytest.raises(MalformedPayloadError, match="request_id"):
        decode(CertificateMessage, json.dumps({"refused": "no"}).encode())


def test_telemetry_may_report_the_certificate_it_holds() -> None:
    base = json.loads(TelemetryMessage.model_validate(_TELEMETRY_FIELDS).model_dump_json())
    assert decode(TelemetryMessage, json.dumps(base).encode()).cert_serial is None
    with_cert = {**base, "cert_serial": "abc123", "cert_not_after": "2030-01-01T00:00:00Z"}
    decoded = decode(TelemetryMessage, json.dumps(with_cert).encode())
    assert decoded.cert_serial == "abc123"
    assert decoded.cert_not_after == datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(MalformedPayloadError, match="cert_serial"):
        decode(TelemetryMessage, json.dumps({**base, "cert_serial": "xyz"}).encode())


_TELEMETRY_FIELDS: dict[str, object] = {
    "cpu_percent": 5.0,
    "load_1": 0.1,
    "load_5": 0.1,
    "load_15": 0.1,
    "memory_percent": 40.0,
    "memory_used_bytes": 1,
    "memory_total_bytes": 2,
    "disk_percent": 10.0,
    "disk_used_bytes": 1,
    "disk_total_bytes": 2,
    "net_bytes_sent": 0,
    "net_bytes_recv": 0,
    "uptime_s": 1.0,
    "agent_version": "0.1.0",
    "architecture": "x86_64",
    "platform": "Linux",
}
