"""Hypothesis against every payload and topic parser: whatever the bytes, each one either parses
or raises its own documented error, never anything else.

Covered: ``decode`` for every payload model of fleet_protocol (and the service's
``decode_for_topic``), the topic and device-id parsers, join tokens, signing public keys,
sealed-file streams and manifest signatures; on the agent, the command processor and the
desired-state applier, which must answer (or drop) a bad payload and never raise. Inputs are
arbitrary bytes, arbitrary JSON, and valid messages with one part broken.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import string
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import fleet_protocol
from device_agent.commands import CommandProcessor
from device_agent.desired import DesiredApplier
from device_agent.runtime import RuntimeState
from fleet_protocol import (
    MAX_PAYLOAD_BYTES,
    AckMessage,
    AckStatus,
    CertificateMessage,
    CommandMessage,
    CsrMessage,
    DesiredState,
    EnrollRequest,
    InvalidJoinTokenError,
    InvalidTopicError,
    JoinToken,
    LogMessage,
    MalformedPayloadError,
    ManifestError,
    ModelAssignment,
    ModelManifest,
    ReceiptMessage,
    ReportedState,
    ResultMessage,
    StatusMessage,
    TelemetryMessage,
    TopicKind,
    decode,
    device_topic,
    parse_device_topic,
    sign_manifest,
    validate_device_id,
    verify_manifest,
)
from fleet_protocol.manifest import key_id_of, public_key_from_text, public_key_text
from fleet_protocol.sealing import SealError, Unsealer, new_key, seal_chunks
from fleet_protocol.topics import DEFAULT_PREFIX, DeviceTopic
from fleet_service.ingest.writer import MODELS_BY_KIND, decode_for_topic

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        # Only _keep_root_log_level, which restores the log level after the whole test.
        HealthCheck.function_scoped_fixture,
    ],
)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
DEVICE = "dev-0123456789ab"
REASONS = {"json", "schema", "size"}

# --- what to throw at the parsers --------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)

# Inputs that broke (or could break) parsers elsewhere: deep nesting, huge numbers, invalid
# UTF-8, byte order marks, NUL, non-standard JSON constants, a payload over the size limit.
HOSTILE = [
    b"",
    b"\x00",
    b"\xff\xfe\xfd",
    b"\xef\xbb\xbf{}",
    b"[" * 5000,
    b'{"id": ' + b"[" * 5000,
    b'{"generation": 1, "config": ' + b"{" * 3000,
    b'{"generation": ' + b"9" * 5000 + b"}",
    b'{"generation": NaN}',
    b'{"generation": Infinity, "generation": 1}',
    b'{"id": "' + b"\\ud800" * 10 + b'"}',
    b"{" + b'"a":1,' * 20_000 + b'"b":2}',
    b"x" * (MAX_PAYLOAD_BYTES + 1),
]


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def broken(draw: st.DrawFn, document: dict[str, Any]) -> bytes:
    """``document`` (a valid message as JSON) with one part replaced, removed or added to."""
    document = copy.deepcopy(document)
    path = draw(st.sampled_from(_paths(document)))
    replacement = draw(json_values)
    if not path:
        return json.dumps(replacement).encode()
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = replacement
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=12))] = replacement
    else:
        parent.append(replacement)
    return json.dumps(document).encode()


# --- valid examples of every message -----------------------------------------------------------

SIGNING_KEY = Ed25519PrivateKey.generate()


def _manifest() -> ModelManifest:
    digest = "ab" * 32
    return ModelManifest.model_validate(
        {
            "name": "detector",
            "version": "1.0",
            "runtime": "onnx",
            "release": 1,
            "files": [
                {
                    "name": "model.onnx",
                    "role": "weights",
                    "sha256": digest,
                    "size": 10,
                    "stored_sha256": digest,
                    "stored_size": 10,
                }
            ],
            "created_at": NOW,
            "expires_at": NOW + timedelta(days=365),
        }
    )


SIGNED = sign_manifest(_manifest(), SIGNING_KEY)

VALID: dict[type[BaseModel], BaseModel] = {
    StatusMessage: StatusMessage(state="online", agent_version="1.0"),
    TelemetryMessage: TelemetryMessage(
        cpu_percent=12.5,
        load_1=0.1,
        load_5=0.2,
        load_15=0.3,
        memory_percent=40,
        memory_used_bytes=1,
        memory_total_bytes=2,
        disk_percent=50,
        disk_used_bytes=3,
        disk_total_bytes=4,
        net_bytes_sent=5,
        net_bytes_recv=6,
        temperature_c=45.0,
        uptime_s=100,
        agent_version="1.0",
        architecture="x86_64",
        platform="Linux",
        runtimes=["onnx"],
    ),
    AckMessage: AckMessage(command_id="cmd-00000001", status="succeeded", result={"a": 1}),
    LogMessage: LogMessage(level="INFO", logger="agent", message="hello"),
    ReportedState: ReportedState.model_validate(
        {
            "generation": 3,
            "applied": True,
            "config": {"telemetry_interval_s": 30},
            "models": {
                "detector": {
                    "name": "detector",
                    "release_id": "rel-1",
                    "release": 1,
                    "version": "1.0",
                    "phase": "running",
                    "healthy": True,
                }
            },
        }
    ),
    ResultMessage: ResultMessage(
        model="detector",
        version="1.0",
        release=1,
        sha256="ab" * 32,
        runtime="onnx",
        source="schedule",
        latency_ms=3.5,
        label="cat",
        confidence=0.9,
        scores={"cat": 0.9, "dog": 0.1},
    ),
    CsrMessage: CsrMessage(device_id=DEVICE, csr_pem="-----BEGIN CERTIFICATE REQUEST-----"),
    CommandMessage: CommandMessage(
        id="cmd-00000001",
        type="ping",
        params={"n": 1},
        issued_at=NOW,
        expires_at=NOW + timedelta(days=3650),
    ),
    ReceiptMessage: ReceiptMessage(message_ids=["abcdefgh", "ijklmnop"]),
    CertificateMessage: CertificateMessage(request_id="abcdefgh", refused="not now"),
    DesiredState: DesiredState.model_validate(
        {
            "generation": 2,
            "config": {"telemetry_interval_s": 10, "log_level": "DEBUG"},
            "models": [
                ModelAssignment(
                    release_id="rel-1",
                    manifest=SIGNED,
                    schedules=[{"source": "http", "interval_s": 5}],
                )
            ],
        }
    ),
    EnrollRequest: EnrollRequest(registration_key="efk_x", csr_pem="pem", hostname="h"),
}

PAYLOAD_MODELS = sorted(
    {
        getattr(fleet_protocol, name)
        for name in fleet_protocol.__all__
        if isinstance(getattr(fleet_protocol, name), type)
        and issubclass(getattr(fleet_protocol, name), BaseModel)
    },
    key=lambda model: model.__name__,
)


def test_every_message_of_the_protocol_has_a_valid_example_here() -> None:
    wire = {StatusMessage, TelemetryMessage, AckMessage, LogMessage, ReportedState}
    wire |= {ResultMessage, CsrMessage, CommandMessage, ReceiptMessage, CertificateMessage}
    wire |= {DesiredState, EnrollRequest}
    assert set(VALID) == wire
    for model, message in VALID.items():
        assert decode(model, message.model_dump_json().encode()) == message


def _only_clear_rejections(model: type[BaseModel], payload: bytes) -> None:
    try:
        decode(model, payload)
    except MalformedPayloadError as exc:
        assert exc.reason in REASONS
        assert str(exc).startswith(f"{exc.reason}: ")
        assert exc.detail


# --- fleet_protocol payloads -------------------------------------------------------------------


@pytest.mark.parametrize("model", PAYLOAD_MODELS, ids=lambda m: m.__name__)
@FUZZ
@given(payload=st.binary(max_size=512) | st.sampled_from(HOSTILE))
def test_decode_of_arbitrary_bytes_only_rejects_clearly(
    model: type[BaseModel], payload: bytes
) -> None:
    _only_clear_rejections(model, payload)


@pytest.mark.parametrize("model", PAYLOAD_MODELS, ids=lambda m: m.__name__)
@FUZZ
@given(value=json_values)
def test_decode_of_arbitrary_json_only_rejects_clearly(model: type[BaseModel], value: Any) -> None:
    _only_clear_rejections(model, json.dumps(value).encode())


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
@FUZZ
@given(data=st.data())
def test_decode_of_a_broken_valid_message_only_rejects_clearly(
    model: type[BaseModel], data: st.DataObject
) -> None:
    document = json.loads(VALID[model].model_dump_json())
    _only_clear_rejections(model, data.draw(broken(document)))


@pytest.mark.parametrize("kind", sorted(MODELS_BY_KIND), ids=str)
@FUZZ
@given(data=st.data())
def test_the_services_topic_decoder_only_rejects_clearly(
    kind: TopicKind, data: st.DataObject
) -> None:
    model = MODELS_BY_KIND[kind]
    document = json.loads(VALID[model].model_dump_json())
    payload = data.draw(broken(document) | st.binary(max_size=256) | st.sampled_from(HOSTILE))
    topic = DeviceTopic(DEVICE, kind, "detector" if kind is TopicKind.RESULTS else None)
    try:
        decode_for_topic(topic, payload)
    except MalformedPayloadError as exc:
        assert exc.reason in REASONS | {"topic-model"}


# --- topics and identifiers --------------------------------------------------------------------

topic_text = st.text(alphabet=string.ascii_letters + string.digits + "/+#-_$ .\x00é", max_size=80)


@FUZZ
@given(
    topic=topic_text
    | topic_text.map(lambda t: f"{DEFAULT_PREFIX}/devices/{t}")
    | topic_text.map(lambda t: f"{DEFAULT_PREFIX}/devices/{DEVICE}/{t}")
)
def test_topic_parsing_returns_a_topic_or_says_why_not(topic: str) -> None:
    try:
        parsed = parse_device_topic(topic)
    except InvalidTopicError as exc:
        assert str(exc)
        return
    # What parses is exactly what the builder makes: no wildcard or extra level gets through.
    assert device_topic(parsed.device_id, parsed.kind, model=parsed.model) == topic
    assert not set("+#\x00") & set(parsed.device_id + (parsed.model or ""))


@FUZZ
@given(device_id=st.text(max_size=80), model=st.text(max_size=40))
def test_topic_building_refuses_ids_and_models_that_would_escape_the_subtree(
    device_id: str, model: str
) -> None:
    try:
        validate_device_id(device_id)
        topic = device_topic(device_id, TopicKind.RESULTS, model=model)
    except InvalidTopicError:
        return
    parsed = parse_device_topic(topic)
    assert (parsed.device_id, parsed.model) == (device_id, model)


# --- join tokens, keys, sealed files, signatures ------------------------------------------------


@FUZZ
@given(
    token=st.text(max_size=200)
    | st.binary(max_size=200).map(lambda b: "efjoin1." + base64.urlsafe_b64encode(b).decode())
    | json_values.map(
        lambda v: "efjoin1." + base64.urlsafe_b64encode(json.dumps(v).encode()).decode()
    )
)
def test_join_tokens_decode_or_say_they_are_damaged(token: str) -> None:
    try:
        JoinToken.decode(token)
    except InvalidJoinTokenError as exc:
        assert "join token" in str(exc)


@FUZZ
@given(
    text=st.text(max_size=60) | st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
)
def test_signing_public_keys_parse_or_raise_value_error(text: str) -> None:
    try:
        key = public_key_from_text(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert public_key_text(key) == text


SEALING_KEY = new_key()
SEALED = b"".join(seal_chunks([b"model weights " * 100], SEALING_KEY))


@FUZZ
@given(
    data=st.binary(max_size=600)
    | st.tuples(st.integers(0, len(SEALED) - 1), st.binary(min_size=1, max_size=4)).map(
        lambda cut: SEALED[: cut[0]] + cut[1] + SEALED[cut[0] + len(cut[1]) :]
    )
    | st.integers(0, len(SEALED) - 1).map(lambda n: SEALED[:n]),
    piece=st.integers(1, 700),
)
def test_a_damaged_sealed_stream_raises_seal_error(data: bytes, piece: int) -> None:
    unsealer = Unsealer(SEALING_KEY)
    try:
        for start in range(0, len(data), piece):
            unsealer.feed(data[start : start + piece])
        unsealer.finish()
    except SealError as exc:
        assert str(exc)
        return
    assert data == SEALED, "only the intact stream opens"


@FUZZ
@given(
    signature=st.text(
        alphabet=string.ascii_letters + string.digits + "+/=", min_size=86, max_size=88
    )
)
def test_a_forged_manifest_signature_is_a_manifest_error(signature: str) -> None:
    forged = SIGNED.model_copy(update={"signature": signature})
    trusted = {key_id_of(SIGNING_KEY.public_key()): SIGNING_KEY.public_key()}
    try:
        verify_manifest(forged, trusted, now=NOW)
    except ManifestError as exc:
        assert exc.reason == "signature"
        return
    assert signature == SIGNED.signature


# --- the agent: commands and desired state -----------------------------------------------------


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@pytest.fixture(autouse=True)
def _keep_root_log_level() -> Iterator[None]:
    # RuntimeState sets the root logger's level from a desired config; other tests must not
    # inherit it.
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture(scope="module")
def processor(state_dir: Path) -> Iterator[CommandProcessor]:
    runtime = RuntimeState(telemetry_interval_s=30, log_level="INFO", log_forward_level="INFO")
    (state_dir / "commands").mkdir()
    processor = CommandProcessor(
        state_dir / "commands",
        runtime,
        request_restart=lambda: None,
        recent_logs=list,
        now=lambda: NOW,
    )
    yield processor
    processor.close()


@pytest.fixture(scope="module")
def applier(state_dir: Path) -> Iterator[DesiredApplier]:
    runtime = RuntimeState(telemetry_interval_s=30, log_level="INFO", log_forward_level="INFO")
    (state_dir / "desired").mkdir()
    applier = DesiredApplier(state_dir / "desired", runtime)
    yield applier
    applier.close()


def _acks(processor: CommandProcessor, payload: bytes) -> list[AckMessage]:
    async def collect() -> list[AckMessage]:
        return [ack async for ack in processor.handle(payload)]

    return asyncio.run(collect())


def _payloads(model: type[BaseModel]) -> st.SearchStrategy[bytes]:
    document = json.loads(VALID[model].model_dump_json())
    return (
        broken(document)
        | st.binary(max_size=256)
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.sampled_from(HOSTILE)
    )


@FUZZ
@given(payload=_payloads(CommandMessage))
@example(payload=b'{"id": "cmd-deep-0001", "type": ' + b"[" * 5000)
def test_the_agent_answers_or_drops_any_command_payload_and_never_raises(
    processor: CommandProcessor, payload: bytes
) -> None:
    acks = _acks(processor, payload)
    try:
        command = decode(CommandMessage, payload)
    except MalformedPayloadError:
        # A malformed command is rejected by id when it has a usable one, else dropped.
        assert [ack.status for ack in acks] in ([], [AckStatus.REJECTED])
        return
    assert all(ack.command_id == command.id for ack in acks)


@FUZZ
@given(payload=_payloads(DesiredState))
@example(payload=b'{"generation": 99, "config": ' + b"[" * 5000)
def test_the_agent_reports_or_ignores_any_desired_payload_and_never_raises(
    applier: DesiredApplier, payload: bytes
) -> None:
    reported = applier.apply(payload)
    if reported is None:
        return
    try:
        decode(DesiredState, payload)
    except MalformedPayloadError:
        assert not reported.applied
        assert reported.detail
