"""One simulated device's outbox, in memory: send in order, resend until receipted.

The agent's outbox (device_agent/outbox.py) is SQLite on disk, which ten thousand devices in one
process cannot each keep open. This one follows the same contract: a message stays until the
service's receipt names it, is due again ``resend_after_s`` after its PUBACK, and past the bound
the oldest telemetry is dropped first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fleet_protocol import DeviceMessage, TopicKind

__all__ = ["MemoryOutbox", "OutboxEntry"]


@dataclass(slots=True)
class OutboxEntry:
    """One message waiting for its receipt."""

    kind: TopicKind
    message: DeviceMessage
    model: str | None = None
    retain: bool = False
    # Monotonic time of its last PUBACK; None while it waits to be (re)sent.
    sent_at: float | None = None


class MemoryOutbox:
    """Messages by id in the order they were put; see the module docstring."""

    def __init__(self, max_messages: int) -> None:
        self._max = max_messages
        self._entries: dict[str, OutboxEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: OutboxEntry) -> int:
        """Add ``entry``; returns how many older entries were dropped to make room."""
        dropped = 0
        while len(self._entries) >= self._max:
            victim = next(
                (mid for mid, e in self._entries.items() if e.kind is TopicKind.TELEMETRY),
                next(iter(self._entries)),
            )
            del self._entries[victim]
            dropped += 1
        self._entries[entry.message.message_id] = entry
        return dropped

    def due(self, limit: int, *, now: float, resend_after_s: float) -> list[OutboxEntry]:
        """Up to ``limit`` entries to publish now, oldest first."""
        due: list[OutboxEntry] = []
        for entry in self._entries.values():
            if entry.sent_at is None or now - entry.sent_at >= resend_after_s:
                due.append(entry)
                if len(due) == limit:
                    break
        return due

    def next_due_at(self, resend_after_s: float) -> float | None:
        """When the earliest sent entry becomes due again; None if none is waiting so."""
        times = [e.sent_at for e in self._entries.values() if e.sent_at is not None]
        return min(times) + resend_after_s if times else None

    def confirm(self, message_ids: Iterable[str]) -> list[OutboxEntry]:
        """Remove the entries a receipt names; returns those that were waiting."""
        confirmed = []
        for message_id in message_ids:
            entry = self._entries.pop(message_id, None)
            if entry is not None:
                confirmed.append(entry)
        return confirmed
