"""Forward the agent's own log records to the service on ``logs``, through the outbox.

:class:`LogForwarder` is a :class:`logging.Handler` on the root logger. ``emit`` never blocks and
never touches the disk: it turns a record at or above the runtime ``log_forward_level`` into a
:class:`LogMessage` and queues it for the agent's ``log-forwarder`` loop (:meth:`forward`), which
stores batches in the outbox. Two kinds of records are never forwarded:

- MQTT client internals (paho, aiomqtt) and the agent's delivery records
  (:data:`DELIVERY_LOGGER_NAME`: the pump, receipts): forwarding records about moving messages
  would make each delivery produce a message to deliver, forever;
- records logged while forwarding (the outbox warning it is full, say), which would otherwise
  feed themselves forever.

It also keeps the last few hundred formatted lines (MQTT client internals aside) of every level
for the ``collect-logs`` command.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from device_agent.connection import PAHO_LOGGER_NAME
from device_agent.runtime import RuntimeState
from fleet_protocol import LogLevel, LogMessage

__all__ = ["DELIVERY_LOGGER_NAME", "LogForwarder"]

logger = logging.getLogger(__name__)

# The limits of LogMessage's fields (fleet_protocol.messages), in characters.
_MAX_MESSAGE_CHARS = 8000
_MAX_LOGGER_CHARS = 200
# What a truncated message says where its middle was cut out. Head and tail both survive: the
# head says what happened, a traceback's tail says where.
_ELLIPSIS = "\n[... truncated ...]\n"

# Records waiting for the forwarder loop. A burst beyond this (an error repeating in a tight
# loop) is dropped and counted rather than growing the agent's memory without bound.
DEFAULT_QUEUE_MAX = 1000
# Lines kept for the ``collect-logs`` command: enough to see what led to a problem.
DEFAULT_RECENT_MAX = 300
# Records stored per outbox transaction, so a burst costs one fsync instead of hundreds.
_BATCH_MAX = 100

# The logger of the outbox pump and of receipts; its records stay on the device (see above).
DELIVERY_LOGGER_NAME = "device_agent.delivery"

# The MQTT client's loggers, under whichever name it logs: neither forwarded nor kept for
# collect-logs, where its per-packet DEBUG lines would crowd out everything else.
_MQTT_PREFIXES = (PAHO_LOGGER_NAME, "paho", "mqtt", "aiomqtt")

# True in the forwarder's own task (and the threads it starts): what is logged there stays local.
_forwarding: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "edgefleet_log_forwarding", default=False
)

_LEVELS = (
    (logging.CRITICAL, LogLevel.CRITICAL),
    (logging.ERROR, LogLevel.ERROR),
    (logging.WARNING, LogLevel.WARNING),
    (logging.INFO, LogLevel.INFO),
)


class LogForwarder(logging.Handler):
    """Queues records for the service and remembers recent lines; create it on the event loop."""

    def __init__(
        self,
        runtime: RuntimeState,
        *,
        queue_max: int = DEFAULT_QUEUE_MAX,
        recent_max: int = DEFAULT_RECENT_MAX,
    ) -> None:
        super().__init__()
        self.setFormatter(
            logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
        )
        self._runtime = runtime
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue: asyncio.Queue[LogMessage] = asyncio.Queue(maxsize=queue_max)
        self._recent: collections.deque[str] = collections.deque(maxlen=recent_max)
        self._in_emit = threading.local()  # guards against a record logged by emit itself
        self._dropped = 0

    @property
    def dropped(self) -> int:
        """Records not forwarded because the queue was full."""
        return self._dropped

    def recent(self) -> list[str]:
        """The last lines the agent logged, oldest first, at every level it logs."""
        # The handler's own lock: logging holds it around every emit, whichever thread logs.
        self.acquire()
        try:
            return list(self._recent)
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        """Remember ``record`` and queue it for the service if it qualifies; never blocks."""
        if getattr(self._in_emit, "active", False):
            return
        self._in_emit.active = True
        try:
            if record.name.startswith(_MQTT_PREFIXES):
                return
            self._recent.append(self.format(record))
            if (
                record.name.startswith(DELIVERY_LOGGER_NAME)
                or _forwarding.get()
                or record.levelno < self._forward_level()
            ):
                return
            message = self._to_message(record)
            if threading.get_ident() == self._loop_thread:
                self._enqueue(message)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to forward
                    self._loop.call_soon_threadsafe(self._enqueue, message)
        except Exception:
            # As every logging handler does: a failure to forward must not become an error in
            # whatever code happened to log; logging prints it to stderr instead.
            self.handleError(record)
        finally:
            self._in_emit.active = False

    async def forward(self, store: Callable[[list[LogMessage]], Awaitable[None]]) -> None:
        """Hand queued messages to ``store`` in batches, forever (the ``log-forwarder`` loop)."""
        _forwarding.set(True)  # this task's own context: its records and its threads' stay local
        reported = 0
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if self._dropped > reported:
                logger.warning(
                    "dropped %d log records not forwarded in time (queue of %d full)",
                    self._dropped - reported,
                    self._queue.maxsize,
                )
                reported = self._dropped
            await store(batch)

    def _forward_level(self) -> int:
        # Read per record: desired state and `set-config` change it while the agent runs.
        return logging.getLevelNamesMapping().get(self._runtime.log_forward_level, logging.WARNING)

    def _enqueue(self, message: LogMessage) -> None:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._dropped += 1

    def _to_message(self, record: logging.LogRecord) -> LogMessage:
        text = record.getMessage()
        if record.exc_info:
            formatter = self.formatter or logging.Formatter()
            text = f"{text}\n{formatter.formatException(record.exc_info)}"
        if record.stack_info:
            text = f"{text}\n{record.stack_info}"
        return LogMessage(
            timestamp=datetime.fromtimestamp(record.created, UTC),
            level=_level(record.levelno),
            logger=record.name[:_MAX_LOGGER_CHARS],
            message=_truncate(text, _MAX_MESSAGE_CHARS),
        )


def _level(levelno: int) -> LogLevel:
    for threshold, level in _LEVELS:
        if levelno >= threshold:
            return level
    return LogLevel.DEBUG


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = limit - len(_ELLIPSIS)
    head = keep // 2
    return text[:head] + _ELLIPSIS + text[len(text) - (keep - head) :]
