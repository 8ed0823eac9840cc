"""The multi-host deployment files hold together without a Docker engine: compose.yaml is valid
Compose, every EDGEFLEET_* it passes is a real setting, the Prometheus config and every dashboard
query pass promtool, and every metric a dashboard charts is one the code exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from sqlalchemy import Engine

from device_agent.config import AgentSettings, InferenceSettings
from device_agent.inference import ModelPool
from device_agent.metrics import AgentMetrics
from device_agent.outbox import Outbox
from fleet_service.config import ServiceSettings
from fleet_service.db import create_db_engine, migrate
from fleet_service.ingest.counters import IngestCounters
from fleet_service.metrics import ServiceMetrics
from fleet_service.pki import create_ca, write_certificate

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
BOARDS = ("fleet-overview", "device", "inference")

_METRIC = re.compile(r"\bedgefleet_[a-z0-9_]+\b")
_ENV_NAME = re.compile(r"\bEDGEFLEET_[A-Z0-9_]+\b")
# ${VAR:-default} and ${VAR} as `docker compose` interpolates them (only defaults are used here).
_INTERPOLATION = re.compile(r"\$\{([A-Z_]+)(?::-([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    # safe_load resolves anchors and `<<` merge keys the way Compose does.
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


def services(compose: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from compose["services"].items()


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def interpolate(value: str) -> str:
    """A value as compose would pass it with no variables set: defaults in, `$$` as `$`."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def commands(service: Mapping[str, Any]) -> str:
    """Every word of a service's command and entrypoint, as one string."""
    words: list[str] = []
    for key in ("command", "entrypoint"):
        value = service.get(key)
        if isinstance(value, str):
            words.append(value)
        elif isinstance(value, list):
            words.extend(str(word) for word in value)
    return " ".join(words)


