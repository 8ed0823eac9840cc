"""The rollout engine: move each running deployment forward from what its devices report.

One named task per service process ticks every ``rollout_tick_s`` (or at once when woken). A
tick takes each active deployment in its own transaction with its row locked (``SKIP LOCKED``
on PostgreSQL, so several replicas share the work without doing it twice; SQLite has one
writer anyway), and then:

1. updates each sent target from its device's report of this release: ``running`` once the
   device says running and healthy, ``failed`` once it says failed or refused;
2. when the current batch is resolved (no target still ``sent``): if failures over the targets
   sent so far exceed ``max_failure_ratio``, halts and rolls the failed devices back; else rolls
   back the tolerated failures, judges the canary gate after batch one, and after ``pause_s``
   sends the next batch, or completes after the last.

A paused deployment still follows its devices' reports but decides nothing until resumed. A
batch waits for offline devices: their retained desired state reaches them when they return.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from fleet_protocol import ModelPhase
from fleet_protocol.logs import log_context
from fleet_service.artifacts.releases import signed_manifest_of
from fleet_service.artifacts.signing import ReleaseSigner
from fleet_service.background import background_task
from fleet_service.canary import judge
from fleet_service.db import session_scope
from fleet_service.deployments import (
    ACTIVE_STATES,
    claim,
    deployment_public,
    failure_counts,
    report_phase,
    roll_back_target,
    send_target,
    target_report,
)
from fleet_service.events import EventHub
from fleet_service.schemas import CanaryPublic, CanarySpec, DeploymentPublic
from fleet_service.tables import Deployment, DeploymentTarget, Device, ModelRelease

__all__ = ["RolloutEngine", "advance"]

logger = logging.getLogger(__name__)

# Who a rollback the engine decides is booked to (ModelRelease.created_by of the re-signing).
ENGINE_ACTOR = "rollout"


@dataclass
class Advanced:
    """What one tick did to one deployment."""

    changed: bool = False
    devices: set[str] = field(default_factory=set)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "0%"


class _Step:
    """One deployment's tick, inside its locked transaction."""

    def __init__(
        self, session: Session, signer: ReleaseSigner, deployment: Deployment, now: datetime
    ) -> None:
        self.session = session
        self.signer = signer
        self.deployment = deployment
        self.now = now
        self.result = Advanced()
        release = session.get(ModelRelease, deployment.release_id)
        assert release is not None  # a foreign key
        self.release = release
        self.targets = list(
            session.exec(
                select(DeploymentTarget)
                .where(DeploymentTarget.deployment_id == deployment.id)
                .order_by(col(DeploymentTarget.batch), col(DeploymentTarget.device_id))
            )
        )
        ids = [t.device_id for t in self.targets]
        self.devices = {
            d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))
        }
        self.batch_count = max((t.batch for t in self.targets), default=0)

    def set_state(self, state: str, detail: str) -> None:
        deployment = self.deployment
        if (deployment.state, deployment.detail) != (state, detail):
            deployment.state, deployment.detail = state, detail
            self.result.changed = True

    def follow_reports(self) -> None:
        for target in self.targets:
            if target.state != "sent":
                continue
            report = target_report(self.devices.get(target.device_id), self.deployment, target)
            if report is None:
                continue
            if report.phase is ModelPhase.RUNNING and report.healthy:
                target.state, target.detail = "running", None
            elif report.phase in (ModelPhase.FAILED, ModelPhase.REFUSED):
                target.state = "failed"
                target.detail = report.detail or f"the device reported {report.phase.value}"
            else:
                continue
            target.updated_at = self.now
            self.session.add(target)
            self.result.changed = True

    def in_batch(self, batch: int) -> list[DeploymentTarget]:
        return [t for t in self.targets if t.batch == batch]

    def send_batch(self, batch: int) -> None:
        deployment = self.deployment
        for target in self.in_batch(batch):
            if target.state == "waiting":
                device_id = send_target(self.session, deployment, self.release, target, self.now)
                if device_id is not None:
                    self.result.devices.add(device_id)
        deployment.current_batch = batch
        deployment.batch_started_at = self.now
        deployment.next_batch_at = None
        self.result.changed = True
        self.set_state(
            "running", f"batch {batch} of {self.batch_count} sent to {len(self.in_batch(batch))}"
        )

    def roll_back(self, targets: list[DeploymentTarget]) -> None:
        resigned: dict[str, ModelRelease] = {}
        for target in sorted(targets, key=lambda t: t.device_id):
            device_id = roll_back_target(
                self.session,
                self.signer,
                self.deployment,
                target,
                resigned,
                by=ENGINE_ACTOR,
                now=self.now,
            )
            if device_id is not None:
                self.result.devices.add(device_id)
        self.result.changed = self.result.changed or bool(targets)

    def waiting_detail(self, batch: list[DeploymentTarget]) -> str:
        pending = [t for t in batch if t.state == "sent"]
        running = sum(t.state == "running" for t in batch)
        shown = []
        for target in pending[:5]:
            device = self.devices.get(target.device_id)
            where = report_phase(target_report(device, self.deployment, target))
            if device is not None and device.status != "online":
                where = f"{device.status}, {where}"
            shown.append(f"{target.device_id} ({where})")
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        return (
            f"batch {self.deployment.current_batch} of {self.batch_count}: {running} of "
            f"{len(batch)} running; waiting for {', '.join(shown)}{more}"
        )

    def run(self) -> Advanced:
        deployment = self.deployment
        self.follow_reports()
        if deployment.state == "paused":
            return self.result
        if deployment.current_batch == 0:
            self.send_batch(1)
            return self.result
        batch = self.in_batch(deployment.current_batch)
        if any(t.state == "sent" for t in batch):
            self.set_state("running", self.waiting_detail(batch))
            return self.result
        if not self.check_failures():
            return self.result
        if deployment.current_batch == 1 and deployment.canary and not self.canary_passed():
            return self.result
        if deployment.current_batch >= self.batch_count:
            running = sum(t.state == "running" for t in self.targets)
            self.set_state("completed", f"completed: {running} device(s) run {self.version}")
            return self.result
        if deployment.next_batch_at is None:
            deployment.next_batch_at = self.now + timedelta(seconds=deployment.pause_s)
            self.result.changed = True
        if self.now >= deployment.next_batch_at:
            self.send_batch(deployment.current_batch + 1)
        else:
            self.set_state(
                "running",
                f"batch {deployment.current_batch} of {self.batch_count} resolved; batch "
                f"{deployment.current_batch + 1} at {deployment.next_batch_at:%H:%M:%S %Z}",
            )
        return self.result

    @property
    def version(self) -> str:
        return f"{self.release.name} {self.release.version}"

    def check_failures(self) -> bool:
        """Roll back this batch's failures; False (and halted) when beyond the ratio."""
        deployment = self.deployment
        sent_so_far = [t for t in self.targets if 1 <= t.batch <= deployment.current_batch]
        failed, sent = failure_counts(sent_so_far)
        newly_failed = [t for t in self.in_batch(deployment.current_batch) if t.state == "failed"]
        self.roll_back(newly_failed)
        if sent and failed / sent > deployment.max_failure_ratio:
            self.set_state(
                "halted",
                f"halted at batch {deployment.current_batch}: {failed} of {sent} device(s) "
                f"failed ({_pct(failed, sent)}), above the allowed "
                f"{_pct(round(deployment.max_failure_ratio * 100), 100)}; the failed devices "
                "were rolled back",
            )
            return False
        return True

    def canary_passed(self) -> bool:
        """Judge the gate (once it has passed it stays passed); False while waiting or failed."""
        deployment = self.deployment
        assert deployment.canary is not None
        state = CanaryPublic.model_validate(deployment.canary)
        if state.verdict == "passed":
            return True
        batch = [t for t in self.in_batch(1) if t.state in ("sent", "running")]
        baseline = self.baseline_sha256()
        problem = None
        if not batch:
            problem = "no device of batch 1 runs the new release"
        elif baseline is None:
            problem = "no device of batch 1 ran an earlier release to compare with"
        if problem is not None or baseline is None:
            deployment.canary = state.model_copy(update={"verdict": "failed"}).model_dump()
            self.set_state("halted", f"canary failed: {problem}")
            return False
        judgement = judge(
            self.session,
            CanarySpec(metric=state.metric, margin=state.margin, min_results=state.min_results),
            model=self.release.name,
            candidate_release=self.release.release,
            candidate_devices=[t.device_id for t in batch],
            since=deployment.batch_started_at or deployment.created_at,
            baseline_sha256=baseline,
        )
        updated = state.model_copy(
            update={
                "verdict": judgement.verdict,
                "baseline": judgement.baseline,
                "candidate": judgement.candidate,
                "baseline_results": judgement.baseline_results,
                "candidate_results": judgement.candidate_results,
            }
        )
        if updated != state:
            deployment.canary = updated.model_dump()
            self.result.changed = True
        if judgement.verdict == "failed":
            self.roll_back([t for t in self.in_batch(1) if t.state in ("sent", "running")])
            self.set_state("halted", f"{judgement.detail}; batch 1 was rolled back")
            return False
        if judgement.verdict == "waiting":
            self.set_state("running", judgement.detail)
            return False
        self.set_state("running", judgement.detail)
        return True

    def baseline_sha256(self) -> str | None:
        """Weights of the release batch one replaces (the most common previous release)."""
        previous = _most_common(
            [
                t.previous_release_id
                for t in self.in_batch(1)
                if t.previous_release_id not in (None, self.deployment.release_id)
            ]
        )
        if previous is None:
            return None
        release = self.session.get(ModelRelease, previous)
        if release is None:
            return None
        return signed_manifest_of(release).manifest.weights.sha256


