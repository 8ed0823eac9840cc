"""Inputs pushed to the local API (``POST /v1/push/{model}``) for a model's ``http`` schedule."""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from device_agent.inference.errors import InboxFullError

__all__ = ["PushInbox", "PushedInput"]


@dataclass(frozen=True)
class PushedInput:
    """One pushed input; ``id`` is its result's ``input_ref``."""

    id: str
    text: str
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class PushInbox:
    """Bounded per-model queues of pushed inputs; the schedule drains them on each run."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"a push inbox needs a depth of at least 1, got {depth}")
        self._depth = depth
        self._queues: dict[str, deque[PushedInput]] = {}

    @property
    def depth(self) -> int:
        """How many inputs may wait per model."""
        return self._depth

    def push(self, model: str, text: str) -> PushedInput:
        """Queue ``text`` for ``model``; InboxFullError past the depth."""
        queue = self._queues.setdefault(model, deque())
        if len(queue) >= self._depth:
            raise InboxFullError(model, self._depth)
        pushed = PushedInput(id=f"push-{uuid.uuid4().hex}", text=text)
        queue.append(pushed)
        return pushed

    def drain(self, model: str) -> list[PushedInput]:
        """Every input waiting for ``model``, oldest first; the inbox is empty after."""
        queue = self._queues.pop(model, None)
        return list(queue) if queue else []

    def pending(self, model: str) -> int:
        """How many inputs wait for ``model``."""
        return len(self._queues.get(model, ()))
