"""One named background task for the length of a context: how the service's loops run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

__all__ = ["background_task"]


@asynccontextmanager
async def background_task(
    name: str, loop: Callable[[], Coroutine[Any, Any, None]]
) -> AsyncIterator[None]:
    """Run ``loop()`` as the task ``name`` until the context exits, then cancel it; an error
    that escapes the loop ends the context with it (the loops catch what they can retry)."""
    async with asyncio.TaskGroup() as group:
        task = group.create_task(loop(), name=name)
        try:
            yield
        finally:
            task.cancel()
