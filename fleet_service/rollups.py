"""Hourly rollups of telemetry and results: fold raw rows into them, and read them for charts.

A rollup keeps min, max, sum and count per device and UTC hour (per model too for results), so
folding the same hour in several passes (an hour still running, a device's late backlog) gives
exactly what one pass over all its rows would. :mod:`fleet_service.retention` decides which rows
to fold and when; this module only does the arithmetic and the reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, col, select

from fleet_service.schemas import ResultHourPublic, TelemetryPoint
from fleet_service.tables import InferenceResult, ResultHourly, TelemetryHourly, TelemetrySample

__all__ = [
    "fold_results",
    "fold_telemetry",
    "hour_of",
    "result_hours",
    "telemetry_hours",
]


def hour_of(moment: datetime) -> datetime:
    """The UTC hour ``moment`` falls in."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _new_telemetry_hour(row: TelemetrySample, hour: datetime) -> TelemetryHourly:
    return TelemetryHourly(
        device_id=row.device_id,
        hour=hour,
        samples=0,
        cpu_min=row.cpu_percent,
        cpu_max=row.cpu_percent,
        cpu_sum=0.0,
        memory_min=row.memory_percent,
        memory_max=row.memory_percent,
        memory_sum=0.0,
        disk_sum=0.0,
        load_min=row.load_1,
        load_max=row.load_1,
        load_sum=0.0,
        memory_used_sum=0.0,
        memory_total_max=row.memory_total_bytes,
        net_sent_max=row.net_bytes_sent,
        net_recv_max=row.net_bytes_recv,
        uptime_max=row.uptime_s,
    )


def _add_sample(into: TelemetryHourly, row: TelemetrySample) -> None:
    into.samples += 1
    into.cpu_min = min(into.cpu_min, row.cpu_percent)
    into.cpu_max = max(into.cpu_max, row.cpu_percent)
    into.cpu_sum += row.cpu_percent
    into.memory_min = min(into.memory_min, row.memory_percent)
    into.memory_max = max(into.memory_max, row.memory_percent)
    into.memory_sum += row.memory_percent
    into.disk_sum += row.disk_percent
    into.load_min = min(into.load_min, row.load_1)
    into.load_max = max(into.load_max, row.load_1)
    into.load_sum += row.load_1
    if (temperature := row.temperature_c) is not None:
        into.temperature_samples += 1
        into.temperature_sum += temperature
        low, high = into.temperature_min, into.temperature_max
        into.temperature_min = temperature if low is None else min(low, temperature)
        into.temperature_max = temperature if high is None else max(high, temperature)
    into.memory_used_sum += row.memory_used_bytes
    into.memory_total_max = max(into.memory_total_max, row.memory_total_bytes)
    into.net_sent_max = max(into.net_sent_max, row.net_bytes_sent)
    into.net_recv_max = max(into.net_recv_max, row.net_bytes_recv)
    into.uptime_max = max(into.uptime_max, row.uptime_s)


def fold_telemetry(session: Session, rows: Sequence[TelemetrySample]) -> int:
    """Add ``rows`` to their hours' rollups (created as needed); returns the hours touched."""
    keys = {(row.device_id, hour_of(row.timestamp)) for row in rows}
    existing = {
        (hourly.device_id, hourly.hour): hourly
        for hourly in session.exec(
            select(TelemetryHourly).where(
                col(TelemetryHourly.device_id).in_({device for device, _ in keys}),
                col(TelemetryHourly.hour).in_({hour for _, hour in keys}),
            )
        )
    }
    for row in rows:
        key = (row.device_id, hour_of(row.timestamp))
        hourly = existing.get(key)
        if hourly is None:
            hourly = existing[key] = _new_telemetry_hour(row, key[1])
            session.add(hourly)
        _add_sample(hourly, row)
    return len(keys)


