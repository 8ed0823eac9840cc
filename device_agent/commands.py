"""Command handling: validate, refuse replays durably, run the handler, answer with acks.

A command arrives on ``devices/{id}/commands``; :meth:`CommandProcessor.handle` turns it into
the acks the device publishes on ``devices/{id}/acks``:

* refused: one ``rejected`` ack whose detail says why (malformed, unknown type, replayed,
  expired). A payload whose ``id`` cannot even be read gets no ack at all: there is nobody to
  answer, so it is only logged.
* run: ``accepted``, ``running``, then ``succeeded`` with the handler's result or ``failed``
  with its error.

Each command id is written to ``<state_dir>/commands.db`` before its handler runs, so a command
redelivered by the broker (QoS 1) or replayed by anyone is refused even after an agent restart.

New command types need one handler each::

    registry = builtin_registry()

    @registry.register("reboot-camera")
    async def reboot_camera(command: CommandMessage, context: CommandContext) -> None: ...
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import device_agent
from device_agent.errors import AgentError, CorruptStateError
from device_agent.inference import ModelNotLoadedError, ModelPool, ResultSink
from device_agent.runtime import RuntimeState
from device_agent.schedules import infer_text
from fleet_protocol import (
    AckMessage,
    AckStatus,
    CommandMessage,
    MalformedPayloadError,
    ResultSource,
    RuntimeConfig,
    decode,
)
from fleet_protocol.logs import log_context
from fleet_protocol.manifest import MODEL_NAME_PATTERN
from fleet_protocol.messages import JsonScalar

__all__ = [
    "COLLECT_LOGS_MAX_BYTES",
    "COMMANDS_DB",
    "CommandContext",
    "CommandFailed",
    "CommandHandler",
    "CommandProcessor",
    "CommandRegistry",
    "builtin_registry",
]

logger = logging.getLogger(__name__)

COMMANDS_DB = "commands.db"

# Seen ids are kept this long past their command's expiry. After that a replay is refused as
# expired anyway, so the table stays as small as the commands still in flight; the margin
# covers a device clock that runs a little slow.
_SEEN_RETENTION = timedelta(days=1)

# A collect-logs result must fit in one ack, which fleet_protocol caps at 64 KiB; 48 KiB of
# JSON-encoded lines leaves room for the envelope and the other fields.
COLLECT_LOGS_MAX_BYTES = 48 * 1024
_COLLECT_LOGS_DEFAULT = 200
_COLLECT_LOGS_MAX = 2000

# An infer command's input travels inside the command (64 KiB at most); the full result goes
# to results/{model}, and the ack carries this much of a generated text as a summary.
_INFER_INPUT_MAX = 60_000
_INFER_SUMMARY_TEXT = 1000

# Ack details are capped by the protocol; longer error messages are cut to fit.
_MAX_DETAIL = 2000

# What AckMessage accepts as a command id; a rejection can only be sent for an id like this.
_ACKABLE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

CommandResult = dict[str, JsonScalar]
CommandHandler = Callable[["CommandMessage", "CommandContext"], Awaitable[CommandResult | None]]
_P = TypeVar("_P", bound=BaseModel)


class CommandFailed(AgentError):  # noqa: N818  (reads as what happened: "raise CommandFailed")
    """Raised by a handler to fail its command; the message becomes the ``failed`` ack's detail."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class CommandContext:
    """What a handler may use besides its command: the runtime settings and the agent's hooks."""

    runtime: RuntimeState
    recent_logs: Callable[[], list[str]]
    now: Callable[[], datetime]
    _request_restart: Callable[[], None] = field(repr=False)
    # The loaded models and where their results go; None in an agent that runs no models.
    pool: ModelPool | None = None
    results: ResultSink | None = None
    _after_ack: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def after_ack(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the command's final ack has been handed over (and stored)."""
        self._after_ack.append(action)

    def request_restart(self) -> None:
        """Ask the agent to restart, after this command's final ack has been handed over."""
        self.after_ack(self._request_restart)


class CommandRegistry:
    """Command types and their handlers; ``registry.register("type")(handler)`` adds one."""

    def __init__(self) -> None:
        self._handlers: dict[str, CommandHandler] = {}

    def register(self, command_type: str) -> Callable[[CommandHandler], CommandHandler]:
        """A decorator registering its function as the handler of ``command_type``."""

        def decorate(handler: CommandHandler) -> CommandHandler:
            if command_type in self._handlers:
                raise ValueError(f"command type {command_type!r} already has a handler")
            self._handlers[command_type] = handler
            return handler

        return decorate

    def get(self, command_type: str) -> CommandHandler | None:
        """The handler of ``command_type``, or None if this agent does not know it."""
        return self._handlers.get(command_type)

    def types(self) -> list[str]:
        """The known command types, sorted."""
        return sorted(self._handlers)


class CommandProcessor:
    """Turns command payloads into acks; owns ``<state_dir>/commands.db``. Call :meth:`close`."""

    def __init__(
        self,
        state_dir: Path,
        runtime: RuntimeState,
        *,
        request_restart: Callable[[], None],
        recent_logs: Callable[[], list[str]],
        registry: CommandRegistry | None = None,
        now: Callable[[], datetime] = _utcnow,
        pool: ModelPool | None = None,
        results: ResultSink | None = None,
    ) -> None:
        self._runtime = runtime
        self._pool = pool
        self._results = results
        self._request_restart = request_restart
        self._recent_logs = recent_logs
        self._registry = builtin_registry() if registry is None else registry
        self._now = now
        self._seen = _SeenCommands(state_dir / COMMANDS_DB, now())

    def close(self) -> None:
        """Close the seen-commands database."""
        self._seen.close()

    async def handle(self, payload: bytes) -> AsyncIterator[AckMessage]:
        """Yield the acks answering one command payload, in the order they must be published.

        Actions a handler deferred with :meth:`CommandContext.after_ack` (such as a restart) run
        when the caller asks for the ack after the final one, so store each ack before asking
        for the next: ``async for ack in processor.handle(p): await outbox.put(ack)``.
        """
        try:
            command = decode(CommandMessage, payload)
        except MalformedPayloadError as exc:
            command_id = _readable_id(payload)
            if command_id is None:
                logger.warning("dropped a command with no usable id: %s", exc)
                return
            logger.warning("rejected malformed command command_id=%s: %s", command_id, exc)
            yield _ack(command_id, AckStatus.REJECTED, f"malformed command: {exc}")
            return

        # Checked before anything else: a redelivered command gets the same answer whatever its
        # type or expiry, and the id is recorded before the handler can have any effect.
        if not await asyncio.to_thread(self._seen.record, command, self._now()):
            yield self._reject(command, f"command {command.id} was already received")
            return
        handler = self._registry.get(command.type)
        if handler is None:
            known = ", ".join(self._registry.types()) or "nothing"
            yield self._reject(
                command, f"unknown command type {command.type!r}; this agent knows: {known}"
            )
            return
        now = self._now()
        if command.is_expired(now):
            yield self._reject(
                command,
                f"expired at {command.expires_at.isoformat()} "
                f"(device time {now.isoformat()}); issue it again",
            )
            return

        logger.info(
            "running command command_id=%s type=%s",
            command.id,
            command.type,
            extra={"command_id": command.id},
        )
        yield _ack(command.id, AckStatus.ACCEPTED)
        yield _ack(command.id, AckStatus.RUNNING)
        context = CommandContext(
            runtime=self._runtime,
            recent_logs=self._recent_logs,
            now=self._now,
            _request_restart=self._request_restart,
            pool=self._pool,
            results=self._results,
        )
        final = await self._run(handler, command, context)
        yield final
        if final.status is AckStatus.SUCCEEDED:
            for action in context._after_ack:
                action()

    async def _run(
        self, handler: CommandHandler, command: CommandMessage, context: CommandContext
    ) -> AckMessage:
        with log_context(command_id=command.id):  # the handler's own log lines name it too
            return await self._run_handler(handler, command, context)

    async def _run_handler(
        self, handler: CommandHandler, command: CommandMessage, context: CommandContext
    ) -> AckMessage:
        try:
            result = await handler(command, context)
        except CommandFailed as exc:
            logger.warning(
                "command failed command_id=%s type=%s: %s", command.id, command.type, exc
            )
            return _ack(command.id, AckStatus.FAILED, str(exc))
        except Exception as exc:
            # A handler bug fails its command, not the agent: the operator sees it in the ack.
            logger.exception("command crashed command_id=%s type=%s", command.id, command.type)
            return _ack(command.id, AckStatus.FAILED, f"{type(exc).__name__}: {exc}")
        try:
            final = _ack(command.id, AckStatus.SUCCEEDED, result=result)
        except ValidationError as exc:
            logger.error("command %s returned a result acks cannot carry: %s", command.type, exc)
            return _ack(command.id, AckStatus.FAILED, f"handler returned an invalid result: {exc}")
        logger.info("command succeeded command_id=%s type=%s", command.id, command.type)
        return final

    def _reject(self, command: CommandMessage, reason: str) -> AckMessage:
        logger.warning(
            "rejected command command_id=%s type=%s: %s", command.id, command.type, reason
        )
        return _ack(command.id, AckStatus.REJECTED, reason)


def _ack(
    command_id: str,
    status: AckStatus,
    detail: str | None = None,
    *,
    result: CommandResult | None = None,
) -> AckMessage:
    if detail is not None and len(detail) > _MAX_DETAIL:
        detail = detail[: _MAX_DETAIL - 3] + "..."
    return AckMessage(command_id=command_id, status=status, detail=detail, result=result)


def _readable_id(payload: bytes) -> str | None:
    """The ``id`` of a payload that failed validation, if it is one an ack can name."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):  # a deeply nested payload overflows the parser
        return None
    if not isinstance(document, dict):
        return None
    command_id = document.get("id")
    if isinstance(command_id, str) and _ACKABLE_ID.fullmatch(command_id):
        return command_id
    return None


class _SeenCommands:
    """The ids of every command received, durable before the command runs.

    Calls come from worker threads (``asyncio.to_thread``), one at a time under a lock, since
    each insert waits for an fsync that must not stall the event loop.
    """

    def __init__(self, path: Path, now: datetime) -> None:
        self._path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise CorruptStateError(f"cannot open {path} ({exc}); check its permissions") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a command acknowledged as received survives a power cut, so it cannot run
            # twice after one.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS seen_commands ("
                " id TEXT PRIMARY KEY, type TEXT NOT NULL,"
                " received_at REAL NOT NULL, expires_at REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS seen_commands_expires ON seen_commands (expires_at)"
            )
            self._prune(now)
        except sqlite3.Error as exc:
            self._db.close()
            raise CorruptStateError(
                f"{path} is damaged ({exc}); delete it (and its -wal and -shm files) to start "
                "over, accepting that unexpired commands could then run a second time"
            ) from exc

    def record(self, command: CommandMessage, now: datetime) -> bool:
        """Remember ``command``'s id; False if it had been seen before."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT INTO seen_commands (id, type, received_at, expires_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (command.id, command.type, now.timestamp(), command.expires_at.timestamp()),
                )
                self._prune(now)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return cursor.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _prune(self, now: datetime) -> None:
        cutoff = (now - _SEEN_RETENTION).timestamp()
        self._db.execute("DELETE FROM seen_commands WHERE expires_at < ?", (cutoff,))


