"""Prometheus metrics, end to end: a real service and a real agent with a deployed model serve
/metrics, ``promtool check metrics`` accepts both pages, and a real Prometheus (Debian's) scrapes
both, the service over HTTPS with a viewer API token."""

from __future__ import annotations

import contextlib
import subprocess
import textwrap
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.fleet import AgentProcess, Fleet, free_tcp_port, wait_until
from tests.test_agent_models_fleet import deploy, model_report, upload


def samples(page: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def value(page: str, name: str, **labels: str) -> float | None:
    return samples(page).get((name, frozenset(labels.items())))


def promtool_check(page: str) -> None:
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=page, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def viewer_token(fleet: Fleet) -> str:
    response = fleet.api.post("/api/v1/tokens", json={"name": "prometheus", "role": "viewer"})
    assert response.status_code == 201, response.text
    token: str = response.json()["secret"]
    return token


@pytest.fixture
def served_agent(sqlite_fleet: Fleet, tmp_path: Path) -> tuple[AgentProcess, int]:
    """An agent serving the ONNX classifier, its local API on a known port."""
    fleet = sqlite_fleet
    port = free_tcp_port()
    agent = fleet.start_agent(
        fleet.enroll("metrics"), extra_env={"EDGEFLEET_AGENT_LOCAL_API__PORT": str(port)}
    )
    release = upload(fleet, tmp_path, "1.0", encrypt=False, seed=1)

    def compatible() -> bool:
        response = fleet.api.post(
            "/api/v1/deployments/preview",
            json={"release_id": release["id"], "device_ids": [agent.device_id]},
        )
        return response.status_code == 200 and response.json()["compatible"] == [agent.device_id]

    wait_until(compatible, 30, 0.5, "the device's telemetry to show it can take the model")
    deploy(fleet, release["id"], agent.device_id)

    def running() -> bool:
        report = model_report(fleet, agent.device_id)
        return bool(report and report["phase"] == "running" and report["healthy"])

    wait_until(running, 90, 0.5, "the classifier running on the device")
    return agent, port


def test_service_and_agent_metrics_count_what_happened_and_pass_promtool(
    sqlite_fleet: Fleet, served_agent: tuple[AgentProcess, int]
) -> None:
    fleet = sqlite_fleet
    agent, port = served_agent
    pixels = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    tensor = {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32"}
    body = {"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as local:
        for _ in range(3):
            assert local.post("/v2/models/classifier/infer", json=body).status_code == 200
        agent_page = local.get("/metrics")

    with fleet.anonymous() as client:
        assert client.get("/api/v1/metrics").status_code == 401
        # A tag-scoped viewer would learn about devices outside its tag: refused, saying why.
        scoped = fleet.api.post(
            "/api/v1/tokens", json={"name": "lab", "role": "viewer", "tag": "site=lab"}
        ).json()["secret"]
        refused = client.get("/api/v1/metrics", headers={"Authorization": f"Bearer {scoped}"})
        assert refused.status_code == 403 and "whole fleet" in refused.json()["detail"]
        refused = client.get(
            "/api/v1/fleet/overview", headers={"Authorization": f"Bearer {scoped}"}
        )
        assert refused.status_code == 403
        client.headers["Authorization"] = f"Bearer {viewer_token(fleet)}"
        fleet.device(agent.device_id)  # one templated route, timed below

        def service_page() -> str | None:
            page = client.get("/api/v1/metrics")
            assert page.status_code == 200, page.text
            assert page.headers["content-type"].startswith("text/plain")
            stored = value(page.text, "edgefleet_ingest_received_total", kind="results")
            return page.text if stored and stored >= 3 else None

        page: str = wait_until(service_page, 20, 0.5, "the three results to be ingested")
    promtool_check(page)
    assert value(page, "edgefleet_devices", status="online") == 1
    assert value(page, "edgefleet_ingest_connected") == 1
    assert (value(page, "edgefleet_ingest_stored_total") or 0) >= 3
    assert (value(page, "edgefleet_ingest_batch_size_count") or 0) >= 1
    assert value(page, "edgefleet_fleet_state_up") == 1
    deployments = [v for (name, _), v in samples(page).items() if name == "edgefleet_deployments"]
    assert sum(deployments) == 1
    assert (
        value(
            page,
            "edgefleet_http_request_duration_seconds_count",
            method="GET",
            route="/api/v1/devices/{device_id}",
            status="200",
        )
        or 0
    ) >= 1

    assert agent_page.status_code == 200
    promtool_check(agent_page.text)
    assert (
        value(
            agent_page.text,
            "edgefleet_agent_inference_seconds_count",
            model="classifier",
            source="api",
            outcome="ok",
        )
        == 3
    )
    assert value(agent_page.text, "edgefleet_agent_inference_queue_depth", model="classifier") == 0
    assert value(agent_page.text, "edgefleet_agent_reconnects_total") == 0
    assert value(agent_page.text, "edgefleet_agent_outbox_depth") is not None


def test_ingest_rejections_are_counted_by_kind_and_reason(sqlite_fleet: Fleet) -> None:
    fleet = sqlite_fleet
    state_dir = fleet.enroll("rejects")
    device_token = (state_dir / "device_token").read_text().strip()
    with fleet.anonymous() as client:
        sent = client.post(
            "/api/v1/agent/messages",
            headers={"Authorization": f"Bearer {device_token}"},
            json={"messages": [{"kind": "telemetry", "payload": {"cpu_percent": "hot"}}]},
        )
        assert sent.status_code == 200, sent.text
        assert sent.json()["rejected"]
        page = fleet.api.get("/api/v1/metrics").text
    assert value(page, "edgefleet_ingest_rejected_total", kind="telemetry", reason="schema") == 1
    assert value(page, "edgefleet_ingest_received_total", kind="telemetry") == 1


def test_a_real_prometheus_scrapes_the_service_and_the_agent(
    sqlite_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = sqlite_fleet
    api_port = free_tcp_port()
    agent = fleet.start_agent(
        fleet.enroll("scraped"), extra_env={"EDGEFLEET_AGENT_LOCAL_API__PORT": str(api_port)}
    )
    wait_until(lambda: fleet.device(agent.device_id)["status"] == "online", 30, 0.2, "online")
    # The README's way: the CLI writes the secret owner-only, for credentials_file.
    token_file = tmp_path / "prometheus-token"
    created = fleet.cli(
        "tokens", "create", "prometheus", "--role", "viewer", "--secret-file", str(token_file)
    )
    out, err = created.communicate(timeout=60)
    assert created.returncode == 0, out + err
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() not in out
    port = free_tcp_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""\
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
            scrape_configs:
              - job_name: edgefleet-service
                scheme: https
                metrics_path: /api/v1/metrics
                tls_config: {{ca_file: {fleet.home.ca_cert}}}
                authorization: {{credentials_file: {token_file}}}
                static_configs: [{{targets: ["127.0.0.1:{fleet.settings.http_port}"]}}]
              - job_name: edgefleet-agent
                static_configs: [{{targets: ["127.0.0.1:{api_port}"]}}]
            """
        )
    )
    checked = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    with contextlib.ExitStack() as stack:
        stack.callback(_stop, server, log)
        prom = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
        stack.callback(prom.close)

        def query(expression: str) -> list[dict[str, Any]]:
            try:
                response = prom.get("/api/v1/query", params={"query": expression})
            except httpx.TransportError:
                return []
            if response.status_code != 200:
                return []
            result: list[dict[str, Any]] = response.json()["data"]["result"]
            return result

        def both_up() -> bool:
            up = {r["metric"]["job"]: r["value"][1] for r in query("up")}
            return up == {"edgefleet-service": "1", "edgefleet-agent": "1"}

        wait_until(both_up, 60, 0.5, "Prometheus to scrape both targets")
        telemetry = wait_until(
            lambda: query('edgefleet_ingest_received_total{kind="telemetry"} > 0'),
            30,
            0.5,
            "the service's telemetry counter in Prometheus",
        )
        assert telemetry[0]["metric"]["job"] == "edgefleet-service"
        online = wait_until(
            lambda: query('edgefleet_devices{status="online"}'), 30, 0.5, "devices online"
        )
        assert online[0]["value"][1] == "1"
        assert wait_until(lambda: query("edgefleet_agent_outbox_depth"), 30, 0.5, "outbox depth")


def _stop(server: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
