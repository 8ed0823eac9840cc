"""The simulated fleet's counters and its receipt-lag window, and a JSON snapshot of them.

Everything here is touched from the event loop only, so plain integers do.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SimStats"]


def _percentile(sorted_values: list[float], share: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(share * (len(sorted_values) - 1))))
    return sorted_values[index]


@dataclass
class SimStats:
    """What the fleet did so far; :meth:`snapshot` is the JSON-ready view."""

    devices: int
    lag_window_s: float
    enrolled_new: int = 0
    enrolled_reused: int = 0
    enroll_retries: int = 0
    connected: int = 0
    connects: int = 0
    connect_failures: int = 0
    connection_losses: int = 0
    # Messages the broker acknowledged (PUBACK), by topic kind.
    published: Counter[str] = field(default_factory=Counter)
    publish_failures: int = 0
    receipts: int = 0
    confirmed: int = 0
    commands: int = 0
    dropped: int = 0
    started: float = field(default_factory=time.monotonic)
    # (monotonic time, seconds from a telemetry message's timestamp to its receipt)
    _lags: deque[tuple[float, float]] = field(default_factory=deque, repr=False)
    # Devices that have held a session at least once (a reconnect storm's progress).
    ever_connected: set[str] = field(default_factory=set, repr=False)
    # Seconds from the start to the moment each count of devices first came online (the last
    # value is when all did).
    all_connected_after_s: float | None = None

    def connected_once(self, device_id: str) -> None:
        """Count a session that came up (its birth was acknowledged)."""
        self.connected += 1
        self.connects += 1
        self.ever_connected.add(device_id)
        if self.all_connected_after_s is None and len(self.ever_connected) == self.devices:
            self.all_connected_after_s = time.monotonic() - self.started

    def receipt_lag(self, lag_s: float) -> None:
        """Record one telemetry message's timestamp-to-receipt lag."""
        now = time.monotonic()
        self._lags.append((now, lag_s))
        horizon = now - self.lag_window_s
        while self._lags and self._lags[0][0] < horizon:
            self._lags.popleft()

    def lag_percentiles(self) -> tuple[float | None, float | None, int]:
        """p50 and p99 (seconds) of the receipt lags in the window, and how many there are."""
        horizon = time.monotonic() - self.lag_window_s
        values = sorted(lag for at, lag in self._lags if at >= horizon)
        return _percentile(values, 0.5), _percentile(values, 0.99), len(values)

    def snapshot(self) -> dict[str, Any]:
        """Every counter and the lag percentiles, JSON-ready."""
        p50, p99, samples = self.lag_percentiles()
        lags = [lag for _, lag in self._lags]
        return {
            "at": time.time(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "devices": self.devices,
            "enrolled_new": self.enrolled_new,
            "enrolled_reused": self.enrolled_reused,
            "enroll_retries": self.enroll_retries,
            "connected": self.connected,
            "ever_connected": len(self.ever_connected),
            "all_connected_after_s": self.all_connected_after_s,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "connection_losses": self.connection_losses,
            "published": dict(self.published),
            "published_total": sum(self.published.values()),
            "publish_failures": self.publish_failures,
            "receipts": self.receipts,
            "confirmed": self.confirmed,
            "commands": self.commands,
            "acks": self.published.get("acks", 0),
            "dropped": self.dropped,
            "receipt_lag_s": {
                "p50": p50,
                "p99": p99,
                "mean": statistics.fmean(lags) if lags else None,
                "samples": samples,
                "window_s": self.lag_window_s,
            },
        }

    def write(self, path: Path) -> None:
        """Write :meth:`snapshot` to ``path`` atomically (a reader never sees half of it)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        tmp.replace(path)