# --- the built-in commands ---------------------------------------------------------------------


class _NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _CollectLogsParams(BaseModel):
    # strict: `"lines": true` or `"lines": "20"` is an operator mistake worth failing on.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    lines: Annotated[int, Field(ge=1, le=_COLLECT_LOGS_MAX)] = _COLLECT_LOGS_DEFAULT


def _params(model: type[_P], command: CommandMessage) -> _P:
    """``command.params`` validated as ``model``; a :class:`CommandFailed` naming the problem."""
    try:
        return model.model_validate(command.params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'params'}: {error['msg']}"
            for error in exc.errors()
        )
        raise CommandFailed(f"invalid params for {command.type}: {problems}") from exc


async def _ping(command: CommandMessage, context: CommandContext) -> CommandResult:
    _params(_NoParams, command)
    return {"pong": True, "agent_version": device_agent.__version__}


async def _set_config(command: CommandMessage, context: CommandContext) -> CommandResult:
    config = _params(RuntimeConfig, command)
    if not config.model_fields_set:
        fields = ", ".join(RuntimeConfig.model_fields)
        raise CommandFailed(f"set-config needs at least one of: {fields}")
    return context.runtime.apply(config)


async def _collect_logs(command: CommandMessage, context: CommandContext) -> CommandResult:
    wanted = _params(_CollectLogsParams, command).lines
    lines = context.recent_logs()[-wanted:]
    kept = _tail_within(lines, COLLECT_LOGS_MAX_BYTES)
    return {"lines": "\n".join(kept), "count": len(kept), "truncated": len(kept) < len(lines)}


