"""How both sides log: one JSON object a line (or ``key=value`` text on a terminal), carrying the
ids of what the line is about.

Shared by the service and the agent so one log shipper (Loki, Vector, journald + jq) reads both.
The ids come from :func:`log_context`, bound around a request, a command or a deployment step,
and from ``extra=`` on a single call; only those that are set appear on a line:

    device_id, command_id, deployment_id, release_id, request_id

JSON lines are written by ``python-json-logger``; ``auto`` picks text when the stream is a
terminal and JSON otherwise (a service manager, a container, a file).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import IO, Any, Literal

from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "CONTEXT_FIELDS",
    "LogFormat",
    "bind_log_context",
    "configure_logging",
    "current_context",
    "log_context",
    "log_handler",
]

LogFormat = Literal["auto", "json", "text"]
CONTEXT_FIELDS = ("device_id", "command_id", "deployment_id", "release_id", "request_id")

# Immutable: each binding sets a new mapping, so tasks never see each other's ids.
_context: ContextVar[Mapping[str, str]] = ContextVar(
    "edgefleet_log_context", default=MappingProxyType({})
)


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Every line logged inside (in this task, and threads it starts with its context) carries
    ``ids``; ``None`` values are left out."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**ids: str | None) -> None:
    """Like :func:`log_context` for the rest of the current task (a request's dependency)."""
    _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})


def current_context() -> dict[str, str]:
    """The ids bound here now."""
    return dict(_context.get())


class _ContextFilter(logging.Filter):
    """Copies the bound ids (and ``defaults``, e.g. the agent's device id) onto each record,
    without overriding ids given with ``extra=``."""

    def __init__(self, defaults: dict[str, str]) -> None:
        super().__init__()
        self._defaults = defaults

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in {**self._defaults, **_context.get()}.items():
            record.__dict__.setdefault(name, value)
        return True


class _TextFormatter(logging.Formatter):
    """``time level=... logger=... message id=...``: greppable, and readable on a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{name}={record.__dict__[name]}"
            for name in CONTEXT_FIELDS
            if record.__dict__.get(name) is not None
        ]
        if not ids:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the ids
        return f"{head} {' '.join(ids)}{newline}{rest}"


def _json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",  # ISO 8601, UTC
    )


def _chosen(log_format: LogFormat, stream: IO[str]) -> Literal["json", "text"]:
    if log_format != "auto":
        return log_format
    isatty: Any = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def log_handler(
    log_format: LogFormat = "auto",
    *,
    stream: IO[str] | None = None,
    defaults: dict[str, str] | None = None,
) -> logging.Handler:
    """A handler writing to ``stream`` (stderr) in ``log_format``, adding the bound ids and
    ``defaults`` (ids every line of this process carries) to each record."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ContextFilter(defaults or {}))
    chosen = _chosen(log_format, handler.stream)
    handler.setFormatter(_json_formatter() if chosen == "json" else _TextFormatter())
    return handler


def configure_logging(
    level: str, log_format: LogFormat = "auto", *, defaults: dict[str, str] | None = None
) -> None:
    """The process's logging: :func:`log_handler` on stderr at ``level``.

    No ``force=True``: an embedding process (or pytest) that configured logging keeps its setup.
    """
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format, defaults=defaults)])
