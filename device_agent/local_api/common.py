"""What the local API's routes share: their context, errors in two shapes, bodies, results."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from device_agent.config import LocalApiSettings
from device_agent.inference import (
    InboxFullError,
    InferenceError,
    InferenceFailure,
    InferenceOutput,
    InferenceTimeoutError,
    InvalidInputError,
    ModelNotLoadedError,
    ModelPool,
    ModelSpec,
    PushInbox,
    QueueFullError,
    ResultSink,
    WorkerCrashedError,
    failed_result,
    result_message,
)
from device_agent.metrics import AgentMetrics
from fleet_protocol import ResultSource

__all__ = [
    "ApiContext",
    "ApiError",
    "ErrorStyle",
    "OrjsonResponse",
    "Stopwatch",
    "dump_json",
    "error_from_failure",
    "error_response",
    "new_request_id",
    "parse_body",
    "parse_json",
    "read_body",
    "read_json",
    "report_failure",
    "report_result",
]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# A client told to retry after a 429 (queue or inbox full) waits this long: one inference of a
# small model, about.
_RETRY_AFTER_S = 1


class ErrorStyle(StrEnum):
    """How an error body looks: OpenAI's ``{"error": {...}}`` or KServe v2's ``{"error": str}``."""

    OPENAI = "openai"
    KSERVE = "kserve"


@dataclass(frozen=True)
class ApiContext:
    """Everything a route needs: the models, the push inbox, where results go, the settings."""

    pool: ModelPool
    inbox: PushInbox
    sink: ResultSink
    settings: LocalApiSettings
    metrics: AgentMetrics | None = None  # GET /metrics, when the agent gives them


class ApiError(Exception):
    """A request the API answers with an error status; rendered in the route's style."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param


def error_response(error: ApiError, style: ErrorStyle) -> JSONResponse:
    """The error as JSON in ``style``; 429s and 503s say when to retry."""
    headers = {"Retry-After": str(_RETRY_AFTER_S)} if error.status in (429, 503) else None
    if style is ErrorStyle.KSERVE:
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)
    body = {
        "error": {
            "message": error.message,
            "type": error.kind,
            "param": error.param,
            "code": error.code,
        }
    }
    return JSONResponse(body, status_code=error.status, headers=headers)


def error_from_failure(exc: InferenceFailure) -> ApiError:
    """The HTTP status and OpenAI error type for an inference failure."""
    message = str(exc)
    if isinstance(exc, ModelNotLoadedError):
        return ApiError(404, message, code="model_not_found", param="model")
    if isinstance(exc, InvalidInputError):
        return ApiError(400, message)
    if isinstance(exc, QueueFullError | InboxFullError):
        return ApiError(429, message, kind="rate_limit_error", code="queue_full")
    if isinstance(exc, WorkerCrashedError):
        return ApiError(503, message, kind="server_error", code="worker_crashed")
    if isinstance(exc, InferenceTimeoutError):
        return ApiError(504, message, kind="server_error", code="timeout")
    if isinstance(exc, InferenceError):
        return ApiError(500, message, kind="server_error", code="inference_failed")
    return ApiError(500, message, kind="server_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON; 400 if it is not."""
    return parse_json(await read_body(request, limit))


def parse_json(data: bytes | memoryview) -> Any:
    """``data`` parsed as JSON (RFC 8259: no NaN or Infinity); 400 if it is not.

    orjson, not the stdlib: a KServe v2 tensor is a list of up to millions of numbers, which
    orjson reads several times faster.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc


def dump_json(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON; numpy arrays as lists, without a ``tolist()`` copy.

    Like JSONResponse's, except that a NaN becomes null (orjson's rule) rather than a 500.
    """
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class OrjsonResponse(JSONResponse):
    """A JSONResponse written by :func:`dump_json`: several times faster on big arrays."""

    def render(self, content: Any) -> bytes:
        return dump_json(content)


def parse_body(model: type[M], data: Any) -> M:
    """``data`` validated as ``model``; 400 naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from exc


def new_request_id(prefix: str) -> str:
    """A unique id for a request; its results' ``input_ref``."""
    return f"{prefix}-{uuid.uuid4().hex}"


class Stopwatch:
    """Milliseconds since it was made, for failed results' latency."""

    def __init__(self) -> None:
        self._started = time.perf_counter()

    @property
    def ms(self) -> float:
        """Elapsed milliseconds."""
        return (time.perf_counter() - self._started) * 1000


async def report_result(
    context: ApiContext, spec: ModelSpec, output: InferenceOutput, request_id: str
) -> None:
    """Send a served inference to the results stream (the request id stands for the input)."""
    await context.sink(result_message(spec, output, source=ResultSource.API, input_ref=request_id))


async def report_failure(
    context: ApiContext,
    spec: ModelSpec | None,
    exc: InferenceFailure,
    request_id: str,
    latency_ms: float,
) -> None:
    """Send a failed inference to the results stream, unless the model is not there at all."""
    if spec is None or isinstance(exc, ModelNotLoadedError | InvalidInputError | QueueFullError):
        # Not the model's doing: a caller's typo, bad input or flood must not count against
        # the model's error rate (a canary gate reads it).
        return
    await context.sink(
        failed_result(
            spec, str(exc), source=ResultSource.API, input_ref=request_id, latency_ms=latency_ms
        )
    )
