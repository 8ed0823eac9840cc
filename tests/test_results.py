"""Inference results through the real broker and service: stored once per message id however
often they come, listed and summarised correctly, and refused when the topic names another
model. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleet_protocol import ModelRuntime, ResultMessage, ResultSource, TopicKind
from tests.fixtures.fleet import Fleet, wait_until
from tests.test_deployments import Device, make_release, weights_sha256


@pytest.fixture
def device(fleet: Fleet) -> Iterator[Device]:
    raw = Device(fleet, "camera")
    yield raw
    raw.close()


def results(fleet: Fleet, **params: Any) -> list[dict[str, Any]]:
    response = fleet.api.get("/api/v1/results", params=params)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


def summary(fleet: Fleet, **params: Any) -> list[dict[str, Any]]:
    response = fleet.api.get("/api/v1/results/summary", params=params)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


def test_results_are_stored_once_under_redelivery_and_listed_newest_first(
    fleet: Fleet, device: Device
) -> None:
    release = make_release(fleet, "detector", "1.0")
    sent = [device.result(release, label=f"label-{n}", confidence=0.5) for n in range(3)]
    assert receipted(device, {m.message_id for m in sent})

    device.raw.send(TopicKind.RESULTS, sent[0], model="detector")  # an outbox replay
    assert sent[0].message_id in device.raw.receipted_ids()

    wait_until(lambda: fleet.stats()["duplicates"] >= 1, what="the replay counted")
    stored = results(fleet, model="detector")
    assert [r["message_id"] for r in stored] == [m.message_id for m in reversed(sent)]
    first = stored[-1]
    assert first["device_id"] == device.id
    assert (first["model"], first["version"], first["release"]) == ("detector", "1.0", 1)
    assert first["sha256"] == weights_sha256(release)
    assert (first["runtime"], first["source"], first["label"]) == ("onnx", "schedule", "label-0")
    assert first["received_at"] is not None
    assert results(fleet, device_id="dev-nobody") == []
    assert len(results(fleet, limit=2)) == 2


def receipted(device: Device, wanted: set[str]) -> bool:
    """Whether receipts name every id in ``wanted`` (other receipts are skipped)."""
    seen: set[str] = set()
    while not wanted <= seen:
        seen |= device.raw.receipted_ids()
    return True


def test_summary_per_model_version_counts_errors_percentiles_and_means(
    fleet: Fleet, device: Device
) -> None:
    old = make_release(fleet, "detector", "1.0")
    new = make_release(fleet, "detector", "2.0")
    llm = make_release(fleet, "chat", "0.1", runtime=ModelRuntime.GGUF)
    for n in range(1, 11):  # latencies 10..100 ms, confidence 0.5..0.95
        device.result(old, latency_ms=10.0 * n, label="cat", confidence=0.45 + 0.05 * n)
    device.result(old, error="input file unreadable", latency_ms=1.0)
    device.result(old, error="worker crashed", latency_ms=2.0)
    device.result(new, latency_ms=5.0, label="dog", confidence=1.0)
    for tokens_per_s in (30.0, 50.0):
        device.result(llm, text="hello", tokens=12, tokens_per_s=tokens_per_s, latency_ms=300)
    wait_until(lambda: len(results(fleet)) == 15, what="15 results stored")

    rows = {(s["model"], s["version"]): s for s in summary(fleet)}
    assert list(rows) == [("chat", "0.1"), ("detector", "1.0"), ("detector", "2.0")]
    old_row = rows[("detector", "1.0")]
    assert (old_row["count"], old_row["errors"]) == (12, 2)
    assert old_row["error_rate"] == pytest.approx(2 / 12)
    # Nearest rank over the 10 successful latencies; errors do not count.
    assert (old_row["p50_latency_ms"], old_row["p95_latency_ms"]) == (50.0, 100.0)
    assert old_row["mean_confidence"] == pytest.approx(0.725)
    assert old_row["mean_tokens_per_s"] is None
    assert rows[("detector", "2.0")]["p95_latency_ms"] == 5.0
    assert rows[("chat", "0.1")]["mean_tokens_per_s"] == pytest.approx(40.0)
    assert rows[("chat", "0.1")]["mean_confidence"] is None
    only_new = summary(fleet, model="detector", device_id=device.id)
    assert [s["version"] for s in only_new] == ["1.0", "2.0"]
    assert summary(fleet, device_id="dev-nobody") == []


def test_a_result_on_another_models_topic_is_rejected_counted_and_not_stored(
    fleet: Fleet, device: Device
) -> None:
    release = make_release(fleet, "detector", "1.0")
    stray = ResultMessage(
        model="detector",
        version="1.0",
        release=1,
        sha256=weights_sha256(release),
        runtime=ModelRuntime.ONNX,
        source=ResultSource.COMMAND,
        latency_ms=3,
    )
    device.raw.send(TopicKind.RESULTS, stray, model="classifier")
    device.raw.send(TopicKind.RESULTS, b'{"model": "detector"}', model="detector")
    good = device.result(release, label="cat")

    assert receipted(device, {good.message_id})
    stats = fleet.stats()
    assert stats["rejected"]["topic-model"] == 1
    assert stats["rejected"]["schema"] == 1
    assert [r["message_id"] for r in results(fleet)] == [good.message_id]


def test_results_and_deployments_are_announced_on_the_event_stream(
    fleet: Fleet, device: Device
) -> None:
    release = make_release(fleet, "detector", "1.0")
    seen: dict[str, dict[str, Any]] = {}
    with fleet.api.stream("GET", "/api/v1/events") as stream:
        assert stream.status_code == 200
        message = device.result(release, label="cat")
        fleet.api.post(
            "/api/v1/deployments", json={"release_id": release.id, "device_ids": [device.id]}
        )
        deadline = time.monotonic() + 15
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("result", "deployment"):
                seen[event] = json.loads(line.removeprefix("data: "))
            if len(seen) == 2 or time.monotonic() > deadline:
                break
    assert seen["result"]["message_id"] == message.message_id
    assert seen["deployment"]["release_id"] == release.id


def test_results_queries_refuse_bad_limits(fleet: Fleet) -> None:
    for limit in (0, 5001):
        response = fleet.api.get("/api/v1/results", params={"limit": limit})
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
