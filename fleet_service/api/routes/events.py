"""Server-sent events: device changes pushed to the dashboard as they are committed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from fleet_service.api.deps import ContextDep, ViewerDep, client_address
from fleet_service.errors import ForbiddenError, ServiceError
from fleet_service.principals import resolve_bearer

__all__ = ["router"]

router = APIRouter(tags=["events"])


@router.get("/events", response_class=EventSourceResponse)
async def events(request: Request, context: ContextDep, viewer: ViewerDep) -> EventSourceResponse:
    """Change events: ``device`` (DevicePublic), ``command`` (CommandPublic), ``log``
    (LogRecordPublic), ``result`` (ResultPublic), ``deployment`` (DeploymentPublic), each with
    the full object as JSON. The stream covers the whole fleet, so a tag-scoped token gets 403."""
    if viewer.tag is not None:
        key, value = viewer.tag
        raise ForbiddenError(
            f"{viewer.name} is limited to devices tagged {key}={value}, and the event stream "
            "covers the whole fleet: poll the device, command and result lists instead"
        )

    credential = (request.headers.get("authorization") or "").partition(" ")[2]
    address = client_address(request)
    recheck_s = context.settings.sse_keepalive_s

    def still_allowed() -> bool:
        try:
            resolve_bearer(context.engine, context.tokens, credential, address)
        except ServiceError:
            return False
        return True

    async def stream() -> AsyncIterator[ServerSentEvent]:
        # One request, but it may last hours: before passing an event on, the credential is
        # checked again if the last check is older than the keepalive interval, so after logout,
        # disabling, revocation or expiry nothing more is sent and the stream ends (the
        # dashboard reconnects with its renewed token).
        checked = time.monotonic()
        async with context.hub.subscribe() as queue:
            while True:
                name, payload = await queue.get()
                if time.monotonic() - checked >= recheck_s:
                    if not await asyncio.to_thread(still_allowed):
                        return
                    checked = time.monotonic()
                yield ServerSentEvent(data=payload.model_dump_json(), event=name)

    return EventSourceResponse(stream(), ping=int(recheck_s))
