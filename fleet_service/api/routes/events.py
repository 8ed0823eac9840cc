"""Server-sent events: device changes pushed to the dashboard as they are committed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from sse_starlette import EventSourceResponse, ServerSentEvent

from fleet_service.api.deps import ContextDep, OperatorDep

__all__ = ["router"]

router = APIRouter(tags=["events"])


@router.get("/events", response_class=EventSourceResponse)
async def events(context: ContextDep, _operator: OperatorDep) -> EventSourceResponse:
    """``event: device`` with a DevicePublic JSON body on every status or telemetry change."""

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async with context.hub.subscribe() as queue:
            while True:
                device = await queue.get()
                yield ServerSentEvent(data=device.model_dump_json(), event="device")

    return EventSourceResponse(stream(), ping=int(context.settings.sse_keepalive_s))
