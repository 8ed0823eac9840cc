"""Real agent processes with models: killed at each install step, offline convergence, commands.

The agent runs as ``python -m device_agent run`` against a real mosquitto (mTLS) and the real
HTTPS stand-in of the service's model routes (tests/fixtures/model_service.py); the test plays the
service's MQTT side: it retains the desired state and reads the retained reported state.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from device_agent.failpoints import FAILPOINT_ENV, FAILPOINT_EXIT_CODE, Step
from device_agent.model_store import ModelStore
from device_agent.state import StateDir
from fleet_protocol import (
    CommandMessage,
    DesiredState,
    FileRole,
    ModelAssignment,
    ModelPhase,
    ModelReport,
    ModelRuntime,
    ReportedState,
    ResultMessage,
    TopicKind,
    decode,
    device_topic,
)
from tests.fixtures.broker import RunningBroker
from tests.fixtures.model_service import ModelService, ReleaseFile, make_state_dir
from tests.fixtures.models import build_onnx_classifier, write_labels
from tests.fixtures.pki import FleetPki

NAME = "classifier"
DEVICE = "models-agent-1"
IMAGE = json.dumps([[[[0.5] * 32] * 32] * 3])
AGENT_ENV = {
    "EDGEFLEET_AGENT_RECONNECT_MAX_S": "1",
    "EDGEFLEET_AGENT_MODEL_PROGRESS_INTERVAL_S": "0.1",
    "EDGEFLEET_AGENT_MODEL_RETRY_MIN_S": "0.2",
    "EDGEFLEET_AGENT_MODEL_RETRY_MAX_S": "1",
    # Several agents may run on one machine in a test run: no fixed local API port.
    "EDGEFLEET_AGENT_LOCAL_API__PORT": "0",
}


@pytest.fixture
def service(fleet_pki: FleetPki) -> Iterator[ModelService]:
    with ModelService(fleet_pki) as running:
        yield running


@pytest.fixture
def state(
    tmp_path: Path, fleet_pki: FleetPki, service: ModelService, broker: RunningBroker
) -> StateDir:
    return make_state_dir(
        tmp_path / "state",
        fleet_pki,
        device_id=DEVICE,
        service_url=service.url,
        mqtt_port=broker.port,
    )


class AgentRunner:
    """Starts ``edgefleet-agent run`` processes on one state dir; kills what is left at the end."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        log = (self.state.root / "agent.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "run", "--state-dir", str(self.state.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **AGENT_ENV, "EDGEFLEET_AGENT_LOG_LEVEL": "DEBUG", **env},
        )
        log.close()
        self.processes.append(process)
        return process

    def log(self) -> str:
        return (self.state.root / "agent.log").read_text(errors="replace")

    async def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        await asyncio.to_thread(process.wait, 20)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def agents(state: StateDir) -> Iterator[AgentRunner]:
    runner = AgentRunner(state)
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
async def control(broker: RunningBroker, fleet_pki: FleetPki) -> AsyncIterator[aiomqtt.Client]:
    """The service's side of MQTT: retains desired state, reads reported state and results."""
    async with broker.client(fleet_pki.service) as client:
        await client.subscribe(device_topic(DEVICE, TopicKind.REPORTED), qos=1)
        await client.subscribe(f"{device_topic(DEVICE, TopicKind.REPORTED)[:-9]}/results/+", qos=1)
        yield client


async def set_desired(client: aiomqtt.Client, generation: int, *models: ModelAssignment) -> None:
    desired = DesiredState(generation=generation, models=list(models))
    await client.publish(
        device_topic(DEVICE, TopicKind.DESIRED), desired.to_payload(), qos=1, retain=True
    )


async def next_matching(
    client: aiomqtt.Client,
    condition: Callable[[ReportedState], bool],
    limit_s: float = 90.0,
) -> ReportedState:
    """The first reported state (retained or new) that satisfies ``condition``."""
    async with asyncio.timeout(limit_s):
        async for message in client.messages:
            if not str(message.topic).endswith("/reported") or not message.payload:
                continue
            assert isinstance(message.payload, bytes)
            reported = decode(ReportedState, message.payload)
            if condition(reported):
                return reported
    raise AssertionError("the message stream ended")


