"""The retention job: fold new telemetry and results into hourly rollups, then delete raw rows
past their retention, in small transactions that never hold up ingestion for long.

One pass, every ``retention_interval_s``:

    fold      telemetry and results in id order from a cursor (``maintenance_cursor``), up to
              rows received ``retention_settle_s`` ago, so a transaction still open on another
              replica cannot commit a row behind the cursor; the cursor moves in the same
              transaction as the rollups, so every row is folded exactly once
    delete    raw telemetry, results and device logs received more than their retention ago,
              oldest first, only rows already folded
    expire    rollups older than ``rollup_retention_days``

Each step works in chunks of ``retention_chunk_rows`` rows, one short transaction each, with a
pause between chunks so the ingest writer (SQLite's one writer) gets its turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Engine, delete
from sqlmodel import Session, col, select

from fleet_service.background import background_task
from fleet_service.config import ServiceSettings
from fleet_service.db import session_scope
from fleet_service.rollups import fold_results, fold_telemetry
from fleet_service.tables import (
    DeviceLog,
    InferenceResult,
    MaintenanceCursor,
    ResultHourly,
    TelemetryHourly,
    TelemetrySample,
)

__all__ = ["RetentionPolicy", "RetentionReport", "RetentionWorker", "run_retention"]

logger = logging.getLogger(__name__)

# Between chunks: the ingest writer waits on SQLite's lock at most one chunk, then gets in.
_PAUSE_S = 0.02


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep, for how long, and how much to do per transaction."""

    telemetry: timedelta
    results: timedelta
    logs: timedelta
    rollups: timedelta
    chunk_rows: int
    # How long a row must have been received before it is folded: far longer than any ingest
    # transaction stays open, so no row with a lower id can still commit behind the cursor.
    settle: timedelta

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> RetentionPolicy:
        return cls(
            telemetry=timedelta(days=settings.telemetry_retention_days),
            results=timedelta(days=settings.results_retention_days),
            logs=timedelta(days=settings.logs_retention_days),
            rollups=timedelta(days=settings.rollup_retention_days),
            chunk_rows=settings.retention_chunk_rows,
            settle=timedelta(seconds=settings.retention_settle_s),
        )


@dataclass
class RetentionReport:
    """What one pass did."""

    folded: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        parts = [f"folded_{k}={v}" for k, v in self.folded.items()]
        parts += [f"deleted_{k}={v}" for k, v in self.deleted.items()]
        return " ".join(parts) + f" seconds={self.seconds:.2f}"


def _cursor(session: Session, name: str) -> MaintenanceCursor:
    """The named cursor, locked for this transaction (PostgreSQL) so replicas take turns."""
    cursor = session.exec(
        select(MaintenanceCursor).where(MaintenanceCursor.name == name).with_for_update()
    ).first()
    if cursor is None:
        cursor = MaintenanceCursor(name=name, last_id=0, updated_at=datetime.now(UTC))
        session.add(cursor)
        session.flush()
    return cursor


def _fold_chunk(engine: Engine, table: Any, name: str, chunk: int, settled: datetime) -> int:
    """Fold the next chunk of ``table`` after the cursor ``name``; returns the rows folded
    (fewer than ``chunk`` when it reached rows not settled yet or the end)."""
    with session_scope(engine) as session:
        cursor = _cursor(session, name)
        fetched = session.exec(
            select(table).where(col(table.id) > cursor.last_id).order_by(col(table.id)).limit(chunk)
        ).all()
        # The settled prefix: a younger row stops it, even if older ones follow (replicas'
        # batches interleave), so nothing is ever left behind the cursor.
        rows = []
        for row in fetched:
            if row.received_at >= settled:
                break
            rows.append(row)
        if not rows:
            return 0
        if table is TelemetrySample:
            fold_telemetry(session, rows)
        else:
            fold_results(session, rows)
        cursor.last_id = rows[-1].id
        cursor.updated_at = datetime.now(UTC)
        return len(rows)


