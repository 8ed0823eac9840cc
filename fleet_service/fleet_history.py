"""The fleet page's history: this process's own Prometheus series, sampled into a 24 h ring.

Not every owner runs Prometheus and Grafana, so the service keeps the headline series of the
Grafana fleet overview (deploy/grafana/dashboards/fleet-overview.json) itself. Every
``interval_s`` :class:`FleetHistory` collects the app's registry (the ingest counters, the HTTP
histogram and the fleet-state gauges read from the database) and turns two consecutive samples
into one :class:`Point`: messages received per second by kind, rejections per second by reason,
ingest commit latency p50/p99 and HTTP p95 by route over that interval, and the gauges. Only
points are kept, not the cumulative samples (whose HTTP histogram alone is 14 buckets a route).

The history is per process and starts empty at every start: counters of a replica are its own
(the Grafana board sums them over instances), while the database gauges are the same everywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from fleet_service.background import background_task

__all__ = [
    "HISTORY_S",
    "MAX_ANSWER_POINTS",
    "FleetHistory",
    "FleetOverview",
    "FleetSeries",
    "Point",
    "Snapshot",
    "histogram_quantile",
    "read_snapshot",
]

logger = logging.getLogger(__name__)

# What the fleet page can look back on, and what GET /fleet/overview?minutes= allows.
HISTORY_S = 24 * 3600
# The ring never holds more than this many points, whatever the interval: 24 h at 10 s. A
# shorter interval (tests use 0.5 s) keeps correspondingly less than 24 h. At the default 15 s
# it is 5 760 points, about 15 MB with twenty routes busy in every interval (measured).
MAX_POINTS_KEPT = 8_640
# One answer carries about this many points at most (two per pixel of a wide chart); longer
# ranges merge neighbouring points, so 24 h at 15 s is 2-minute points of a few hundred KB.
MAX_ANSWER_POINTS = 720
# The event stream's "duration" is how long a browser stayed connected, not a latency; the
# Grafana board leaves it out of HTTP p95 for the same reason.
_NOT_LATENCY_ROUTES = frozenset({"/api/v1/events"})
# Always charted, so an empty fleet still shows its (zero) lines.
_DEVICE_STATUSES = ("online", "offline", "unknown")

_RECEIVED = "edgefleet_ingest_received_total"
_REJECTED = "edgefleet_ingest_rejected_total"
_COMMIT_BUCKET = "edgefleet_ingest_commit_seconds_bucket"
_HTTP_BUCKET = "edgefleet_http_request_duration_seconds_bucket"
_STATE_UP = "edgefleet_fleet_state_up"
_GAUGES = {
    "edgefleet_devices": "status",
    "edgefleet_commands": "status",
    "edgefleet_deployments": "state",
}

# A histogram: (upper bound, cumulative count) by ascending bound, +Inf last.
Buckets = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Snapshot:
    """The cumulative series of one collection. ``fleet`` is None when the database did not
    answer (the gauges are then missing from the registry's answer)."""

    at: float  # wall clock, unix seconds: where the point goes on the chart
    monotonic: float  # for the interval's length, immune to clock steps
    received: Mapping[str, float]  # by kind
    rejected: Mapping[str, float]  # by reason, summed over kinds
    commit: Buckets
    http: Mapping[str, Buckets]  # by route template, summed over methods and statuses
    fleet: Mapping[str, Mapping[str, float]] | None  # gauge name -> label value -> count


@dataclass(frozen=True)
class Point:
    """What happened between two snapshots. Counts of zero are left out of ``received`` and
    ``rejected``; a quantile is None when nothing was observed in the interval."""

    at: float
    seconds: float
    received: Mapping[str, float]  # messages in the interval, by kind
    rejected: Mapping[str, float]  # by reason
    commit_p50: float | None
    commit_p99: float | None
    http_p95: Mapping[str, float]  # by route, only routes that answered in the interval
    fleet: Mapping[str, Mapping[str, float]] | None


class FleetSeries(BaseModel):
    """One line of a chart: its name (a kind, reason, route, status or quantile) and one value
    per timestamp, null where there is nothing to say (no batch committed, no request)."""

    model_config = ConfigDict(frozen=True)

    name: str
    values: list[float | None]


class FleetOverview(BaseModel):
    """The fleet page's charts over the last ``minutes``: one timestamp per point, and for each
    chart its named series with one value per timestamp."""

    model_config = ConfigDict(frozen=True)

    minutes: int
    interval_s: float = Field(description="seconds between the samples the points come from")
    point_s: float = Field(description="seconds one point covers once long ranges are merged")
    timestamps: list[float] = Field(description="end of each point, unix seconds (UTC)")
    devices: list[FleetSeries] = Field(description="enrolled, not revoked devices by status")
    ingested: list[FleetSeries] = Field(description="messages received per second, by kind")
    rejected: list[FleetSeries] = Field(description="messages dropped per second, by reason")
    commit_latency: list[FleetSeries] = Field(description="ingest commit seconds: p50, p99")
    http_p95: list[FleetSeries] = Field(description="HTTP p95 seconds by route template")
    commands: list[FleetSeries] = Field(description="commands by status")
    deployments: list[FleetSeries] = Field(description="deployments by state")


def read_snapshot(registry: CollectorRegistry) -> Snapshot:
    """Collect ``registry`` once (blocking: the fleet-state collector queries the database)."""
    received: dict[str, float] = {}
    rejected: dict[str, float] = {}
    commit: dict[float, float] = {}
    http: dict[str, dict[float, float]] = {}
    gauges: dict[str, dict[str, float]] = {name: {} for name in _GAUGES}
    state_up = False
    for family in registry.collect():
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if sample.name == _RECEIVED:
                _add(received, labels["kind"], value)
            elif sample.name == _REJECTED:
                _add(rejected, labels["reason"], value)
            elif sample.name == _COMMIT_BUCKET:
                _add(commit, float(labels["le"]), value)
            elif sample.name == _HTTP_BUCKET:
                _add(http.setdefault(labels["route"], {}), float(labels["le"]), value)
            elif sample.name == _STATE_UP:
                state_up = value == 1
            elif sample.name in _GAUGES:
                _add(gauges[sample.name], labels[_GAUGES[sample.name]], value)
    return Snapshot(
        at=time.time(),
        monotonic=time.monotonic(),
        received=received,
        rejected=rejected,
        commit=_sorted(commit),
        http={route: _sorted(buckets) for route, buckets in http.items()},
        fleet=gauges if state_up else None,
    )


_K = TypeVar("_K", str, float)


def _add(into: dict[_K, float], key: _K, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


def _sorted(buckets: Mapping[float, float]) -> Buckets:
    return tuple(sorted(buckets.items()))


def _increase(current: float, previous: float) -> float:
    # A counter below its last value was reset (it cannot be in one process, but a registry
    # could be swapped): count from zero, as Prometheus' rate() does.
    return current - previous if current >= previous else current


def _bucket_increase(current: Buckets, previous: Buckets) -> Buckets:
    before = dict(previous)
    return tuple((bound, _increase(count, before.get(bound, 0.0))) for bound, count in current)


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile of observations counted in cumulative ``buckets``, interpolated
    linearly inside the bucket it falls in (as Prometheus' ``histogram_quantile``); None
    without observations. Past the last finite bound, that bound is the answer."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def between(previous: Snapshot, current: Snapshot) -> Point:
    """The point describing the interval from ``previous`` to ``current``."""
    commit = _bucket_increase(current.commit, previous.commit)
    http: dict[str, float] = {}
    for route, buckets in current.http.items():
        if route in _NOT_LATENCY_ROUTES:
            continue
        p95 = histogram_quantile(0.95, _bucket_increase(buckets, previous.http.get(route, ())))
        if p95 is not None:
            http[route] = p95
    return Point(
        at=current.at,
        seconds=max(current.monotonic - previous.monotonic, 1e-9),
        received=_counter_increase(current.received, previous.received),
        rejected=_counter_increase(current.rejected, previous.rejected),
        commit_p50=histogram_quantile(0.5, commit),
        commit_p99=histogram_quantile(0.99, commit),
        http_p95=http,
        fleet=current.fleet,
    )


def _counter_increase(
    current: Mapping[str, float], previous: Mapping[str, float]
) -> dict[str, float]:
    increases = {key: _increase(value, previous.get(key, 0.0)) for key, value in current.items()}
    return {key: value for key, value in increases.items() if value > 0}


class FleetHistory:
    """Owns the ``fleet-history`` loop and the ring of its points (this process only)."""

    def __init__(self, registry: CollectorRegistry, *, interval_s: float) -> None:
        self._registry = registry
        self.interval_s = interval_s
        # Bounded: at most 24 h of points, and never more than MAX_POINTS_KEPT.
        self._points: deque[Point] = deque(
            maxlen=min(math.ceil(HISTORY_S / interval_s), MAX_POINTS_KEPT)
        )
        self._last: Snapshot | None = None
        # Appended to on the event loop, read by the route on a worker thread.
        self._lock = threading.Lock()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FleetHistory]:
        """Sample now and every ``interval_s`` until the context exits."""
        async with background_task("fleet-history", self._run):
            yield self

    async def _run(self) -> None:
        while True:
            try:
                self.record(await asyncio.to_thread(read_snapshot, self._registry))
            except Exception:  # supervisor loop: log and sample again next time
                logger.exception(
                    "fleet history: sampling failed; retrying in %.1f s", self.interval_s
                )
            await asyncio.sleep(self.interval_s)

    def record(self, snapshot: Snapshot) -> None:
        """Add the point between the previous snapshot and ``snapshot`` (none for the first)."""
        previous, self._last = self._last, snapshot
        if previous is not None:
            point = between(previous, snapshot)
            with self._lock:
                self._points.append(point)

    def overview(self, minutes: int, *, now: float | None = None) -> FleetOverview:
        """The charts of the last ``minutes``; long ranges have neighbouring points merged."""
        since = (time.time() if now is None else now) - minutes * 60
        with self._lock:
            # A point is stamped with its interval's end: one ending at ``since`` is older.
            points = [point for point in self._points if point.at > since]
        size = max(1, math.ceil(len(points) / MAX_ANSWER_POINTS))
        # Merged bins are aligned on the clock, not on the window's start, so a refresh does not
        # regroup (and redraw differently) what was already shown: only the newest bin grows.
        span = self.interval_s * size
        bins = (
            points
            if size == 1
            else [
                _merge(list(group))
                for _, group in itertools.groupby(points, key=lambda p: math.floor(p.at / span))
            ]
        )
        return FleetOverview(
            minutes=minutes,
            interval_s=self.interval_s,
            point_s=span,
            timestamps=[point.at for point in bins],
            devices=_gauge_series(bins, "edgefleet_devices", _DEVICE_STATUSES),
            ingested=_rate_series(bins, lambda point: point.received),
            rejected=_rate_series(bins, lambda point: point.rejected),
            commit_latency=[
                FleetSeries(name="p50", values=[point.commit_p50 for point in bins]),
                FleetSeries(name="p99", values=[point.commit_p99 for point in bins]),
            ],
            http_p95=[
                FleetSeries(name=route, values=[point.http_p95.get(route) for point in bins])
                for route in _names(point.http_p95 for point in bins)
            ],
            commands=_gauge_series(bins, "edgefleet_commands"),
            deployments=_gauge_series(bins, "edgefleet_deployments"),
        )


def _merge(points: Sequence[Point]) -> Point:
    """One point for consecutive ``points``: counts add up (so rates are exact over the whole
    span), quantiles keep the worst interval's (a spike is not averaged away), gauges the last.
    """
    if len(points) == 1:
        return points[0]
    received: dict[str, float] = {}
    rejected: dict[str, float] = {}
    http: dict[str, float] = {}
    for point in points:
        for kind, count in point.received.items():
            _add(received, kind, count)
        for reason, count in point.rejected.items():
            _add(rejected, reason, count)
        for route, p95 in point.http_p95.items():
            http[route] = max(p95, http.get(route, p95))
    return Point(
        at=points[-1].at,
        seconds=sum(point.seconds for point in points),
        received=received,
        rejected=rejected,
        commit_p50=_worst(point.commit_p50 for point in points),
        commit_p99=_worst(point.commit_p99 for point in points),
        http_p95=http,
        fleet=points[-1].fleet,
    )


def _worst(values: Iterable[float | None]) -> float | None:
    return max((value for value in values if value is not None), default=None)


def _names(mappings: Iterable[Mapping[str, object]], always: Sequence[str] = ()) -> list[str]:
    extra = {name for mapping in mappings for name in mapping}.difference(always)
    return [*always, *sorted(extra)]


def _rate_series(
    points: Sequence[Point], counts: Callable[[Point], Mapping[str, float]]
) -> list[FleetSeries]:
    return [
        FleetSeries(
            name=name, values=[counts(point).get(name, 0.0) / point.seconds for point in points]
        )
        for name in _names(counts(point) for point in points)
    ]


def _gauge_series(
    points: Sequence[Point], gauge: str, always: Sequence[str] = ()
) -> list[FleetSeries]:
    # A status missing from a readable sample has no rows: 0. An unreadable sample: null.
    def value(point: Point, name: str) -> float | None:
        return None if point.fleet is None else point.fleet.get(gauge, {}).get(name, 0.0)

    readable = (point.fleet.get(gauge, {}) for point in points if point.fleet is not None)
    names = _names(readable, always)
    return [
        FleetSeries(name=name, values=[value(point, name) for point in points]) for name in names
    ]
