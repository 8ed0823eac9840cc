"""Health, the fleet CA certificate, ingestion counters and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from fleet_service.api.deps import ContextDep, FleetViewerDep, ViewerDep
from fleet_service.metrics import CONTENT_TYPE_LATEST
from fleet_service.schemas import HealthPublic, IngestStats

__all__ = ["router"]

router = APIRouter(tags=["system"])


@router.get("/health")
def health(context: ContextDep) -> HealthPublic:
    """Liveness; no login needed so load balancers and ``make demo`` can poll it."""
    try:
        with context.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = True
    except SQLAlchemyError:  # a database failure is exactly what a health check reports
        database = False
    ok = database and context.counters.connected and context.counters.database_ok
    return HealthPublic(
        status="ok" if ok else "degraded",
        database=database,
        mqtt_connected=context.counters.connected,
    )


@router.get(
    "/ca",
    response_class=Response,
    responses={200: {"content": {"application/x-pem-file": {}}}},
)
def fleet_ca(context: ContextDep) -> Response:
    """The fleet CA certificate; agents check it against the fingerprint in their join token."""
    return Response(context.authority.pem, media_type="application/x-pem-file")


@router.get("/ingest/stats")
def ingest_stats(context: ContextDep, _viewer: ViewerDep) -> IngestStats:
    """What ingestion received, stored, deduplicated and rejected since start."""
    return context.counters.snapshot()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
def prometheus_metrics(context: ContextDep, _viewer: FleetViewerDep) -> Response:
    """Prometheus text exposition of this replica: ingestion, HTTP latency by route, and the
    fleet's devices, commands, deployments and webhook deliveries by state. Scrape it with an
    API token of the viewer role without a tag (``authorization: {credentials_file: ...}`` in
    Prometheus): the figures cover the whole fleet."""
    return Response(context.metrics.render(), media_type=CONTENT_TYPE_LATEST)
