"""Inference results from devices: the newest, and summaries per model version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleet_service.api.deps import SessionDep, ViewerDep
from fleet_service.results import MAX_RESULTS, list_results, summarise
from fleet_service.schemas import ResultPublic, ResultSummary

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
