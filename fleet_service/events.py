"""An in-process broadcast of changes (devices, commands, logs) to the dashboard's streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import BaseModel

__all__ = ["Event", "EventHub"]

logger = logging.getLogger(__name__)

# Per-subscriber buffer; a dashboard that falls this far behind misses intermediate states but
# still receives each device's next change, which carries the full current state.
SUBSCRIBER_BUFFER = 1000

# (event name, payload): "device" DevicePublic, "command" CommandPublic, "log" LogRecordPublic,
# "result" ResultPublic, "deployment" DeploymentPublic.
Event = tuple[str, BaseModel]


class EventHub:
    """Fan-out of change events; lives on the event loop, never blocks ingest."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def publish(self, name: str, payload: BaseModel) -> None:
        """Hand the event to every subscriber, dropping it for one whose buffer is full."""
        for queue in self._subscribers:
            try:
                queue.put_nowait((name, payload))
            except asyncio.QueueFull:
                logger.warning("event stream subscriber is behind; dropped a %s event", name)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event]]:
        """A queue receiving every event until the context exits."""
        queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_BUFFER)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscriber_count(self) -> int:
        """How many streams are open."""
        return len(self._subscribers)
