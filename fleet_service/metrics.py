"""Prometheus metrics of one service process, served on ``GET /api/v1/metrics``.

Each app has its own registry (two apps in one test process must not share series). What it
holds:

    edgefleet_ingest_*                  counted as messages arrive (fleet_service.ingest.counters)
    edgefleet_http_request_duration_*   every HTTP request, by method, route template and status
    edgefleet_devices / _commands /     fleet state, read from the database at scrape time, so
    _deployments / _webhook_deliveries  every replica reports the same shared truth
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet_service.api.route_templates import RouteTemplates
from fleet_service.tables import Command, Deployment, Device, WebhookDelivery

__all__ = ["CONTENT_TYPE_LATEST", "FleetStateCollector", "HttpMetricsMiddleware", "ServiceMetrics"]

logger = logging.getLogger(__name__)

# API answers take milliseconds; model uploads and event streams take seconds to hours.
_HTTP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    """The registry of one app and the series the app itself records."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_seconds = Histogram(
            "edgefleet_http_request_duration_seconds",
            "HTTP requests by method, route template and status (event streams: their lifetime)",
            ["method", "route", "status"],
            buckets=_HTTP_SECONDS,
            registry=self.registry,
        )
        self._fleet: FleetStateCollector | None = None

    def watch_fleet(self, engine: Engine) -> None:
        """Report the fleet's state from ``engine`` on each scrape (from the app's lifespan)."""
        self.unwatch_fleet()
        self._fleet = FleetStateCollector(engine)
        self.registry.register(self._fleet)

    def unwatch_fleet(self) -> None:
        if self._fleet is not None:
            self.registry.unregister(self._fleet)
            self._fleet = None

    def render(self) -> bytes:
        """The Prometheus text exposition; queries the database, so call it off the loop."""
        return generate_latest(self.registry)


class FleetStateCollector(Collector):
    """Gauges counted from the database: devices by status, commands, deployments and webhook
    deliveries by state. A database that does not answer leaves them out of that scrape (and
    ``edgefleet_fleet_state_up`` says 0) rather than failing the whole page."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return []  # collected live: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "edgefleet_fleet_state_up", "1 when the fleet state below could be read"
        )
        try:
            families = list(self._read())
        except SQLAlchemyError as exc:
            logger.warning("metrics: could not read the fleet state: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> Iterator[Metric]:
        with Session(self._engine) as session:
            yield _by_label(
                session,
                "edgefleet_devices",
                "Enrolled devices (not revoked) by status: online, offline, unknown",
                "status",
                select(Device.status, func.count())
                .where(col(Device.revoked_at).is_(None))
                .group_by(Device.status),
            )
            yield _by_label(
                session,
                "edgefleet_commands",
                "Commands by status",
                "status",
                select(Command.status, func.count()).group_by(Command.status),
            )
            yield _by_label(
                session,
                "edgefleet_deployments",
                "Deployments by state",
                "state",
                select(Deployment.state, func.count()).group_by(Deployment.state),
            )
            yield _by_label(
                session,
                "edgefleet_webhook_deliveries",
                "Webhook deliveries by state",
                "state",
                select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state),
            )


def _by_label(
    session: Session, name: str, documentation: str, label: str, query: object
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in session.exec(query).all():  # type: ignore[call-overload]
        family.add_metric([str(value)], int(count))
    return family


class HttpMetricsMiddleware:
    """Times every HTTP request into :attr:`ServiceMetrics.http_seconds`.

    The route label is the matched template (``/api/v1/devices/{device_id}``), never the raw
    path, so ids do not explode the series; the dashboard's files are ``dashboard``, and a path
    that matched no API route is ``unmatched``.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.histogram = metrics.http_seconds
        self.templates = RouteTemplates()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers: an exception that escaped everything

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.histogram.labels(scope["method"], self._route_label(scope), str(status)).observe(
                time.perf_counter() - started
            )

    def _route_label(self, scope: Scope) -> str:
        route = scope.get("route")
        template = self.templates.of(scope.get("app"), route) if route is not None else None
        if template is not None and template.startswith("/api/"):
            return template
        return "unmatched" if scope["path"].startswith("/api/") else "dashboard"