class _InferParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    # A prompt for a GGUF model, a JSON array (or {input name: array}) for a tensor model.
    input: Annotated[str, Field(min_length=1, max_length=_INFER_INPUT_MAX)]
    # What the result names as its input (a file the operator means, a ticket); the raw input
    # itself never leaves the device in a result.
    input_ref: Annotated[str, Field(min_length=1, max_length=500)] | None = None


async def _infer(command: CommandMessage, context: CommandContext) -> CommandResult:
    params = _params(_InferParams, command)
    pool, results = context.pool, context.results
    if pool is None or results is None:
        raise CommandFailed("this agent runs no models, so it cannot infer")
    try:
        result = await infer_text(
            pool,
            params.model,
            params.input,
            source=ResultSource.COMMAND,
            input_ref=params.input_ref or f"command:{command.id}",
        )
    except ModelNotLoadedError as exc:
        loaded = ", ".join(spec.name for spec in pool.specs()) or "none"
        raise CommandFailed(f"{exc} (loaded: {loaded}); deploy it first") from exc
    # Published either way: a failed inference counts in the model's error rate.
    await results(result)
    if result.error is not None:
        raise CommandFailed(f"inference with {params.model} failed: {result.error}")
    summary: CommandResult = {
        "model": result.model,
        "version": result.version,
        "release": result.release,
        "latency_ms": round(result.latency_ms, 3),
        "result_message_id": result.message_id,
    }
    for name in ("label", "confidence", "tokens", "tokens_per_s"):
        value = getattr(result, name)
        if value is not None:
            summary[name] = value
    if result.text is not None:
        summary["text"] = result.text[:_INFER_SUMMARY_TEXT]
    return summary


async def _restart_agent(command: CommandMessage, context: CommandContext) -> CommandResult:
    _params(_NoParams, command)
    context.request_restart()
    return {"restarting": True}


def _tail_within(lines: list[str], budget: int) -> list[str]:
    """The newest of ``lines`` that fit in ``budget`` bytes of JSON once joined by newlines."""
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        # Its size inside the ack's JSON string, escapes included; the 2 bytes of quotes that
        # json.dumps adds stand for the 2 of the escaped newline between lines.
        size = len(json.dumps(line, ensure_ascii=False).encode())
        if used + size > budget:
            if not kept:
                # One line alone is too long: keep its end, which is usually the error itself.
                # A character takes at most 6 bytes in JSON (a \uXXXX escape).
                kept.append(line[-(budget // 6) :])
            break
        kept.append(line)
        used += size
    kept.reverse()
    return kept


def builtin_registry() -> CommandRegistry:
    """A new registry holding ping, set-config, collect-logs, restart-agent and infer."""
    registry = CommandRegistry()
    registry.register("ping")(_ping)
    registry.register("set-config")(_set_config)
    registry.register("collect-logs")(_collect_logs)
    registry.register("restart-agent")(_restart_agent)
    registry.register("infer")(_infer)
    return registry
