"""Inference results from devices: the newest, summaries per model version, hourly rollups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from fleet_service.api.deps import SessionDep, ViewerDep
from fleet_service.errors import ServiceError
from fleet_service.registry import visible_device_ids
from fleet_service.results import MAX_RESULTS, list_results, summarise
from fleet_service.rollups import result_hours
from fleet_service.schemas import ResultHourPublic, ResultPublic, ResultSummary

__all__ = ["router"]

router = APIRouter(prefix="/results", tags=["results"])


@router.get("")
def results(
    session: SessionDep,
    viewer: ViewerDep,
    model: str | None = None,
    device_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS)] = 100,
) -> list[ResultPublic]:
    """The newest results, newest first; filter by model and by device."""
    return list_results(session, model, device_id, limit, scope=viewer)


@router.get("/summary")
def summary(
    session: SessionDep,
    viewer: ViewerDep,
    model: str | None = None,
    device_id: str | None = None,
) -> list[ResultSummary]:
    """Per (model, version): count, errors, error rate, p50/p95 latency, mean confidence and
    tokens/s (the last three over successful results)."""
    return summarise(session, model, device_id, scope=viewer)


# Bounds one answer: every device's hours of a year and a bit, at most.
MAX_HOURLY_RANGE = timedelta(days=400)


@router.get("/hourly")
def hourly(
    session: SessionDep,
    viewer: ViewerDep,
    model: str | None = None,
    device_id: str | None = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
) -> list[ResultHourPublic]:
    """Results per hour, device and model from the rollups (kept after the raw results are
    deleted): count, errors, latency mean/min/max, tokens. Default: the last 7 days."""
    end = until or datetime.now(UTC)
    start = since or end - timedelta(days=7)
    if start > end:
        raise ServiceError(f"since ({start.isoformat()}) is after until ({end.isoformat()})")
    if end - start > MAX_HOURLY_RANGE:
        raise ServiceError(f"ask for at most {MAX_HOURLY_RANGE.days} days at a time")
    # Like /results: a device outside the caller's tag (or not enrolled) has no hours.
    devices = visible_device_ids(session, viewer)
    if device_id is not None:
        devices = [device_id] if devices is None or device_id in devices else []
    return result_hours(session, start, end, model=model, device_ids=devices)
