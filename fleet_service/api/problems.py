"""Errors as RFC 9457 problem+json, one handler per kind of failure, and documented so.

Every error the service answers is ``application/problem+json``: its own errors
(:class:`~fleet_service.errors.ServiceError`), invalid requests (422), unknown routes and methods
(404/405, from Starlette), oversized bodies (413, from ``api.middleware``) and bugs (500, with no
stack trace: the log has it). The OpenAPI document says the same: :func:`install_problem_handlers`
adds to each operation the problem responses it can give, so clients and schemathesis see the
real contract.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fleet_service.errors import AuthenticationError, RateLimitedError, ServiceError

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "install_problem_handlers",
    "problem",
    "problem_responses",
]

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    """A problem+json response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if isinstance(exc, RateLimitedError):
        headers = {"Retry-After": str(exc.retry_after_s)}
        return problem(exc.status, exc.title, exc.detail, headers=headers)
    return problem(exc.status, exc.title, exc.detail)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    detail = f"{'.'.join(first['loc'])}: {first['msg']}"
    return problem(422, "invalid request", detail, errors=errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = str(exc.detail)
    if detail == phrase:  # Starlette's bare default: say what was asked and where to look
        detail = _default_detail(request, exc)
    # Starlette's own headers (Allow on a 405) are part of the answer.
    return problem(exc.status_code, phrase.lower(), detail, headers=exc.headers)


def _default_detail(request: Request, exc: HTTPException) -> str:
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return f"nothing at {request.url.path}; the API is described at /api/v1/openapi.json"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or "none"
        return f"{where} is not supported; this path allows: {allowed}"
    return f"{where}: {HTTPStatus(exc.status_code).description}"


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # The client learns only that it failed. The traceback goes to the log: Starlette raises
    # the error again once this answer is sent, and uvicorn logs it with its traceback.
    logger.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
    # Starlette answers a 500 outside every middleware, so the security headers that
    # api.middleware would add are taken from where it left them.
    headers: Mapping[str, str] = getattr(request.app.state, "error_headers", {})
    return problem(
        500,
        "internal server error",
        "the service failed to answer this request; the service log has the details",
        headers=headers,
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` a problem+json response, and document them in its OpenAPI."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(AuthenticationError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.openapi = _documented_openapi(app)  # type: ignore[method-assign]


# --- the OpenAPI side ---------------------------------------------------------------------

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An error, as RFC 9457 problem details.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {
            "description": "422 only: every invalid field",
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": "string"}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
        "reason": {"description": "a short stable label, where one exists", "type": "string"},
    },
}
_DESCRIPTIONS = {
    400: "The request contradicts itself or its body cannot be parsed",
    401: "No, expired, revoked or unknown credentials",
    403: "The caller's role or tag scope does not cover this action",
    404: "No such object (objects outside a caller's tag scope are absent to it)",
    405: "The path does not support this method",
    409: "The action clashes with the object's current state",
    413: "The request body is larger than the service accepts",
    416: "The range starts past the end",
    422: "A parameter or the body is invalid; `errors` lists each problem",
    429: "Too many attempts from this address or for this user; retry after Retry-After",
    500: "The service failed; its log has the details",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "Always `Bearer`",
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "Seconds until another attempt can succeed",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
}
_WRITES = frozenset({"post", "put", "patch", "delete"})


def _problem_response(status: int, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or _DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
        "content": {PROBLEM_MEDIA_TYPE: {"schema": dict(_PROBLEM_REF)}},
    }
    if status in _HEADERS:
        response["headers"] = dict(_HEADERS[status])
    return response


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route decorator: these statuses answer with problem+json.

    Only statuses the generic rules of :func:`install_problem_handlers` cannot know need this
    (e.g. 409 or 429 on a route that is not a write or takes no credentials).
    """
    return {status: _problem_response(status) for status in statuses}


def _statuses_of(path: str, method: str, operation: Mapping[str, Any]) -> set[int]:
    """The problem statuses an operation can answer, from what it takes and who may call it."""
    statuses: set[int] = set()
    secured = bool(operation.get("security"))
    has_body = "requestBody" in operation
    if secured:
        statuses |= {401, 403}
    if "{" in path:
        statuses.add(404)
    if has_body or operation.get("parameters"):
        statuses |= {400, 422}
    if has_body:
        statuses.add(413)
    if method in _WRITES and secured:
        statuses.add(409)
        if has_body:  # the body can name another object: a release, a device, a tag
            statuses.add(404)
    if has_body and not secured:
        # Anonymous routes that take a body take credentials (login, refresh, enrollment):
        # wrong ones are a 401, and guessing is rate limited per address and per user.
        statuses |= {401, 429}
    return statuses


def _document(schema: dict[str, Any]) -> None:
    """Give every operation its problem responses, all as problem+json with the Problem schema."""
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for status in _statuses_of(path, method, operation):
                responses.setdefault(str(status), {})
            for key, response in list(responses.items()):
                if key.isdigit() and int(key) >= 400:
                    described = response.get("description")
                    if described == "Validation Error":  # FastAPI's default, for its own shape
                        described = None
                    responses[key] = _problem_response(int(key), described)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = _PROBLEM_SCHEMA
    # FastAPI's own 422 shapes are never sent: the problem handler above answers instead.
    text = json.dumps(schema)
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"#/components/schemas/{unused}"' not in text:
            components.pop(unused, None)


def _documented_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document(generate())
        assert app.openapi_schema is not None
        return app.openapi_schema

    return openapi