# --- compose.yaml -------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    # The Compose specification's schema as check-jsonschema vendors it: nothing is fetched here.
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def test_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    validator = Draft202012Validator(compose_schema())
    errors = [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_check_would_catch_a_misspelt_key(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["lb"]["port"] = ["8443:8443"]
    assert not Draft202012Validator(compose_schema()).is_valid(broken)


def test_every_service_belongs_to_a_broker_profile_and_images_are_pinned(
    compose: dict[str, Any],
) -> None:
    for name, service in services(compose):
        assert set(service["profiles"]) <= {"mosquitto", "emqx"}, name
        image = service["image"]
        if "build" in service:
            assert image == "edgefleet:compose", name
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin a tag, not {image!r}"
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            image = line.split()[1]
            assert ":" in image and not image.endswith(":latest"), line


def test_each_shape_has_two_replicas_a_broker_and_the_shared_services(
    compose: dict[str, Any],
) -> None:
    for profile, broker in (("mosquitto", "fleet-a"), ("emqx", "emqx")):
        names = {n for n, s in services(compose) if profile in s["profiles"]}
        shared = {"postgres", "init", "minio", "lb", "prometheus", "grafana", "sim"}
        assert shared <= names, profile
        hosts = {alias for n in names for alias in aliases(compose, n)}
        assert {"fleet-a", "fleet-b", "broker"} <= hosts, profile
        assert "broker" in aliases(compose, broker)
        # Depends only on services of the same shape, so `--profile X up` can start it.
        for name in names:
            depends = compose["services"][name].get("depends_on") or {}
            assert set(depends) <= names, f"{name} ({profile}) depends on {set(depends) - names}"


def aliases(compose: Mapping[str, Any], name: str) -> set[str]:
    """The names a service answers to on its networks."""
    found = {name}
    networks = compose["services"][name].get("networks") or {}
    if isinstance(networks, dict):
        for network in networks.values():
            found.update(interpolate(a) for a in (network or {}).get("aliases", []))
    return found


def replica_names_made_by_init() -> set[str]:
    script = (DEPLOY / "init" / "prepare.sh").read_text()
    match = re.search(r"^for name in ([a-z0-9 -]+); do", script, re.MULTILINE)
    assert match, "prepare.sh no longer adds the replicas in one loop"
    return set(match.group(1).split())


def test_the_replicas_compose_runs_are_the_ones_the_init_job_creates(
    compose: dict[str, Any],
) -> None:
    used = {
        m.group(1)
        for _, service in services(compose)
        for m in re.finditer(r"--replica ([a-z0-9-]+)", commands(service))
    }
    assert used == replica_names_made_by_init()


def test_every_edgefleet_variable_compose_passes_is_a_real_setting(
    compose: dict[str, Any],
) -> None:
    service_fields = set(ServiceSettings.model_fields)
    agent_fields = set(AgentSettings.model_fields)
    sources = [
        (n, set(environment(s)) | set(_ENV_NAME.findall(commands(s)))) for n, s in services(compose)
    ]
    sources.append(
        ("deploy/Dockerfile", set(_ENV_NAME.findall((DEPLOY / "Dockerfile").read_text())))
    )
    sources.append(
        ("prepare.sh", set(_ENV_NAME.findall((DEPLOY / "init" / "prepare.sh").read_text())))
    )
    unknown = []
    for where, names in sources:
        for var in names:
            if var.startswith("EDGEFLEET_AGENT_"):
                field = var.removeprefix("EDGEFLEET_AGENT_").split("__")[0].lower()
                known = field in agent_fields
            elif var.startswith("EDGEFLEET_"):
                known = var.removeprefix("EDGEFLEET_").lower() in service_fields
            else:
                continue
            if not known:
                unknown.append(f"{where}: {var}")
    assert not unknown, unknown


@pytest.mark.parametrize("name", ["fleet-a", "fleet-b", "fleet-a-emqx", "fleet-b-emqx", "init"])
def test_each_service_environment_makes_settings_the_service_accepts(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    service = compose["services"][name]
    for var in [v for v in os.environ if v.startswith("EDGEFLEET_")]:
        monkeypatch.delenv(var)
    for var, value in environment(service).items():
        if var.startswith("EDGEFLEET_"):
            monkeypatch.setenv(var, interpolate(value))
    if "EDGEFLEET_S3_SECRET_KEY" in commands(service):
        monkeypatch.setenv("EDGEFLEET_S3_SECRET_KEY", "0123456789abcdef" * 4)
    replica = re.search(r"--replica ([a-z0-9-]+)", commands(service))
    settings = ServiceSettings(
        replicas=tuple(sorted(replica_names_made_by_init())),
        replica=replica.group(1) if replica else None,
    )
    assert settings.home == Path("/fleet-home")
    assert settings.resolved_database_url.startswith("postgresql+psycopg://")
    if name != "init":
        assert settings.artifact_store == "s3"
        assert settings.s3_secure, "the service refuses plaintext S3 off loopback"
        assert settings.uses_shared_subscriptions
        assert settings.service_url == "https://fleet:8443"


def test_the_image_installs_extras_and_commands_that_exist(compose: dict[str, Any]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    match = re.search(
        r"pip install [^\n]*'/src\[([a-z0-9,]+)\]'", (DEPLOY / "Dockerfile").read_text()
    )
    assert match, "deploy/Dockerfile no longer installs /src[extras]"
    assert set(match.group(1).split(",")) <= set(project["optional-dependencies"])
    run = {commands(s).split()[0] for _, s in services(compose) if "build" in s}
    assert run - {"sh"} <= set(project["scripts"]), run


def test_the_init_script_is_valid_sh() -> None:
    subprocess.run(["sh", "-n", str(DEPLOY / "init" / "prepare.sh")], check=True)


def test_the_load_balancer_and_prometheus_name_hosts_that_exist(compose: dict[str, Any]) -> None:
    hosts = {alias for name, _ in services(compose) for alias in aliases(compose, name)}
    haproxy = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    backends = set(re.findall(r"^\s*server \S+ ([a-z0-9-]+):\d+", haproxy, re.MULTILINE))
    assert backends == {"fleet-a", "fleet-b", "broker"}
    prometheus = load_yaml(PROMETHEUS)
    (service_job,) = [
        j for j in prometheus["scrape_configs"] if j["job_name"] == "edgefleet-service"
    ]
    targets = {t.split(":")[0] for group in service_job["static_configs"] for t in group["targets"]}
    assert targets == {"fleet-a", "fleet-b"}
    assert backends | targets <= hosts
    datasource = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


def test_the_emqx_acl_grants_devices_what_the_mosquitto_template_does() -> None:
    template = (ROOT / "broker" / "templates" / "acl.tmpl").read_text()
    mosquitto = {
        ("publish" if verb == "write" else "subscribe", leaf)
        for verb, leaf in re.findall(
            r"^pattern (write|read) \$\{prefix\}/devices/%u/(\S+)$", template, re.MULTILINE
        )
    }
    acl = (DEPLOY / "emqx" / "acl.conf").read_text()
    emqx = set()
    for action, topics in re.findall(
        r"\{allow, all, (publish|subscribe), \[(.*?)\]\}\.", acl, re.S
    ):
        emqx |= {
            (action, t) for t in re.findall(r'"fleet/v1/devices/\$\{username\}/([^"]+)"', topics)
        }
    assert mosquitto and emqx == mosquitto
    assert acl.rstrip().endswith("{deny, all}.")


# --- Prometheus ---------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is not on PATH (Debian: apt install prometheus)"
    return subprocess.run([exe, *args], capture_output=True, text=True, check=False)


def test_prometheus_config_passes_promtool_with_its_files_in_place(tmp_path: Path) -> None:
    # promtool checks that the CA and credentials files exist, so the absolute container paths
    # are moved under tmp_path, with real files there.
    _, ca = create_ca()
    text = PROMETHEUS.read_text()
    for absolute in sorted(
        set(re.findall(r"(/(?:certs|etc)/[\w./*-]+)", text)), key=len, reverse=True
    ):
        local = tmp_path / absolute.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        if "*" not in absolute:
            if absolute.endswith(".crt"):
                write_certificate(local, ca)
            else:
                local.write_text("secret-token\n")
        text = text.replace(absolute, str(local))
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ------------------------------------------------------------------------------------


def dashboard(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((DASHBOARDS / f"{name}.json").read_text())
    return board


def panel_exprs(board: Mapping[str, Any]) -> list[str]:
    """The PromQL of every panel target."""
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


def exprs(board: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and variable queries."""
    variables = board.get("templating", {}).get("list", [])
    return panel_exprs(board) + [v["definition"] for v in variables]


def exposition_names(page: str) -> set[str]:
    """Metric names a query may use: each family, and the series its type adds."""
    names: set[str] = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
            names.update(name + s for s in suffixes.get(kind, []))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every name the real registries render: service (with ingestion) and agent."""
    tmp = tmp_path_factory.mktemp("metrics")
    url = f"sqlite:///{tmp / 'fleet.db'}"
    migrate(url)
    engine: Engine = create_db_engine(url)
    service = ServiceMetrics()
    IngestCounters(service.registry)
    service.watch_fleet(engine)
    agent = AgentMetrics()
    outbox = Outbox(tmp / "outbox.db")
    agent.watch(outbox, ModelPool(InferenceSettings()))
    try:
        pages = service.render().decode() + agent.render().decode()
    finally:
        service.unwatch_fleet()
        agent.unwatch()
        outbox.close()
        engine.dispose()
    return exposition_names(pages)


def test_grafana_provisioning_points_at_the_mounted_dashboards(compose: dict[str, Any]) -> None:
    provider = load_yaml(PROVISIONING / "dashboards" / "edgefleet.yml")["providers"][0]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert {p.stem for p in DASHBOARDS.glob("*.json")} == set(BOARDS)


@pytest.mark.parametrize("name", BOARDS)
def test_dashboard_charts_only_metrics_the_code_exports(
    name: str, exported_metrics: set[str]
) -> None:
    board = dashboard(name)
    used = {metric for expr in exprs(board) for metric in _METRIC.findall(expr)}
    assert used, f"{name} charts nothing"
    assert used <= exported_metrics, f"{name}: not exported: {sorted(used - exported_metrics)}"
    datasource = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"][0]
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboards_show_what_they_promise() -> None:
    overview = " ".join(exprs(dashboard("fleet-overview")))
    for metric in (
        "edgefleet_devices",
        "edgefleet_ingest_received_total",
        "edgefleet_ingest_rejected_total",
        "edgefleet_ingest_commit_seconds_bucket",
        "edgefleet_http_request_duration_seconds_bucket",
        "edgefleet_commands",
        "edgefleet_deployments",
    ):
        assert re.search(rf"\b{metric}\b", overview), metric
    device = dashboard("device")
    assert [v["name"] for v in device["templating"]["list"]] == ["instance"]
    assert all('instance=~"$instance"' in e for e in panel_exprs(device))
    inference = dashboard("inference")
    assert [v["name"] for v in inference["templating"]["list"]] == ["model"]
    assert all('model=~"$model"' in e for e in panel_exprs(inference))
    uids = [dashboard(n)["uid"] for n in BOARDS]
    assert len(set(uids)) == len(uids)


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # Grafana's variables replaced by what they stand for, then checked as recording rules.
    substitutions = {
        "$__rate_interval": "1m",
        "$__range": "1h",
        "$instance": ".+",
        "$model": ".+",
    }
    rules = []
    for name in BOARDS:
        for n, expr in enumerate(exprs(dashboard(name))):
            if expr.startswith("label_values("):
                expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{name}: unknown variable in {expr}"
            rules.append({"record": f"check:{name.replace('-', '_')}:{n}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