def fold_results(session: Session, rows: Sequence[InferenceResult]) -> int:
    """Add result ``rows`` to their hours' rollups; returns the hours touched."""
    keys = {(row.device_id, row.model, hour_of(row.timestamp)) for row in rows}
    existing = {
        (hourly.device_id, hourly.model, hourly.hour): hourly
        for hourly in session.exec(
            select(ResultHourly).where(
                col(ResultHourly.device_id).in_({key[0] for key in keys}),
                col(ResultHourly.model).in_({key[1] for key in keys}),
                col(ResultHourly.hour).in_({key[2] for key in keys}),
            )
        )
    }
    for row in rows:
        key = (row.device_id, row.model, hour_of(row.timestamp))
        hourly = existing.get(key)
        if hourly is None:
            hourly = existing[key] = ResultHourly(
                device_id=row.device_id,
                model=row.model,
                hour=key[2],
                results=0,
                errors=0,
                latency_min_ms=row.latency_ms,
                latency_max_ms=row.latency_ms,
                latency_sum_ms=0.0,
                tokens=0,
            )
            session.add(hourly)
        hourly.results += 1
        hourly.errors += row.error is not None
        hourly.latency_min_ms = min(hourly.latency_min_ms, row.latency_ms)
        hourly.latency_max_ms = max(hourly.latency_max_ms, row.latency_ms)
        hourly.latency_sum_ms += row.latency_ms
        hourly.tokens += row.tokens or 0
    return len(keys)


def telemetry_hours(
    session: Session, device_id: str, since: datetime, until: datetime
) -> list[TelemetryPoint]:
    """One chart point per hour in ``[since, until]``, oldest first: the hour's means, its
    min and max, and its sample count; counters are the hour's highest value."""
    rows = session.exec(
        select(TelemetryHourly)
        .where(
            TelemetryHourly.device_id == device_id,
            col(TelemetryHourly.hour) >= hour_of(since),
            col(TelemetryHourly.hour) <= until,
        )
        .order_by(col(TelemetryHourly.hour))
    ).all()
    return [_hour_point(row) for row in rows]


def _hour_point(row: TelemetryHourly) -> TelemetryPoint:
    n = row.samples
    temperature = row.temperature_sum / row.temperature_samples if row.temperature_samples else None
    return TelemetryPoint(
        # Drawn mid-hour: the value stands for the whole hour, not its first second.
        timestamp=row.hour + timedelta(minutes=30),
        cpu_percent=row.cpu_sum / n,
        memory_percent=row.memory_sum / n,
        memory_used_bytes=round(row.memory_used_sum / n),
        memory_total_bytes=row.memory_total_max,
        disk_percent=row.disk_sum / n,
        load_1=row.load_sum / n,
        temperature_c=temperature,
        net_bytes_sent=row.net_sent_max,
        net_bytes_recv=row.net_recv_max,
        uptime_s=row.uptime_max,
        samples=n,
        cpu_percent_min=row.cpu_min,
        cpu_percent_max=row.cpu_max,
        memory_percent_min=row.memory_min,
        memory_percent_max=row.memory_max,
        load_1_min=row.load_min,
        load_1_max=row.load_max,
        temperature_c_min=row.temperature_min,
        temperature_c_max=row.temperature_max,
    )


def result_hours(
    session: Session,
    since: datetime,
    until: datetime,
    *,
    model: str | None = None,
    device_ids: Iterable[str] | None = None,
) -> list[ResultHourPublic]:
    """Result rollups in ``[since, until]`` by hour, device and model, oldest first."""
    query = select(ResultHourly).where(
        col(ResultHourly.hour) >= hour_of(since), col(ResultHourly.hour) <= until
    )
    if model is not None:
        query = query.where(ResultHourly.model == model)
    if device_ids is not None:
        query = query.where(col(ResultHourly.device_id).in_(list(device_ids)))
    rows = session.exec(query.order_by(col(ResultHourly.hour), col(ResultHourly.device_id)))
    return [
        ResultHourPublic(
            hour=row.hour,
            device_id=row.device_id,
            model=row.model,
            results=row.results,
            errors=row.errors,
            latency_mean_ms=row.latency_sum_ms / row.results,
            latency_min_ms=row.latency_min_ms,
            latency_max_ms=row.latency_max_ms,
            tokens=row.tokens,
        )
        for row in rows
    ]
