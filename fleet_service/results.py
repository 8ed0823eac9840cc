"""Stored inference results: list them, and summarise them per model version.

Summaries are computed by the database (counts and means by GROUP BY, percentiles by one
ordered OFFSET query each), so a large result table is never loaded into memory.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, func
from sqlmodel import Session, col, select

from fleet_service.registry import Scope, visible_device_ids
from fleet_service.schemas import ResultPublic, ResultSummary
from fleet_service.tables import InferenceResult

__all__ = [
    "MAX_RESULTS",
    "ResultFilter",
    "ResultStats",
    "list_results",
    "result_public",
    "result_stats",
    "summarise",
]

# Rows one listing returns at most; charts page by time instead.
MAX_RESULTS = 5000


@dataclass(frozen=True)
class ResultFilter:
    """Which results a query looks at; every field set narrows it."""

    model: str | None = None
    version: str | None = None
    release: int | None = None
    exclude_release: int | None = None
    sha256: str | None = None
    device_ids: Collection[str] | None = None
    since: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE clauses of this filter."""
        where: list[ColumnElement[bool]] = []
        if self.model is not None:
            where.append(col(InferenceResult.model) == self.model)
        if self.version is not None:
            where.append(col(InferenceResult.version) == self.version)
        if self.release is not None:
            where.append(col(InferenceResult.release) == self.release)
        if self.exclude_release is not None:
            where.append(col(InferenceResult.release) != self.exclude_release)
        if self.sha256 is not None:
            where.append(col(InferenceResult.sha256) == self.sha256)
        if self.device_ids is not None:
            where.append(col(InferenceResult.device_id).in_(list(self.device_ids)))
        if self.since is not None:
            where.append(col(InferenceResult.timestamp) >= self.since)
        return where


@dataclass(frozen=True)
class ResultStats:
    """What the summary and the canary gate read from a set of results."""

    count: int
    errors: int
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    mean_confidence: float | None
    mean_tokens_per_s: float | None

    @property
    def error_rate(self) -> float:
        """Failed results over all results (0 when there are none)."""
        return self.errors / self.count if self.count else 0.0


def result_public(row: InferenceResult) -> ResultPublic:
    """The API shape of a stored result."""
    return ResultPublic.model_validate(row)


def list_results(
    session: Session,
    model: str | None,
    device_id: str | None,
    limit: int,
    *,
    scope: Scope = None,
) -> list[ResultPublic]:
    """The newest ``limit`` results, newest first, optionally of one model and one device;
    only of devices within ``scope``."""
    query = select(InferenceResult)
    if model is not None:
        query = query.where(InferenceResult.model == model)
    if device_id is not None:
        query = query.where(InferenceResult.device_id == device_id)
    visible = visible_device_ids(session, scope)
    if visible is not None:
        query = query.where(col(InferenceResult.device_id).in_(visible))
    query = query.order_by(
        col(InferenceResult.timestamp).desc(), col(InferenceResult.id).desc()
    ).limit(min(limit, MAX_RESULTS))
    return [result_public(row) for row in session.exec(query)]


def _percentile(
    session: Session, where: list[ColumnElement[bool]], successes: int, fraction: float
) -> float | None:
    """Nearest-rank percentile of the latency of successful results."""
    if successes == 0:
        return None
    rank = max(1, math.ceil(fraction * successes))
    value = session.exec(
        select(InferenceResult.latency_ms)
        .where(*where, col(InferenceResult.error).is_(None))
        .order_by(col(InferenceResult.latency_ms))
        .offset(rank - 1)
        .limit(1)
    ).first()
    return float(value) if value is not None else None


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


def result_stats(session: Session, selection: ResultFilter) -> ResultStats:
    """Counts, error rate, latency percentiles and means of the results ``selection`` picks."""
    where = selection.conditions()
    return _stats(session, where)


def _stats(session: Session, where: list[ColumnElement[bool]]) -> ResultStats:
    failed = col(InferenceResult.error).is_not(None)
    ok = col(InferenceResult.error).is_(None)
    row = session.exec(
        select(
            func.count(),
            func.coalesce(func.sum(case((failed, 1), else_=0)), 0),
            func.avg(case((ok, col(InferenceResult.confidence)))),
            func.avg(case((ok, col(InferenceResult.tokens_per_s)))),
        ).where(*where)
    ).one()
    count, errors = int(row[0]), int(row[1])
    successes = count - errors
    return ResultStats(
        count=count,
        errors=errors,
        p50_latency_ms=_percentile(session, where, successes, 0.50),
        p95_latency_ms=_percentile(session, where, successes, 0.95),
        mean_confidence=_float(row[2]),
        mean_tokens_per_s=_float(row[3]),
    )


def summarise(
    session: Session, model: str | None, device_id: str | None, *, scope: Scope = None
) -> list[ResultSummary]:
    """One summary per (model, version), by model then version; only of devices within
    ``scope``."""
    device_ids = visible_device_ids(session, scope)
    if device_id is not None:
        device_ids = [device_id] if device_ids is None or device_id in device_ids else []
    base = ResultFilter(model=model, device_ids=device_ids)
    groups = session.exec(
        select(InferenceResult.model, InferenceResult.version)
        .where(*base.conditions())
        .group_by(col(InferenceResult.model), col(InferenceResult.version))
        .order_by(col(InferenceResult.model), col(InferenceResult.version))
    ).all()
    summaries = []
    for name, version in groups:
        where = [
            *base.conditions(),
            col(InferenceResult.model) == name,
            col(InferenceResult.version) == version,
        ]
        stats = _stats(session, where)
        summaries.append(
            ResultSummary(
                model=name,
                version=version,
                count=stats.count,
                errors=stats.errors,
                error_rate=stats.error_rate,
                p50_latency_ms=stats.p50_latency_ms,
                p95_latency_ms=stats.p95_latency_ms,
                mean_confidence=stats.mean_confidence,
                mean_tokens_per_s=stats.mean_tokens_per_s,
            )
        )
    return summaries
