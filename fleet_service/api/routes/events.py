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
    """Change events: ``device`` (DevicePublic), ``command`` (CommandPublic), ``log``
    (LogRecordPublic), ``result`` (ResultPublic), ``deployment`` (DeploymentPublic), each with
    the full object as JSON."""

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async with context.hub.subscribe() as queue:
            while True:
                name, payload = await queue.get()
                yield ServerSentEvent(data=payload.model_dump_json(), event=name)

    return EventSourceResponse(stream(), ping=int(context.settings.sse_keepalive_s))
