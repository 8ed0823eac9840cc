"""Request ids and route ids on every log line a request causes.

:class:`RequestIdMiddleware` gives each HTTP request an id (the caller's ``X-Request-ID`` when it
is a sane token, else a new one), answers it in ``X-Request-ID`` and binds it for the logs;
:func:`bind_route_ids`, a dependency of every API route, adds the device, command, deployment
and release ids of the path (fleet_protocol/logs.py).
"""

from __future__ import annotations

import re
import uuid
from typing import Final

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet_protocol.logs import bind_log_context, log_context

__all__ = ["REQUEST_ID_HEADER", "RequestIdMiddleware", "bind_route_ids"]

REQUEST_ID_HEADER: Final = "X-Request-ID"
# A proxy's or client's id is kept only when it cannot forge log structure or grow without end.
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PATH_IDS: Final = ("device_id", "command_id", "deployment_id", "release_id")


class RequestIdMiddleware:
    """Pure ASGI, so streams pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"")
        text = given.decode("latin-1")
        request_id = text if _SANE_ID.match(text) else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)


async def bind_route_ids(request: Request) -> None:
    """Bind the path's ids for the rest of the request (async: it runs in the request's task,
    whose context the route, and a sync route's worker thread, inherit)."""
    params = request.path_params
    bind_log_context(**{name: str(params[name]) for name in _PATH_IDS if name in params})
