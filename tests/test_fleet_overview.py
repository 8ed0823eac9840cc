"""The fleet page's history: exact rates and quantiles from the app's own registry, and end to
end a real service sampling every 0.5 s while a real agent sends telemetry, read over REST and
charted in headless Debian Chromium."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from fleet_service.fleet_history import (
    MAX_ANSWER_POINTS,
    FleetHistory,
    FleetSeries,
    Snapshot,
    histogram_quantile,
    read_snapshot,
)
from fleet_service.ingest import IngestCounters
from fleet_service.ingest.writer import BatchResult
from fleet_service.metrics import ServiceMetrics
from tests.fixtures.browser import sign_in
from tests.fixtures.fleet import AgentProcess, Fleet, start_fleet, wait_until

INF = float("inf")


# --- The arithmetic, on the app's real registry ------------------------------------------------


def at(snapshot: Snapshot, seconds: float) -> Snapshot:
    """``snapshot`` as if taken ``seconds`` after the epoch: intervals of known length."""
    return dataclasses.replace(snapshot, at=1_000_000 + seconds, monotonic=seconds)


def series(answer: list[FleetSeries], name: str) -> list[float | None]:
    by_name = {s.name: s.values for s in answer}
    assert name in by_name, f"no series {name!r} in {sorted(by_name)}"
    values: list[float | None] = by_name[name]
    return values


def test_histogram_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = ((0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (INF, 20.0))
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.99)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)
    # Past the last finite bound, that bound is all a histogram can say.
    assert histogram_quantile(0.9, ((1.0, 5.0), (INF, 10.0))) == 1.0
    assert histogram_quantile(0.5, ((1.0, 0.0), (INF, 0.0))) is None
    assert histogram_quantile(0.5, ()) is None


def test_rates_and_quantiles_come_from_the_difference_of_two_samples() -> None:
    metrics = ServiceMetrics()
    counters = IngestCounters(metrics.registry)
    history = FleetHistory(metrics.registry, interval_s=2)
    counters.receive("telemetry")  # before the first sample: not in any interval
    counters.record(BatchResult(), size=1, seconds=3.0)
    history.record(at(read_snapshot(metrics.registry), 0))
    for _ in range(10):
        counters.receive("telemetry")
    for _ in range(4):
        counters.reject("schema", "telemetry")
    counters.reject("json")
    for _ in range(10):
        counters.record(BatchResult(), size=1, seconds=0.02)  # in the 0.01-0.025 bucket
    metrics.http_seconds.labels("GET", "/api/v1/devices", "200").observe(0.2)
    metrics.http_seconds.labels("GET", "/api/v1/events", "200").observe(600)
    history.record(at(read_snapshot(metrics.registry), 2))

    answer = history.overview(60, now=1_000_000 + 2)
    assert answer.timestamps == [1_000_000 + 2]
    assert series(answer.ingested, "telemetry") == [5.0]
    assert series(answer.rejected, "schema") == [2.0]
    assert series(answer.rejected, "json") == [0.5]
    # Only this interval's ten batches count, not the slow one before it.
    p50, p99 = series(answer.commit_latency, "p50")[0], series(answer.commit_latency, "p99")[0]
    assert p50 is not None and 0.01 < p50 <= 0.025
    assert p99 is not None and p50 < p99 <= 0.025
    assert [s.name for s in answer.http_p95] == ["/api/v1/devices"]  # the stream is no latency
    assert series(answer.http_p95, "/api/v1/devices")[0] == pytest.approx(0.2425)
    # No database watched: the fleet-state gauges are unknown, not zero.
    assert [s.name for s in answer.devices] == ["online", "offline", "unknown"]
    assert series(answer.devices, "online") == [None]

    history.record(at(read_snapshot(metrics.registry), 4))  # a quiet interval
    answer = history.overview(60, now=1_000_000 + 4)
    assert series(answer.ingested, "telemetry") == [5.0, 0.0]
    assert series(answer.commit_latency, "p99") == [p99, None]
    assert series(answer.http_p95, "/api/v1/devices") == [answer.http_p95[0].values[0], None]


def test_long_ranges_merge_points_without_changing_the_rates() -> None:
    metrics = ServiceMetrics()
    counters = IngestCounters(metrics.registry)
    history = FleetHistory(metrics.registry, interval_s=1)
    history.record(at(read_snapshot(metrics.registry), 0))
    for second in range(1, 1001):
        for _ in range(3):
            counters.receive("results")
        snapshot = at(read_snapshot(metrics.registry), second)
        fleet = {"edgefleet_devices": {"online": float(second)}}
        history.record(dataclasses.replace(snapshot, fleet=fleet))

    answer = history.overview(1440, now=1_000_000 + 1000)
    # Two seconds a point, on even seconds: the first point stands alone.
    assert len(answer.timestamps) == 501 <= MAX_ANSWER_POINTS
    assert answer.point_s == 2
    assert set(series(answer.ingested, "results")) == {3.0}
    assert series(answer.devices, "online")[-1] == 1000  # a gauge keeps its newest value
    assert series(answer.devices, "offline")[-1] == 0  # no rows of a status: none of them
    # The window: the last minute only.
    assert len(history.overview(1, now=1_000_000 + 1000).timestamps) == 60


# --- A real service and agent ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, AgentProcess]]:
    """A fleet sampling its metrics every 0.5 s, and one agent sending telemetry every 0.5 s."""
    tmp: Path = tmp_path_factory.mktemp("fleet-overview")
    fleet = start_fleet(tmp, None, extra_env={"EDGEFLEET_FLEET_HISTORY_INTERVAL_S": "0.5"})
    try:
        agent = fleet.start_agent(fleet.enroll("x"))
        yield fleet, agent
    finally:
        fleet.close()


def overview(client: httpx.Client, minutes: int = 5) -> dict[str, Any]:
    response = client.get("/api/v1/fleet/overview", params={"minutes": minutes})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def named(body: dict[str, Any], chart: str) -> dict[str, list[float | None]]:
    return {s["name"]: s["values"] for s in body[chart]}


def test_overview_charts_a_real_agents_telemetry_and_counts_it_online(
    sampled: tuple[Fleet, AgentProcess],
) -> None:
    fleet, _agent = sampled

    def charted() -> dict[str, Any] | None:
        body = overview(fleet.api)
        telemetry = [v for v in named(body, "ingested").get("telemetry", []) if v]
        online = named(body, "devices")["online"]
        return body if telemetry and online and online[-1] == 1 else None

    body = wait_until(charted, 30, 0.5, "telemetry charted and the device counted online")
    assert body["minutes"] == 5
    assert body["interval_s"] == 0.5
    points = len(body["timestamps"])
    assert body["timestamps"] == sorted(body["timestamps"])
    for chart in ("devices", "ingested", "rejected", "commit_latency", "http_p95"):
        assert all(len(s["values"]) == points for s in body[chart]), chart
    # An agent sends one sample each 0.5 s: about 2/s, far from a count or a per-minute figure.
    rates = [v for v in named(body, "ingested")["telemetry"] if v is not None]
    assert 0 < max(rates) < 50
    assert any(v for v in named(body, "commit_latency")["p50"])
    assert "/api/v1/fleet/overview" in named(body, "http_p95")
    assert "/api/v1/events" not in named(body, "http_p95")


def test_a_dropped_message_shows_up_as_a_rejection_by_reason(
    sampled: tuple[Fleet, AgentProcess],
) -> None:
    fleet, agent = sampled
    device_token = (agent.state_dir / "device_token").read_text().strip()
    with fleet.anonymous() as client:
        sent = client.post(
            "/api/v1/agent/messages",
            headers={"Authorization": f"Bearer {device_token}"},
            json={"messages": [{"kind": "telemetry", "payload": {"cpu_percent": "hot"}}]},
        )
    assert sent.status_code == 200, sent.text

    def rejected() -> bool:
        return any(v for v in named(overview(fleet.api), "rejected").get("schema", []))

    wait_until(rejected, 20, 0.5, "the schema rejection charted")


@pytest.mark.parametrize("minutes", ["0", "1441", "an-hour"])
def test_a_bad_range_is_refused_with_a_problem_naming_minutes(
    sampled: tuple[Fleet, AgentProcess], minutes: str
) -> None:
    fleet, _agent = sampled
    response = fleet.api.get("/api/v1/fleet/overview", params={"minutes": minutes})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "minutes" in response.json()["detail"]


def test_the_overview_needs_a_viewer_credential(sampled: tuple[Fleet, AgentProcess]) -> None:
    fleet, _agent = sampled
    created = fleet.api.post("/api/v1/tokens", json={"name": "wallboard", "role": "viewer"})
    assert created.status_code == 201, created.text
    with fleet.anonymous() as client:
        refused = client.get("/api/v1/fleet/overview")
        assert refused.status_code == 401
        assert refused.headers["content-type"].startswith("application/problem+json")
        client.headers["Authorization"] = f"Bearer {created.json()['secret']}"
        assert overview(client, 60)["minutes"] == 60


@pytest.mark.browser
def test_the_fleet_page_charts_ingestion_in_chromium(
    sampled: tuple[Fleet, AgentProcess], page: Page
) -> None:
    fleet, _agent = sampled
    sign_in(page, fleet)
    page.get_by_role("link", name="Fleet", exact=True).click()
    expect(page).to_have_url(f"{fleet.url}/fleet")

    ingested = page.get_by_test_id("chart-ingested")
    expect(ingested).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"), timeout=20_000)
    for chart in ("devices", "rejected", "commit-latency", "http-p95", "commands", "deployments"):
        expect(page.get_by_test_id(f"chart-{chart}")).to_be_visible()
    expect(page.get_by_test_id("fleet-devices-now")).to_contain_text("1 online")

    page.locator('[data-range="15m"]').click()
    expect(page).to_have_url(f"{fleet.url}/fleet?range=15m")
    expect(page.locator('[data-range="15m"]')).to_have_attribute("aria-pressed", "true")
    expect(ingested).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"))
    page.screenshot(path=str(fleet.tmp / "fleet.png"))
