"""Reconnect pacing: capped exponential backoff with full jitter, and an interruptible sleep."""

from __future__ import annotations

import asyncio
import contextlib
import random

__all__ = ["Backoff", "sleep_unless_set"]


class Backoff:
    """Capped exponential backoff with full jitter (each delay uniform in ``[0, ceiling]``).

    The ceiling doubles per failed attempt from ``min_s`` up to ``max_s``. Full jitter spreads a
    fleet's reconnects out after a broker restart instead of having every device retry at once.
    """

    def __init__(self, min_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got min_s={min_s} max_s={max_s}")
        self._min_s = min_s
        self._max_s = max_s
        # Jitter needs no cryptographic randomness.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Failed attempts since the last :meth:`reset`."""
        return self._attempt

    def ceiling(self, attempt: int) -> float:
        """The largest delay for the ``attempt``-th retry (counting from 0)."""
        # Exponent clamped so that a device that was offline for weeks cannot overflow a float.
        return min(self._max_s, self._min_s * 2.0 ** min(attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failed attempt."""
        delay = self._rng.uniform(0, self.ceiling(self._attempt))
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """Start over from ``min_s``, after a connection proved stable."""
        self._attempt = 0


async def sleep_unless_set(event: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``event`` is set, whichever comes first; whether set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, delay)):
            await event.wait()
    return event.is_set()
