"""An in-process broadcast of device changes to the dashboard's event streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fleet_service.schemas import DevicePublic

__all__ = ["EventHub"]

logger = logging.getLogger(__name__)

# Per-subscriber buffer; a dashboard that falls this far behind misses intermediate states but
# still receives each device's next change, which carries the full current state.
SUBSCRIBER_BUFFER = 1000


class EventHub:
    """Fan-out of :class:`DevicePublic` updates; lives on the event loop, never blocks ingest."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[DevicePublic]] = set()

    def publish(self, device: DevicePublic) -> None:
        """Hand ``device`` to every subscriber, dropping it for one whose buffer is full."""
        for queue in self._subscribers:
            try:
                queue.put_nowait(device)
            except asyncio.QueueFull:
                logger.warning("event stream subscriber is behind; dropped update of %s", device.id)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[DevicePublic]]:
        """A queue receiving every update until the context exits."""
        queue: asyncio.Queue[DevicePublic] = asyncio.Queue(SUBSCRIBER_BUFFER)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscriber_count(self) -> int:
        """How many streams are open."""
        return len(self._subscribers)