def _folded_up_to(engine: Engine, name: str) -> int | None:
    with Session(engine) as session:
        cursor = session.get(MaintenanceCursor, name)
        return None if cursor is None else cursor.last_id


def _delete_chunk(
    engine: Engine, table: Any, cutoff: datetime, up_to: int | None, chunk: int
) -> int:
    """Delete the oldest rows of ``table`` received before ``cutoff`` (and folded: id at most
    ``up_to``, when the table is folded at all); returns how many.

    Reads the next ``chunk`` rows in id order (the primary key, no scan) and deletes the prefix
    received before the cutoff: arrival order is id order, so the first younger row ends it.
    """
    with session_scope(engine) as session:
        query = select(table.id, table.received_at).order_by(col(table.id)).limit(chunk)
        if up_to is not None:
            query = query.where(col(table.id) <= up_to)
        ids = []
        for row_id, received_at in session.exec(query):
            if received_at >= cutoff:
                break
            ids.append(row_id)
        if ids:
            session.execute(delete(table).where(col(table.id).in_(ids)))
        return len(ids)


def _repeat(chunk: int, step: Callable[[], int]) -> int:
    """Run ``step`` until it does less than a ``chunk``; returns the total."""
    total = 0
    while True:
        done = step()
        total += done
        if done < chunk:
            return total
        time.sleep(_PAUSE_S)


def run_retention(
    engine: Engine, policy: RetentionPolicy, now: datetime | None = None
) -> RetentionReport:
    """One whole pass (blocking): fold, delete, expire."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    report = RetentionReport()
    chunk = policy.chunk_rows
    settled = now - policy.settle
    report.folded["telemetry"] = _repeat(
        chunk, partial(_fold_chunk, engine, TelemetrySample, "telemetry", chunk, settled)
    )
    report.folded["results"] = _repeat(
        chunk, partial(_fold_chunk, engine, InferenceResult, "results", chunk, settled)
    )
    for name, table, keep, cursor in (
        ("telemetry", TelemetrySample, policy.telemetry, "telemetry"),
        ("results", InferenceResult, policy.results, "results"),
        ("logs", DeviceLog, policy.logs, None),
    ):
        up_to = _folded_up_to(engine, cursor) if cursor is not None else None
        if cursor is not None and up_to is None:
            report.deleted[name] = 0  # nothing folded yet: nothing may go
            continue
        report.deleted[name] = _repeat(
            chunk, partial(_delete_chunk, engine, table, now - keep, up_to, chunk)
        )
    with session_scope(engine) as session:
        expired = now - policy.rollups
        gone = 0
        for hourly in (TelemetryHourly, ResultHourly):
            result = session.execute(delete(hourly).where(col(hourly.hour) < expired))
            gone += int(getattr(result, "rowcount", 0) or 0)
        report.deleted["rollups"] = gone
    report.seconds = time.perf_counter() - started
    return report


class RetentionWorker:
    """Owns the ``retention`` loop: a pass now and every ``interval_s`` after."""

    def __init__(self, engine: Engine, policy: RetentionPolicy, *, interval_s: float) -> None:
        self._engine = engine
        self._policy = policy
        self._interval_s = interval_s

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RetentionWorker]:
        """Run the loop until the context exits."""
        async with background_task("retention", self._run):
            yield self

    async def _run(self) -> None:
        while True:
            try:
                # On a worker thread: the event loop (and MQTT acks) never wait on it.
                report = await asyncio.to_thread(run_retention, self._engine, self._policy)
            except Exception:  # supervisor loop: log and try again next time
                logger.exception("retention pass failed; retrying in %.0f s", self._interval_s)
            else:
                if any(report.folded.values()) or any(report.deleted.values()):
                    logger.info("retention pass %s", report)
            await asyncio.sleep(self._interval_s)
