"""Deployment and result commands run on the control-plane host, straight against its database.

The running service's rollout engine picks a new or resumed deployment up within
``rollout_tick_s``, and its dispatcher publishes every desired state changed here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlmodel import Session

from fleet_service import audit
from fleet_service.artifacts import ReleaseSigner
from fleet_service.cli_keys import in_session
from fleet_service.config import ServiceSettings
from fleet_service.deployments import (
    Change,
    create_deployment,
    deployment_public,
    get_deployment,
    list_deployments,
    pause,
    resume,
    rollback,
)
from fleet_service.home import FleetHome
from fleet_service.results import list_results, summarise
from fleet_service.roles import Principal
from fleet_service.schemas import (
    CanarySpec,
    DeploymentCreate,
    DeploymentPublic,
    ResultPublic,
    ResultSummary,
)

__all__ = [
    "FINAL_STATES",
    "act",
    "create",
    "describe",
    "follow",
    "list_all",
    "parse_canary",
    "result_line",
    "results",
    "show",
    "summary",
    "summary_line",
]

# States a deployment does not leave by itself.
FINAL_STATES = frozenset({"completed", "halted", "rolled_back"})
# How often ``follow`` re-reads the deployment: fast enough to look live.
POLL_S = 0.5
ACTOR = Principal.cli()


def parse_canary(text: str) -> CanarySpec:
    """``metric:margin`` or ``metric:margin:min_results`` (ValueError naming the fix)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(
            f"canary {text!r}: write metric:margin[:min_results], e.g. error_rate:0.05"
        )
    fields: dict[str, object] = {"metric": parts[0], "margin": parts[1]}
    if len(parts) == 3:
        fields["min_results"] = parts[2]
    return CanarySpec.model_validate(fields)


def create(settings: ServiceSettings, body: DeploymentCreate) -> DeploymentPublic:
    """Store a deployment; the service's rollout engine sends its first batch."""

    def work(session: Session) -> DeploymentPublic:
        change = create_deployment(session, body, created_by=ACTOR.name)
        assert change.deployment is not None
        session.flush()
        detail = {"release_id": body.release_id, "tag": body.tag, "device_ids": body.device_ids}
        audit.record(session, ACTOR, "deployment.create", change.deployment.id, detail=detail)
        return deployment_public(session, change.deployment)

    return in_session(settings, work)


def show(settings: ServiceSettings, deployment_id: str) -> DeploymentPublic:
    """One deployment with its targets."""
    return in_session(settings, lambda s: get_deployment(s, deployment_id))


def list_all(
    settings: ServiceSettings, model: str | None, state: str | None
) -> list[DeploymentPublic]:
    """Deployments, newest first."""
    return in_session(settings, lambda s: list_deployments(s, model=model, state=state))


def act(settings: ServiceSettings, action: str, deployment_id: str) -> DeploymentPublic:
    """``pause``, ``resume`` or ``rollback`` one deployment."""
    signer = ReleaseSigner.open(FleetHome(settings.home))
    actions: dict[str, Callable[[Session], Change]] = {
        "pause": lambda s: pause(s, deployment_id, by=ACTOR.name),
        "resume": lambda s: resume(s, deployment_id, by=ACTOR.name),
        "rollback": lambda s: rollback(s, signer, deployment_id, by=ACTOR.name),
    }

    def work(session: Session) -> DeploymentPublic:
        change = actions[action](session)
        assert change.deployment is not None
        session.flush()
        audit.record(session, ACTOR, f"deployment.{action}", deployment_id)
        return deployment_public(session, change.deployment)

    return in_session(settings, work)


def follow(settings: ServiceSettings, deployment_id: str, console: Console) -> DeploymentPublic:
    """Show the rollout's progress until the deployment completes, halts or is rolled back."""
    current = show(settings, deployment_id)
    sendable = [t for t in current.targets if t.state != "incompatible"]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=len(sendable))
        while True:
            running = sum(t.state == "running" for t in current.targets)
            progress.update(
                task,
                completed=running,
                description=f"{current.state} batch {current.current_batch}/{current.batch_count}",
            )
            if current.state in FINAL_STATES:
                return current
            time.sleep(POLL_S)
            current = show(settings, deployment_id)


def describe(deployment: DeploymentPublic) -> list[str]:
    """A deployment as lines of text: a header, then one line per target."""
    lines = [
        f"{deployment.id}  {deployment.model_name} {deployment.version} "
        f"(release {deployment.release}, {deployment.release_id})  {deployment.state}  "
        f"batch {deployment.current_batch}/{deployment.batch_count}",
    ]
    if deployment.detail:
        lines.append(f"  {deployment.detail}")
    if deployment.canary is not None:
        canary = deployment.canary
        lines.append(
            f"  canary {canary.metric} margin {canary.margin:g}: {canary.verdict or 'not judged'}"
            f" (new {canary.candidate}, old {canary.baseline})"
        )
    for target in deployment.targets:
        phase = f" [{target.phase}]" if target.phase else ""
        detail = f"  {target.detail}" if target.detail else ""
        lines.append(f"  batch {target.batch}  {target.device_id}  {target.state}{phase}{detail}")
    return lines


def results(
    settings: ServiceSettings, model: str | None, device_id: str | None, limit: int
) -> list[ResultPublic]:
    """The newest results, newest first."""
    return in_session(settings, lambda s: list_results(s, model, device_id, limit))


def summary(
    settings: ServiceSettings, model: str | None, device_id: str | None
) -> list[ResultSummary]:
    """Per (model, version) summaries."""
    return in_session(settings, lambda s: summarise(s, model, device_id))


def result_line(result: ResultPublic) -> str:
    """One result as a line of text."""
    answer = result.label or (result.text or "")[:60]
    outcome = f"error: {result.error}" if result.error else answer
    confidence = f" {result.confidence:.2f}" if result.confidence is not None else ""
    return (
        f"{result.timestamp:%Y-%m-%d %H:%M:%S}  {result.device_id}  {result.model} "
        f"{result.version}  {result.latency_ms:.1f} ms  {outcome}{confidence}"
    )


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def summary_line(row: ResultSummary) -> str:
    """One (model, version) summary as a line of text."""
    return (
        f"{row.model} {row.version}: {row.count} results, {row.errors} errors "
        f"({100 * row.error_rate:.1f}%), p50 {_num(row.p50_latency_ms, ' ms')}, "
        f"p95 {_num(row.p95_latency_ms, ' ms')}, confidence {_num(row.mean_confidence)}, "
        f"tokens/s {_num(row.mean_tokens_per_s)}"
    )
