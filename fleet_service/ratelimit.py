"""Rate limits on credential guessing (login, enrollment), with the ``limits`` library.

Counters live in this process's memory: each replica limits on its own, so N replicas allow N
times the rate. That still turns a brute force of a 32-byte secret or an argon2 hash into a
hopeless one; a shared store (``limits`` supports Redis) is the upgrade if that ever matters.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from fleet_service.errors import RateLimitedError

__all__ = ["RateLimiter"]


class RateLimiter:
    """Named limits ("login-user": "10/minute") checked per key (a username, an address)."""

    def __init__(self, rules: dict[str, str]) -> None:
        self._items: dict[str, RateLimitItem] = {name: parse(rule) for name, rule in rules.items()}
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, rule: str, key: str, *, what: str) -> None:
        """Count one attempt; raise :class:`RateLimitedError` once ``key`` is over ``rule``.

        ``what`` names the attempt in the error ("login attempts for 'alice'").
        """
        item = self._items[rule]
        if self._limiter.hit(item, rule, key):
            return
        reset_at, _ = self._limiter.get_window_stats(item, rule, key)
        retry_after_s = max(1, math.ceil(reset_at - time.time()))
        raise RateLimitedError(
            f"too many {what}: the limit is {item}; try again in {retry_after_s} s",
            retry_after_s=retry_after_s,
        )

    def reset(self) -> None:
        """Forget every count (a test's fresh start)."""
        self._limiter.storage.reset()
