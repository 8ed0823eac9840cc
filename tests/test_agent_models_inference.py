"""Inference from commands and schedules with a real ONNX model in a real worker process."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent.commands import CommandProcessor
from device_agent.config import AgentSettings
from device_agent.inference import ModelPool, ModelSpec, PushInbox
from device_agent.runtime import RuntimeState
from device_agent.schedules import SCHEDULES_DIR, ScheduleRunner, schedule_problems
from fleet_protocol import (
    AckMessage,
    AckStatus,
    CommandMessage,
    InferenceSchedule,
    ModelRuntime,
    ResultMessage,
    ResultSource,
    ScheduleSource,
)
from fleet_protocol.messages import JsonScalar
from tests.fixtures.models import build_onnx_classifier, file_sha256, write_labels

NAME = "classifier"
IMAGE = json.dumps([[[[0.25] * 32] * 32] * 3])


class Results:
    """The result sink: what the outbox would have been given, and a wake-up for waiters."""

    def __init__(self) -> None:
        self.items: list[ResultMessage] = []
        self._added = asyncio.Event()

    async def __call__(self, result: ResultMessage) -> None:
        self.items.append(result)
        self._added.set()

    async def wait_for(self, count: int, limit_s: float = 30.0) -> list[ResultMessage]:
        async with asyncio.timeout(limit_s):
            while len(self.items) < count:
                self._added.clear()
                await self._added.wait()
        return self.items


@pytest.fixture
def settings(tmp_path: Path) -> AgentSettings:
    return AgentSettings(state_dir=tmp_path / "state", schedule_commands_allowed=[sys.executable])


@pytest.fixture
async def pool(settings: AgentSettings, tmp_path: Path) -> AsyncIterator[ModelPool]:
    weights = build_onnx_classifier(tmp_path / "model.onnx")
    labels = write_labels(tmp_path / "labels.txt")
    spec = ModelSpec(
        name=NAME,
        version="1.0",
        release=3,
        runtime=ModelRuntime.ONNX,
        sha256=file_sha256(weights),
        weights=weights,
        files={"labels": labels},
    )
    pool = ModelPool(settings.inference)
    await pool.load(spec)
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
def results() -> Results:
    return Results()


# --- the infer command ---------------------------------------------------------------------------


async def run_command(
    settings: AgentSettings,
    pool: ModelPool,
    results: Results,
    params: dict[str, JsonScalar],
) -> list[AckMessage]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    processor = CommandProcessor(
        settings.state_dir,
        RuntimeState(telemetry_interval_s=30.0, log_level="INFO", log_forward_level="WARNING"),
        request_restart=lambda: None,
        recent_logs=list,
        pool=pool,
        results=results,
    )
    now = datetime.now(UTC)
    payload = CommandMessage(
        id=f"infer-{len(results.items):04d}-{now.timestamp():.0f}",
        type="infer",
        params=params,
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
    ).to_payload()
    try:
        return [ack async for ack in processor.handle(payload)]
    finally:
        processor.close()


async def test_an_infer_command_publishes_a_result_and_acks_a_summary(
    settings: AgentSettings, pool: ModelPool, results: Results
) -> None:
    acks = await run_command(
        settings, pool, results, {"model": NAME, "input": IMAGE, "input_ref": "camera-7.jpg"}
    )

    assert [a.status for a in acks] == [AckStatus.ACCEPTED, AckStatus.RUNNING, AckStatus.SUCCEEDED]
    [result] = results.items
    assert result.source is ResultSource.COMMAND and result.error is None
    assert result.model == NAME and result.release == 3 and result.input_ref == "camera-7.jpg"
    assert result.label is not None and result.confidence is not None
    summary = acks[-1].result
    assert summary is not None
    assert summary["label"] == result.label and summary["result_message_id"] == result.message_id


async def test_an_infer_command_with_a_bad_input_fails_and_still_publishes_the_failure(
    settings: AgentSettings, pool: ModelPool, results: Results
) -> None:
    acks = await run_command(settings, pool, results, {"model": NAME, "input": "[1, 2, 3]"})

    assert acks[-1].status is AckStatus.FAILED
    assert acks[-1].detail is not None and acks[-1].detail.startswith("inference with classifier")
    [result] = results.items
    assert result.error is not None and result.input_ref is not None
    assert result.input_ref.startswith("command:")


async def test_an_infer_command_for_a_model_not_loaded_fails_naming_the_loaded_ones(
    settings: AgentSettings, pool: ModelPool, results: Results
) -> None:
    acks = await run_command(settings, pool, results, {"model": "llm", "input": "hello"})

    assert acks[-1].status is AckStatus.FAILED
    assert acks[-1].detail is not None and "(loaded: classifier)" in acks[-1].detail
    assert results.items == []


async def test_an_infer_command_without_its_input_is_refused_by_its_params(
    settings: AgentSettings, pool: ModelPool, results: Results
) -> None:
    acks = await run_command(settings, pool, results, {"model": NAME})

    assert acks[-1].status is AckStatus.FAILED
    assert acks[-1].detail is not None and "invalid params for infer: input" in acks[-1].detail


# --- schedules -----------------------------------------------------------------------------------


@pytest.fixture
async def open_runner(
    settings: AgentSettings, pool: ModelPool, results: Results
) -> AsyncIterator[Callable[..., ScheduleRunner]]:
    tasks: list[asyncio.Task[None]] = []

    def open_(inbox: PushInbox | None = None) -> ScheduleRunner:
        runner = ScheduleRunner(settings, settings.state_dir, pool, results, inbox)
        tasks.append(asyncio.create_task(runner.run(), name="test-schedules"))
        return runner

    yield open_
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_folder_schedule_runs_each_new_file_once_even_across_restarts(
    open_runner: Callable[..., ScheduleRunner],
    results: Results,
    tmp_path: Path,
    settings: AgentSettings,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for index in range(3):
        (inbox / f"image-{index}.json").write_text(IMAGE)
    (inbox / ".hidden").write_text("not an input")
    schedule = InferenceSchedule(source=ScheduleSource.FOLDER, path=str(inbox), interval_s=1)
    await asyncio.sleep(0.6)  # older than the settle time, so the first run takes them

    first = open_runner()
    first.update({NAME: [schedule]})
    done = await results.wait_for(3)
    assert sorted(r.input_ref or "" for r in done) == [
        str(inbox / f"image-{i}.json") for i in range(3)
    ]
    assert all(r.source is ResultSource.SCHEDULE and r.error is None for r in done)

    # A second runner on the same state dir (an agent restart) takes only the new file. The
    # first one records a file as done right after publishing its result: wait for that.
    seen_files = list((settings.state_dir / SCHEDULES_DIR).glob("*.json"))
    for _ in range(100):
        seen_files = list((settings.state_dir / SCHEDULES_DIR).glob("*.json"))
        if seen_files and len(json.loads(seen_files[0].read_text())["names"]) == 3:
            break
        await asyncio.sleep(0.05)
    first.update({})
    (inbox / "image-3.json").write_text(IMAGE)
    second = open_runner()
    second.update({NAME: [schedule]})
    done = await results.wait_for(4)
    assert done[-1].input_ref == str(inbox / "image-3.json")
    await asyncio.sleep(2.5)  # two more runs of the schedule
    assert len(results.items) == 4


async def test_a_file_schedule_reads_the_file_every_interval(
    open_runner: Callable[..., ScheduleRunner], results: Results, tmp_path: Path
) -> None:
    source = tmp_path / "latest.json"
    source.write_text(IMAGE)
    runner = open_runner()
    runner.update(
        {NAME: [InferenceSchedule(source=ScheduleSource.FILE, path=str(source), interval_s=1)]}
    )

    done = await results.wait_for(2, limit_s=10)
    assert {r.input_ref for r in done} == {str(source)}


async def test_a_command_schedule_infers_on_the_commands_stdout(
    open_runner: Callable[..., ScheduleRunner], results: Results
) -> None:
    # A camera script, in effect: prints the tensor the model takes.
    argv = [sys.executable, "-c", "print([[[[0.25] * 32] * 32] * 3])"]
    runner = open_runner()
    runner.update(
        {NAME: [InferenceSchedule(source=ScheduleSource.COMMAND, argv=argv, interval_s=60)]}
    )

    [result] = await results.wait_for(1)
    assert result.error is None and result.input_ref is not None
    assert result.input_ref.startswith(sys.executable)


async def test_a_failing_command_is_published_as_a_failed_result(
    open_runner: Callable[..., ScheduleRunner], results: Results
) -> None:
    argv = [sys.executable, "-c", "import sys; sys.exit('camera offline')"]
    runner = open_runner()
    runner.update(
        {NAME: [InferenceSchedule(source=ScheduleSource.COMMAND, argv=argv, interval_s=60)]}
    )

    [result] = await results.wait_for(1)
    assert result.error is not None and "exited with 1: camera offline" in result.error


def test_a_command_not_on_the_allow_list_is_refused_with_a_reason(tmp_path: Path) -> None:
    strict = AgentSettings(state_dir=tmp_path)  # the default: nothing allowed
    schedule = InferenceSchedule(
        source=ScheduleSource.COMMAND, argv=["/bin/cat", "x"], interval_s=5
    )

    [problem] = schedule_problems([schedule], strict)

    assert "'/bin/cat' is not in this agent's schedule_commands_allowed" in problem


def test_a_file_schedule_may_not_read_the_agents_own_secrets(tmp_path: Path) -> None:
    settings = AgentSettings(state_dir=tmp_path / "state")
    for path in (tmp_path / "state" / "device.key", tmp_path / "state" / ".." / "state"):
        schedule = InferenceSchedule(source=ScheduleSource.FILE, path=str(path), interval_s=5)
        [problem] = schedule_problems([schedule], settings)
        assert "inside the agent's state directory" in problem
    elsewhere = InferenceSchedule(
        source=ScheduleSource.FOLDER, path=str(tmp_path / "camera"), interval_s=5
    )
    assert schedule_problems([elsewhere], settings) == []


async def test_a_refused_command_schedule_never_runs(
    tmp_path: Path, pool: ModelPool, results: Results
) -> None:
    strict = AgentSettings(state_dir=tmp_path / "strict")
    marker = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    runner = ScheduleRunner(strict, strict.state_dir, pool, results)
    task = asyncio.create_task(runner.run())
    runner.update(
        {NAME: [InferenceSchedule(source=ScheduleSource.COMMAND, argv=argv, interval_s=1)]}
    )
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not marker.exists() and results.items == []


async def test_an_http_schedule_drains_the_push_inbox(
    open_runner: Callable[..., ScheduleRunner], results: Results, settings: AgentSettings
) -> None:
    inbox = PushInbox(settings.inference.push_inbox_depth)
    pushed = [inbox.push(NAME, IMAGE), inbox.push(NAME, IMAGE)]
    runner = open_runner(inbox)
    runner.update({NAME: [InferenceSchedule(source=ScheduleSource.HTTP, interval_s=1)]})

    done = await results.wait_for(2)
    assert [r.input_ref for r in done] == [p.id for p in pushed]
