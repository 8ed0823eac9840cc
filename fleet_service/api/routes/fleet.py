"""The dashboard's fleet page: the headline charts of the Grafana fleet overview, from the
service's own history (fleet_service.fleet_history)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet_service.api.deps import ContextDep, FleetViewerDep
from fleet_service.fleet_history import HISTORY_S, FleetOverview

__all__ = ["router"]

router = APIRouter(prefix="/fleet", tags=["fleet"])

Minutes = Annotated[
    int,
    Query(
        ge=1,
        le=HISTORY_S // 60,
        description="how far back, in minutes: 1 to 1440 (the service keeps 24 h)",
    ),
]


@router.get("/overview")
def overview(context: ContextDep, _viewer: FleetViewerDep, minutes: Minutes = 60) -> FleetOverview:
    """Devices by status, messages ingested and rejected per second, ingest commit latency
    p50/p99, HTTP p95 by route, commands and deployments by state, over the last ``minutes``.

    Sampled by this service process every ``fleet_history_interval_s`` and kept in memory: the
    history starts empty at every start, and behind a load balancer each replica answers with
    its own ingest and HTTP series (the device, command and deployment counts are shared)."""
    return context.history.overview(minutes)