def running(release: int) -> Callable[[ReportedState], bool]:
    def check(reported: ReportedState) -> bool:
        report: ModelReport | None = reported.models.get(NAME)
        return (
            report is not None
            and report.release == release
            and report.phase is ModelPhase.RUNNING
            and report.healthy
        )

    return check


def release(service: ModelService, tmp_path: Path, number: int) -> ModelAssignment:
    weights = build_onnx_classifier(tmp_path / f"r{number}.onnx", seed=number)
    labels = write_labels(tmp_path / "labels.txt")
    return service.publish(
        name=NAME,
        version=f"1.{number}",
        release=number,
        runtime=ModelRuntime.ONNX,
        files=[
            ReleaseFile("model.onnx", FileRole.WEIGHTS, weights.read_bytes()),
            ReleaseFile("labels.txt", FileRole.LABELS, labels.read_bytes()),
        ],
        # Encrypted, so the decrypting steps are among those killed.
        encrypt=True,
    )


@pytest.mark.parametrize("step", list(Step), ids=[s.value for s in Step])
async def test_an_agent_killed_at_each_install_step_restarts_with_a_whole_model(
    step: Step,
    agents: AgentRunner,
    control: aiomqtt.Client,
    service: ModelService,
    state: StateDir,
    tmp_path: Path,
) -> None:
    first = agents.start()
    await set_desired(control, 1, release(service, tmp_path, 1))
    await next_matching(control, running(1))
    await agents.stop(first)

    await set_desired(control, 2, release(service, tmp_path, 2))
    killed = agents.start(**{FAILPOINT_ENV: step.value})
    code = await asyncio.to_thread(killed.wait, 90)
    assert code == FAILPOINT_EXIT_CODE, agents.log()[-3000:]

    # What a power cut at this step leaves: a whole release, the old one or the new one.
    store = ModelStore(state.root)
    active = store.active(NAME)
    assert active is not None, f"no active release after a kill at {step.value}"
    assert active.release in (1, 2) and active.damaged_files() == []
    assert store.floor(NAME) <= active.release

    agents.start()
    reported = await next_matching(control, running(2))
    assert f"models serving from disk: {NAME}@{active.release}" in agents.log()
    assert reported.models[NAME].accepted_release == 2


async def test_an_offline_agent_converges_to_the_desired_state_retained_meanwhile(
    agents: AgentRunner,
    control: aiomqtt.Client,
    service: ModelService,
    tmp_path: Path,
) -> None:
    first = agents.start()
    await set_desired(control, 1, release(service, tmp_path, 1))
    await next_matching(control, running(1))
    await agents.stop(first)

    # Changed while the device is away; the broker retains it for the reconnect.
    await set_desired(control, 2, release(service, tmp_path, 2))
    agents.start()

    reported = await next_matching(control, running(2))
    assert reported.generation == 2 and reported.applied


async def test_an_infer_command_to_a_running_agent_publishes_a_result(
    agents: AgentRunner,
    control: aiomqtt.Client,
    service: ModelService,
    tmp_path: Path,
) -> None:
    agents.start()
    await set_desired(control, 1, release(service, tmp_path, 1))
    await next_matching(control, running(1))

    now = datetime.now(UTC)
    command = CommandMessage(
        id="infer-cmd-0001",
        type="infer",
        params={"model": NAME, "input": IMAGE, "input_ref": "frame-1"},
        issued_at=now,
        expires_at=now + timedelta(minutes=1),
    )
    await control.publish(device_topic(DEVICE, TopicKind.COMMANDS), command.to_payload(), qos=1)

    async with asyncio.timeout(30):
        async for message in control.messages:
            if str(message.topic).endswith(f"/results/{NAME}"):
                assert isinstance(message.payload, bytes)
                result = decode(ResultMessage, message.payload)
                break
    assert result.input_ref == "frame-1" and result.error is None and result.release == 1
