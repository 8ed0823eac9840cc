"""Command handling and desired state on the agent, driven directly: no broker involved."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent import __version__
from device_agent.commands import (
    COLLECT_LOGS_MAX_BYTES,
    COMMANDS_DB,
    CommandContext,
    CommandFailed,
    CommandProcessor,
    CommandRegistry,
)
from device_agent.config import AgentSettings
from device_agent.desired import DESIRED_FILE, DesiredApplier
from device_agent.runtime import RuntimeState
from fleet_protocol import (
    MAX_PAYLOAD_BYTES,
    AckMessage,
    AckStatus,
    CommandMessage,
    RuntimeConfig,
)
from fleet_protocol.messages import JsonScalar

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
RUN = [AckStatus.ACCEPTED, AckStatus.RUNNING, AckStatus.SUCCEEDED]
FAILED = [AckStatus.ACCEPTED, AckStatus.RUNNING, AckStatus.FAILED]
_ids = iter(range(1, 1_000_000))


def command(
    command_type: str,
    params: dict[str, JsonScalar] | None = None,
    *,
    command_id: str | None = None,
    expires_in: timedelta = timedelta(minutes=5),
) -> bytes:
    """A command payload as the service would publish it at NOW."""
    return CommandMessage(
        id=command_id or f"cmd-{next(_ids):08d}",
        type=command_type,
        params=params or {},
        issued_at=NOW - timedelta(seconds=1),
        expires_at=NOW + expires_in,
    ).to_payload()


def new_runtime() -> RuntimeState:
    return RuntimeState(telemetry_interval_s=30.0, log_level="INFO", log_forward_level="WARNING")


async def run(processor: CommandProcessor, payload: bytes) -> list[AckMessage]:
    return [ack async for ack in processor.handle(payload)]


def statuses(acks: list[AckMessage]) -> list[AckStatus]:
    return [ack.status for ack in acks]


@pytest.fixture(autouse=True)
def _keep_root_log_level() -> Iterator[None]:
    # RuntimeState sets the root logger's level; other tests must not inherit it.
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
def runtime() -> RuntimeState:
    return new_runtime()


class Agent:
    """What the processor calls back into: recorded restarts and a log buffer."""

    def __init__(self) -> None:
        self.restarts = 0
        self.logs: list[str] = []

    def request_restart(self) -> None:
        self.restarts += 1

    def recent_logs(self) -> list[str]:
        return list(self.logs)


@pytest.fixture
def agent() -> Agent:
    return Agent()


@pytest.fixture
def open_processor(
    tmp_path: Path, runtime: RuntimeState, agent: Agent
) -> Iterator[Callable[..., CommandProcessor]]:
    """Opens processors on one state dir, all closed at the end of the test."""
    opened: list[CommandProcessor] = []

    def open_(registry: CommandRegistry | None = None, now: datetime = NOW) -> CommandProcessor:
        processor = CommandProcessor(
            tmp_path,
            runtime,
            request_restart=agent.request_restart,
            recent_logs=agent.recent_logs,
            registry=registry,
            now=lambda: now,
        )
        opened.append(processor)
        return processor

    yield open_
    for processor in opened:
        processor.close()


@pytest.fixture
def processor(open_processor: Callable[..., CommandProcessor]) -> CommandProcessor:
    return open_processor()


# --- the built-in commands ---------------------------------------------------------------------


async def test_ping_answers_accepted_running_succeeded_with_pong(
    processor: CommandProcessor,
) -> None:
    payload = command("ping", command_id="ping-0001")
    acks = await run(processor, payload)
    assert statuses(acks) == RUN
    assert {ack.command_id for ack in acks} == {"ping-0001"}
    assert len({ack.message_id for ack in acks}) == 3
    assert acks[-1].result == {"pong": True, "agent_version": __version__}


async def test_set_config_changes_the_runtime_and_signals_the_change(
    processor: CommandProcessor, runtime: RuntimeState
) -> None:
    params: dict[str, JsonScalar] = {"telemetry_interval_s": 5, "log_level": "DEBUG"}
    acks = await run(processor, command("set-config", params))
    assert statuses(acks) == RUN
    assert runtime.telemetry_interval_s == 5.0
    assert runtime.log_level == "DEBUG"
    assert runtime.log_forward_level == "WARNING"  # not named, so unchanged
    assert runtime.changed.is_set()
    assert logging.getLogger().level == logging.DEBUG
    assert acks[-1].result == {
        "telemetry_interval_s": 5.0,
        "log_level": "DEBUG",
        "log_forward_level": "WARNING",
    }


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"telemetry_interval_s": 0}, "telemetry_interval_s"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"colour": "red"}, "colour"),
        ({}, "needs at least one of"),
    ],
)
async def test_set_config_with_bad_params_fails_and_changes_nothing(
    processor: CommandProcessor,
    runtime: RuntimeState,
    params: dict[str, JsonScalar],
    expected: str,
) -> None:
    acks = await run(processor, command("set-config", params))
    assert statuses(acks) == FAILED
    assert acks[-1].detail is not None
    assert expected in acks[-1].detail
    assert runtime.effective() == new_runtime().effective()
    assert not runtime.changed.is_set()


async def test_collect_logs_returns_the_newest_200_lines_by_default(
    processor: CommandProcessor, agent: Agent
) -> None:
    agent.logs = [f"line {n}" for n in range(300)]
    acks = await run(processor, command("collect-logs"))
    assert statuses(acks) == RUN
    result = acks[-1].result
    assert result is not None
    assert result["lines"] == "\n".join(f"line {n}" for n in range(100, 300))
    assert result["count"] == 200
    assert result["truncated"] is False


async def test_collect_logs_honours_the_lines_param(
    processor: CommandProcessor, agent: Agent
) -> None:
    agent.logs = [f"line {n}" for n in range(10)]
    acks = await run(processor, command("collect-logs", {"lines": 3}))
    assert acks[-1].result is not None
    assert acks[-1].result["lines"] == "line 7\nline 8\nline 9"


@pytest.mark.parametrize("lines", [0, 2001, "20", True])
async def test_collect_logs_fails_on_a_bad_lines_param(
    processor: CommandProcessor, lines: JsonScalar
) -> None:
    acks = await run(processor, command("collect-logs", {"lines": lines}))
    assert statuses(acks) == FAILED
    assert acks[-1].detail is not None
    assert "lines" in acks[-1].detail


async def test_collect_logs_drops_the_oldest_lines_to_fit_in_one_ack(
    processor: CommandProcessor, agent: Agent
) -> None:
    # Quotes and non-ASCII make the JSON bigger than the text; the limit is on the JSON.
    agent.logs = [f'{n:04d} "quoted" ünïcödé ' + "x" * 200 for n in range(2000)]
    acks = await run(processor, command("collect-logs", {"lines": 2000}))
    assert statuses(acks) == RUN
    result = acks[-1].result
    assert result is not None
    assert result["truncated"] is True
    text = result["lines"]
    assert isinstance(text, str)
    assert text.endswith(agent.logs[-1])
    assert text.split("\n")[0] in agent.logs  # cut at a line boundary
    assert len(json.dumps(text, ensure_ascii=False).encode()) <= COLLECT_LOGS_MAX_BYTES + 2
    assert len(acks[-1].to_payload()) <= MAX_PAYLOAD_BYTES


async def test_collect_logs_keeps_the_end_of_a_single_huge_line(
    processor: CommandProcessor, agent: Agent
) -> None:
    agent.logs = ["start " + "y" * 100_000 + " the error"]
    acks = await run(processor, command("collect-logs"))
    result = acks[-1].result
    assert result is not None
    assert isinstance(result["lines"], str)
    assert result["lines"].endswith(" the error")
    assert len(acks[-1].to_payload()) <= MAX_PAYLOAD_BYTES


async def test_restart_agent_requests_the_restart_only_after_the_final_ack(
    processor: CommandProcessor, agent: Agent
) -> None:
    seen: list[tuple[AckStatus, int]] = []
    async for ack in processor.handle(command("restart-agent")):
        # The agent stores each ack here; the restart must not overtake the final one.
        seen.append((ack.status, agent.restarts))
    assert seen == [(status, 0) for status in RUN]
    assert agent.restarts == 1


async def test_restart_agent_with_params_fails_and_does_not_restart(
    processor: CommandProcessor, agent: Agent
) -> None:
    acks = await run(processor, command("restart-agent", {"now": True}))
    assert statuses(acks) == FAILED
    assert agent.restarts == 0


# --- rejections --------------------------------------------------------------------------------


async def test_an_unknown_type_is_rejected_naming_the_known_ones(
    processor: CommandProcessor,
) -> None:
    acks = await run(processor, command("frobnicate", command_id="frob-0001"))
    assert statuses(acks) == [AckStatus.REJECTED]
    assert acks[0].command_id == "frob-0001"
    assert acks[0].detail == (
        "unknown command type 'frobnicate'; this agent knows: "
        "collect-logs, infer, ping, restart-agent, set-config"
    )


async def test_an_expired_command_is_rejected_and_not_run(
    processor: CommandProcessor, agent: Agent
) -> None:
    acks = await run(processor, command("restart-agent", expires_in=timedelta(seconds=-1)))
    assert statuses(acks) == [AckStatus.REJECTED]
    assert acks[0].detail is not None
    assert acks[0].detail.startswith("expired at 2025-06-01T11:59:59+00:00")
    assert agent.restarts == 0


async def test_a_malformed_command_with_a_readable_id_is_rejected_with_the_reason(
    processor: CommandProcessor,
) -> None:
    payload = json.dumps({"id": "bad-00001", "type": "ping"}).encode()  # no issued/expires
    acks = await run(processor, payload)
    assert statuses(acks) == [AckStatus.REJECTED]
    assert acks[0].command_id == "bad-00001"
    assert acks[0].detail is not None
    assert acks[0].detail.startswith("malformed command: schema:")
    assert "issued_at" in acks[0].detail


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", b'{"type": "ping"}', b'{"id": "x"}', b'{"id": "has/slash/0"}'],
)
async def test_a_command_without_a_usable_id_gets_no_ack_only_a_warning(
    processor: CommandProcessor, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="device_agent.commands"):
        assert await run(processor, payload) == []
    assert "no usable id" in caplog.text


async def test_a_replayed_command_is_rejected_even_after_a_restart(
    open_processor: Callable[..., CommandProcessor], runtime: RuntimeState
) -> None:
    payload = command("set-config", {"telemetry_interval_s": 7}, command_id="once-0001")
    first = open_processor()
    assert statuses(await run(first, payload)) == RUN

    runtime.telemetry_interval_s = 30.0  # so a second run would show
    again = await run(first, payload)
    assert statuses(again) == [AckStatus.REJECTED]
    assert again[0].detail == "command once-0001 was already received"
    first.close()

    reopened = open_processor()
    after_restart = await run(reopened, payload)
    assert statuses(after_restart) == [AckStatus.REJECTED]
    assert after_restart[0].detail == "command once-0001 was already received"
    assert runtime.telemetry_interval_s == 30.0


async def test_seen_ids_are_pruned_a_day_after_they_expire(
    tmp_path: Path, open_processor: Callable[..., CommandProcessor]
) -> None:
    payload = command("ping", command_id="old-00001")
    await run(open_processor(), payload)
    later = open_processor(now=NOW + timedelta(days=2))
    with contextlib.closing(sqlite3.connect(tmp_path / COMMANDS_DB)) as db:
        assert db.execute("SELECT count(*) FROM seen_commands").fetchone() == (0,)
    # Forgotten, but a replay this late is still refused: it has expired.
    acks = await run(later, payload)
    assert statuses(acks) == [AckStatus.REJECTED]
    assert acks[0].detail is not None
    assert acks[0].detail.startswith("expired at")


# --- custom handlers ---------------------------------------------------------------------------


async def test_a_handler_registered_in_a_new_registry_runs(
    open_processor: Callable[..., CommandProcessor],
) -> None:
    registry = CommandRegistry()

    @registry.register("echo")
    async def echo(message: CommandMessage, context: CommandContext) -> dict[str, JsonScalar]:
        return {**message.params, "at": context.now().isoformat()}

    @registry.register("refuse")
    async def refuse(message: CommandMessage, context: CommandContext) -> None:
        raise CommandFailed("the camera is busy; try again in a minute")

    @registry.register("crash")
    async def crash(message: CommandMessage, context: CommandContext) -> None:
        raise RuntimeError("boom")

    @registry.register("nothing")
    async def nothing(message: CommandMessage, context: CommandContext) -> None:
        return None

    processor = open_processor(registry)
    acks = await run(processor, command("echo", {"word": "hi"}))
    assert statuses(acks) == RUN
    assert acks[-1].result == {"word": "hi", "at": NOW.isoformat()}

    refused = await run(processor, command("refuse"))
    assert statuses(refused) == FAILED
    assert refused[-1].detail == "the camera is busy; try again in a minute"

    crashed = await run(processor, command("crash"))
    assert statuses(crashed) == FAILED
    assert crashed[-1].detail == "RuntimeError: boom"

    empty = await run(processor, command("nothing"))
    assert statuses(empty) == RUN
    assert empty[-1].result is None

    unknown = await run(processor, command("ping"))
    assert unknown[0].detail == (
        "unknown command type 'ping'; this agent knows: crash, echo, nothing, refuse"
    )


async def test_a_handler_whose_result_acks_cannot_carry_fails_its_command(
    open_processor: Callable[..., CommandProcessor],
) -> None:
    registry = CommandRegistry()

    @registry.register("big")
    async def big(message: CommandMessage, context: CommandContext) -> dict[str, JsonScalar]:
        return {f"k{n}": n for n in range(100)}  # acks carry at most 64 result fields

    acks = await run(open_processor(registry), command("big"))
    assert statuses(acks) == FAILED
    assert acks[-1].detail is not None
    assert acks[-1].detail.startswith("handler returned an invalid result")


def test_a_command_type_cannot_be_registered_twice() -> None:
    registry = CommandRegistry()

    async def handler(message: CommandMessage, context: CommandContext) -> None:
        return None

    registry.register("once")(handler)
    with pytest.raises(ValueError, match="already has a handler"):
        registry.register("once")(handler)


# --- desired state -----------------------------------------------------------------------------


def desired(generation: int, **config: JsonScalar) -> bytes:
    return json.dumps({"generation": generation, "config": config}).encode()


@pytest.fixture
def applier(tmp_path: Path, runtime: RuntimeState) -> Iterator[DesiredApplier]:
    applier = DesiredApplier(tmp_path, runtime)
    yield applier
    applier.close()


def test_a_new_generation_is_applied_and_reported(
    applier: DesiredApplier, runtime: RuntimeState, tmp_path: Path
) -> None:
    reported = applier.apply(desired(1, telemetry_interval_s=10, log_forward_level="ERROR"))
    assert reported is not None
    assert reported.generation == 1
    assert reported.applied is True
    assert reported.config == {
        "telemetry_interval_s": 10.0,
        "log_level": "INFO",
        "log_forward_level": "ERROR",
    }
    assert runtime.telemetry_interval_s == 10.0
    assert runtime.changed.is_set()
    assert json.loads((tmp_path / DESIRED_FILE).read_text())["generation"] == 1


def test_the_same_or_an_older_generation_is_ignored(
    applier: DesiredApplier, runtime: RuntimeState
) -> None:
    assert applier.apply(desired(5, telemetry_interval_s=10)) is not None
    assert applier.apply(desired(5, telemetry_interval_s=99)) is None
    assert applier.apply(desired(4, telemetry_interval_s=99)) is None
    assert runtime.telemetry_interval_s == 10.0
    assert applier.generation == 5


def test_a_generation_replaces_the_config_of_the_one_before(
    applier: DesiredApplier, runtime: RuntimeState
) -> None:
    applier.apply(desired(1, log_level="DEBUG", telemetry_interval_s=10))
    reported = applier.apply(desired(2, telemetry_interval_s=20))
    assert reported is not None
    # log_level is no longer desired, so the agent's own setting is back.
    assert reported.config["log_level"] == "INFO"
    assert runtime.log_level == "INFO"
    assert runtime.telemetry_interval_s == 20.0


def test_a_restart_reapplies_the_persisted_config_and_reports_once(
    tmp_path: Path, applier: DesiredApplier
) -> None:
    applier.apply(desired(3, telemetry_interval_s=12, log_level="ERROR"))
    applier.close()

    fresh = new_runtime()
    restarted = DesiredApplier(tmp_path, fresh)
    try:
        # Before any message arrives: the remote config is back.
        assert fresh.telemetry_interval_s == 12.0
        assert fresh.log_level == "ERROR"
        # The retained desired state comes again on connect: report it once, apply nothing.
        reported = restarted.apply(desired(3, telemetry_interval_s=12, log_level="ERROR"))
        assert reported is not None
        assert (reported.generation, reported.applied) == (3, True)
        assert reported.config["telemetry_interval_s"] == 12.0
        assert restarted.apply(desired(3, telemetry_interval_s=12, log_level="ERROR")) is None
    finally:
        restarted.close()


def test_an_invalid_config_is_reported_unapplied_and_not_retried(
    applier: DesiredApplier, runtime: RuntimeState, tmp_path: Path
) -> None:
    applier.apply(desired(1, telemetry_interval_s=10))
    reported = applier.apply(desired(2, telemetry_interval_s=0))
    assert reported is not None
    assert (reported.generation, reported.applied) == (2, False)
    assert reported.detail is not None
    assert "telemetry_interval_s" in reported.detail
    assert runtime.telemetry_interval_s == 10.0  # the last good config stays in force

    assert applier.apply(desired(2, telemetry_interval_s=0)) is None  # not retried
    fixed = applier.apply(desired(3, telemetry_interval_s=15))
    assert fixed is not None
    assert fixed.applied is True
    assert runtime.telemetry_interval_s == 15.0


def test_a_restart_after_an_invalid_generation_keeps_the_last_good_config(
    tmp_path: Path, applier: DesiredApplier
) -> None:
    applier.apply(desired(1, telemetry_interval_s=10))
    applier.apply(desired(2, log_level="LOUD"))
    applier.close()

    fresh = new_runtime()
    restarted = DesiredApplier(tmp_path, fresh)
    try:
        assert fresh.telemetry_interval_s == 10.0
        reported = restarted.apply(desired(2, log_level="LOUD"))
        assert reported is not None
        assert (reported.generation, reported.applied) == (2, False)
        assert reported.detail is not None
        assert "log_level" in reported.detail
    finally:
        restarted.close()


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[]", b'{"config": {}}', b'{"generation": -1}'],
)
def test_a_desired_state_without_a_usable_generation_is_ignored(
    applier: DesiredApplier, payload: bytes
) -> None:
    assert applier.apply(payload) is None
    assert applier.generation is None


def test_a_damaged_desired_file_is_ignored_and_the_next_state_applies(
    tmp_path: Path, runtime: RuntimeState
) -> None:
    (tmp_path / DESIRED_FILE).write_text("{not json")
    applier = DesiredApplier(tmp_path, runtime)
    try:
        reported = applier.apply(desired(1, telemetry_interval_s=9))
        assert reported is not None
        assert reported.applied is True
    finally:
        applier.close()


def test_runtime_apply_overrides_only_the_fields_given(runtime: RuntimeState) -> None:
    runtime.apply(RuntimeConfig.model_validate({"log_level": "DEBUG"}))
    assert runtime.effective() == {
        "telemetry_interval_s": 30.0,
        "log_level": "DEBUG",
        "log_forward_level": "WARNING",
    }
    runtime.changed.clear()
    runtime.apply(RuntimeConfig.model_validate({"log_level": "DEBUG"}))
    assert not runtime.changed.is_set()  # nothing changed, so nothing to re-read


def test_runtime_starts_from_the_agent_settings(tmp_path: Path) -> None:
    settings = AgentSettings(state_dir=tmp_path, telemetry_interval_s=2.5, log_level="DEBUG")
    runtime = RuntimeState.from_settings(settings)
    assert runtime.effective() == {
        "telemetry_interval_s": 2.5,
        "log_level": "DEBUG",
        "log_forward_level": "WARNING",
    }
    assert not runtime.changed.is_set()
