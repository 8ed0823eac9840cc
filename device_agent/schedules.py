"""Scheduled inference: run each desired model on input from a file, a folder, a command or pushes.

Every ``InferenceSchedule`` of a desired model runs as its own named task,
``schedule:<model>:<index>``, every ``interval_s`` (the first run at once):

    file     the file is read afresh each time (at most ``schedule_input_max_bytes``)
    folder   every file that appears in the folder is run once; the names done are kept in
             ``<state_dir>/schedules/``, so a restart does not run them again
    command  argv is run (no shell) with ``schedule_command_timeout_s``; its stdout is the input.
             argv[0] must be listed in ``schedule_commands_allowed`` (empty by default): the
             desired state comes from the service, and it must not be able to start any program
             on the device. A refused command is named in the model's reported ``detail``.
    http     the inputs pushed to the local API (``PushInbox``) since the last run

A schedule waits while its model is not loaded. Each outcome becomes a ``ResultMessage`` handed to
the result sink (the outbox, ``results/<model>``); a failed inference is a result with ``error``
set, so error rates can be computed. Raw input stays on the device: results name it by
``input_ref`` (a path, the command, a push id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from device_agent.config import AgentSettings
from device_agent.durable import write_atomically
from device_agent.inference import (
    InferenceFailure,
    ModelNotLoadedError,
    ModelPool,
    PushInbox,
    ResultSink,
    failed_result,
    parse_command_input,
    result_message,
)
from fleet_protocol import InferenceSchedule, ResultMessage, ResultSource, ScheduleSource

__all__ = ["SCHEDULES_DIR", "ScheduleRunner", "infer_text", "schedule_problems"]

logger = logging.getLogger(__name__)

SCHEDULES_DIR = "schedules"
# A file younger than this may still be being written by whoever drops it in a watched folder;
# it is picked up at the next run instead.
_SETTLE_S = 0.5


def schedule_problems(schedules: Sequence[InferenceSchedule], settings: AgentSettings) -> list[str]:
    """Why some of ``schedules`` will not run here, one sentence each (empty: all will)."""
    problems: list[str] = []
    state_dir = settings.state_dir.resolve()
    for index, schedule in enumerate(schedules):
        if schedule.path is not None and _inside(Path(schedule.path), state_dir):
            problems.append(
                f"schedule {index} refused: {schedule.path!r} is inside the agent's state "
                "directory, which holds its private key, token and model keys"
            )
        if schedule.source is ScheduleSource.COMMAND and schedule.argv:
            program = schedule.argv[0]
            if program not in settings.schedule_commands_allowed:
                problems.append(
                    f"schedule {index} refused: {program!r} is not in this agent's "
                    "schedule_commands_allowed (EDGEFLEET_AGENT_SCHEDULE_COMMANDS_ALLOWED); the "
                    "device owner must allow it"
                )
    return problems


def _inside(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().is_relative_to(directory)
    except (OSError, ValueError):  # a NUL byte or a loop: not a path the agent will read
        return True


async def infer_text(
    pool: ModelPool, name: str, text: str, *, source: ResultSource, input_ref: str | None
) -> ResultMessage:
    """Run ``name`` on ``text`` (parsed for the model's runtime); the result, failed or not.

    Raises :class:`ModelNotLoadedError` when no model ``name`` is loaded: there is no
    provenance to put in a result then.
    """
    spec = pool.spec(name)
    if spec is None:
        raise ModelNotLoadedError(name)
    started = time.perf_counter()
    try:
        output = await pool.infer(name, parse_command_input(spec, text))
    except InferenceFailure as exc:
        latency_ms = (time.perf_counter() - started) * 1000
        # result_message and failed_result cut what a ResultMessage cannot carry, and mark it.
        return failed_result(
            spec, str(exc), source=source, input_ref=input_ref, latency_ms=latency_ms
        )
    return result_message(spec, output, source=source, input_ref=input_ref)


class _Seen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    path: str
    names: list[str]


class ScheduleRunner:
    """Runs the schedules of the desired models; see the module docstring."""

    def __init__(
        self,
        settings: AgentSettings,
        state_dir: Path,
        pool: ModelPool,
        sink: ResultSink,
        inbox: PushInbox | None = None,
    ) -> None:
        self._settings = settings
        self._dir = state_dir / SCHEDULES_DIR
        self._pool = pool
        self._sink = sink
        self._inbox = inbox
        self._wanted: dict[tuple[str, int], InferenceSchedule] = {}
        self._changed = asyncio.Event()

    def update(self, schedules: Mapping[str, Sequence[InferenceSchedule]]) -> None:
        """The schedules of every desired model; changed ones restart, removed ones stop."""
        self._wanted = {
            (name, index): schedule
            for name, model_schedules in schedules.items()
            for index, schedule in enumerate(model_schedules)
        }
        self._changed.set()

    async def run(self) -> None:
        """The named ``schedule:<model>:<index>`` tasks, kept in step with :meth:`update`."""
        running: dict[tuple[str, int], tuple[InferenceSchedule, asyncio.Task[None]]] = {}
        # Start from what is wanted now: after a supervisor restart nothing else would wake us.
        self._changed.set()
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    await self._changed.wait()
                    self._changed.clear()
                    wanted = dict(self._wanted)
                    for key, (schedule, task) in list(running.items()):
                        if wanted.get(key) != schedule:
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await task
                            del running[key]
                    for key, schedule in wanted.items():
                        if key not in running:
                            name, index = key
                            task = group.create_task(
                                self._loop(name, index, schedule), name=f"schedule:{name}:{index}"
                            )
                            running[key] = (schedule, task)
        finally:
            for _, task in running.values():
                task.cancel()

    async def _loop(self, name: str, index: int, schedule: InferenceSchedule) -> None:
        problems = schedule_problems([schedule], self._settings)
        if problems:
            logger.warning("%s: %s", name, problems[0])
            return
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if self._pool.spec(name) is None:
                logger.debug("schedule %d of %s waits: the model is not loaded", index, name)
            else:
                try:
                    await self._run_once(name, schedule)
                except ModelNotLoadedError:
                    logger.debug("schedule %d of %s: model unloaded meanwhile", index, name)
                except (OSError, ValueError) as exc:  # ValueError: a NUL in a path or argv
                    logger.warning("schedule %d of %s cannot read its input: %s", index, name, exc)
            await asyncio.sleep(max(0.0, started + schedule.interval_s - loop.time()))

    async def _run_once(self, name: str, schedule: InferenceSchedule) -> None:
        source = schedule.source
        if source is ScheduleSource.FILE:
            assert schedule.path is not None  # the protocol model guarantees it
            path = Path(schedule.path)
            await self._infer_file(name, path)
        elif source is ScheduleSource.FOLDER:
            assert schedule.path is not None
            await self._run_folder(name, Path(schedule.path))
        elif source is ScheduleSource.COMMAND:
            assert schedule.argv
            await self._run_command(name, schedule.argv)
        elif self._inbox is not None:
            for pushed in self._inbox.drain(name):
                await self._publish(name, pushed.text, pushed.id)

    async def _infer_file(self, name: str, path: Path) -> None:
        data = await asyncio.to_thread(_read_bounded, path, self._settings.schedule_input_max_bytes)
        if data is None:
            await self._fail(
                name,
                f"{path} is larger than schedule_input_max_bytes "
                f"({self._settings.schedule_input_max_bytes})",
                str(path),
            )
            return
        await self._publish_bytes(name, data, str(path))

    async def _run_folder(self, name: str, folder: Path) -> None:
        key = hashlib.sha256(f"{name}\n{folder}".encode()).hexdigest()[:24]
        state_file = self._dir / f"{key}.json"
        seen = await asyncio.to_thread(_load_seen, state_file)
        now = time.time()
        present = await asyncio.to_thread(_list_files, folder)
        # Names that left the folder are forgotten, so the state file does not grow for ever.
        done = {n for n in seen if n in present}
        for file_name, mtime in sorted(present.items(), key=lambda item: (item[1], item[0])):
            if file_name in done or now - mtime < _SETTLE_S:
                continue
            await self._infer_file(name, folder / file_name)
            done.add(file_name)
            record = _Seen(model=name, path=str(folder), names=sorted(done))
            await asyncio.to_thread(_save_seen, state_file, record)

    async def _run_command(self, name: str, argv: Sequence[str]) -> None:
        ref = " ".join(argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the argv
            await self._fail(name, f"cannot run {argv[0]!r}: {exc}", ref)
            return
        try:
            out, err = await asyncio.wait_for(
                process.communicate(), self._settings.schedule_command_timeout_s
            )
        except TimeoutError:
            process.kill()
            await process.wait()
            await self._fail(
                name,
                f"{argv[0]!r} did not finish within schedule_command_timeout_s "
                f"({self._settings.schedule_command_timeout_s} s); killed",
                ref,
            )
            return
        if process.returncode != 0:
            tail = err.decode(errors="replace").strip()[-300:]
            await self._fail(name, f"{argv[0]!r} exited with {process.returncode}: {tail}", ref)
            return
        if len(out) > self._settings.schedule_input_max_bytes:
            await self._fail(name, f"{argv[0]!r} printed more than schedule_input_max_bytes", ref)
            return
        await self._publish_bytes(name, out, ref)

    async def _publish_bytes(self, name: str, data: bytes, ref: str) -> None:
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            await self._fail(name, f"the input is not UTF-8 text ({exc})", ref)
            return
        await self._publish(name, text, ref)

    async def _publish(self, name: str, text: str, ref: str) -> None:
        result = await infer_text(
            self._pool, name, text, source=ResultSource.SCHEDULE, input_ref=ref
        )
        await self._sink(result)

    async def _fail(self, name: str, error: str, ref: str) -> None:
        spec = self._pool.spec(name)
        if spec is None:
            return
        logger.warning("scheduled inference of %s failed: %s", name, error)
        await self._sink(
            failed_result(
                spec,
                error,
                source=ResultSource.SCHEDULE,
                input_ref=ref,
                latency_ms=0.0,
            )
        )


def _read_bounded(path: Path, limit: int) -> bytes | None:
    with path.open("rb") as file:
        data = file.read(limit + 1)
    return None if len(data) > limit else data


def _list_files(folder: Path) -> dict[str, float]:
    """Regular files directly in ``folder`` (hidden ones skipped) and their mtimes."""
    if not folder.is_dir():
        return {}
    files: dict[str, float] = {}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or not entry.is_file():
            continue
        files[entry.name] = entry.stat().st_mtime
    return files


def _load_seen(path: Path) -> set[str]:
    try:
        return set(_Seen.model_validate_json(path.read_bytes()).names)
    except FileNotFoundError:
        return set()
    except (OSError, ValidationError) as exc:
        logger.warning("ignoring unreadable %s (%s); its folder's files run again", path, exc)
        return set()


def _save_seen(path: Path, record: _Seen) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, record.model_dump_json().encode() + b"\n")