def _most_common(values: list[str]) -> str | None:
    common = Counter(values).most_common(1)
    return common[0][0] if common else None


def advance(
    session: Session, signer: ReleaseSigner, deployment: Deployment, now: datetime
) -> Advanced:
    """One tick of ``deployment`` (locked by the caller)."""
    result = _Step(session, signer, deployment, now).run()
    if result.changed:
        deployment.updated_at = now
        session.add(deployment)
    return result


class RolloutEngine:
    """Owns the ``rollout-engine`` loop; ``wake()`` after creating or resuming a deployment."""

    def __init__(
        self,
        engine: Engine,
        signer: ReleaseSigner,
        hub: EventHub,
        *,
        tick_s: float,
        desired_changed: Callable[[str], None],
    ) -> None:
        self._engine = engine
        self._signer = signer
        self._hub = hub
        self._tick_s = tick_s
        self._desired_changed = desired_changed
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Tick now rather than at the next interval."""
        self._wakeup.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RolloutEngine]:
        """Run the loop until the context exits."""
        async with background_task("rollout-engine", self._run):
            yield self

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                await self.tick()
            except Exception:  # supervisor loop: log and keep rolling out
                logger.exception("rollout tick failed; retrying")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._tick_s)

    async def tick(self) -> None:
        """Advance every active deployment once."""
        ids = await asyncio.to_thread(self._active_ids)
        for deployment_id in ids:
            try:
                with log_context(deployment_id=deployment_id):  # copied into the thread too
                    outcome = await asyncio.to_thread(self._advance_one, deployment_id)
            except Exception:  # one deployment's failure must not hold up the ones after it
                logger.exception(
                    "advancing deployment %s failed; retrying next tick", deployment_id
                )
                continue
            if outcome is None:
                continue
            public, devices = outcome
            for device_id in devices:
                self._desired_changed(device_id)
            self._hub.publish("deployment", public)

    def _active_ids(self) -> list[str]:
        with session_scope(self._engine) as session:
            query = select(Deployment.id).where(col(Deployment.state).in_(ACTIVE_STATES))
            return list(session.exec(query.order_by(col(Deployment.created_at))))

    def _advance_one(self, deployment_id: str) -> tuple[DeploymentPublic, set[str]] | None:
        try:
            with session_scope(self._engine) as session:
                deployment = claim(session, deployment_id, skip_locked=True)
                if deployment is None or deployment.state not in ACTIVE_STATES:
                    return None  # another replica has it, or it just ended
                result = advance(session, self._signer, deployment, datetime.now(UTC))
                if not result.changed:
                    return None
                session.flush()
                return deployment_public(session, deployment), result.devices
        except OperationalError as exc:
            if self._engine.dialect.name != "sqlite":
                raise
            # SQLite's one writer was busy past its timeout: the next tick tries again.
            logger.warning("deployment %s not advanced this tick: %s", deployment_id, exc)
            return None
