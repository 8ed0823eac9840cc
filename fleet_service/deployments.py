"""Deployments: put a model release on devices batch by batch, through their desired state.

An operator creates a deployment (targets by device id or tag); each target is checked against
the release's constraints first (:mod:`fleet_service.compatibility`) and an incompatible one is
recorded as such and never sent anything. The rollout itself is driven by
:mod:`fleet_service.rollout`; this module holds what both it and the operator's actions use.

Deployment states: running -> completed, or halted (failures beyond the ratio, a failed
canary, or superseded), paused <-> running by the operator, and rolled_back from any of them
by the operator. Target states: waiting -> sent -> running | failed -> rolled_back, or
incompatible from the start.

A new deployment of a model halts every running or paused deployment of the same model that
shares a device with it: the new one takes over the shared devices; the old one sends nothing
more, and its devices the new one does not name keep what they were sent.

Every change of a device's desired state goes through :mod:`fleet_service.desired`, so it is
published retained and a device that is offline converges when it returns.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import update
from sqlmodel import Session, col, select

from fleet_protocol import (
    InferenceSchedule,
    ModelAssignment,
    ModelPhase,
    ModelReport,
    SignedManifest,
)
from fleet_service.artifacts.releases import resign_release, signed_manifest_of
from fleet_service.artifacts.signing import ReleaseSigner
from fleet_service.compatibility import incompatibilities
from fleet_service.desired import (
    assign_model,
    desired_assignments,
    desired_release_id,
    model_assignment,
    remove_model,
)
from fleet_service.errors import ConflictError, ForbiddenError, NotFoundError, ServiceError
from fleet_service.registry import Scope, in_scope
from fleet_service.schemas import (
    CanaryPublic,
    DeploymentCreate,
    DeploymentPreview,
    DeploymentPublic,
    DeploymentTargetPublic,
    IncompatibleDevice,
)
from fleet_service.tables import Deployment, DeploymentTarget, Device, ModelRelease

__all__ = [
    "ACTIVE_STATES",
    "Change",
    "claim",
    "create_deployment",
    "deployment_public",
    "failure_counts",
    "get_deployment",
    "list_deployments",
    "pause",
    "preview",
    "report_phase",
    "resume",
    "roll_back_target",
    "rollback",
    "send_target",
    "target_report",
]

ACTIVE_STATES = ("running", "paused")
# Target states after which the device was sent the release.
SENT_STATES = ("sent", "running", "failed", "rolled_back")


@dataclass
class Change:
    """What an action did, for the caller to publish after commit."""

    deployment: Deployment | None = None
    devices: set[str] = field(default_factory=set)


def _now() -> datetime:
    return datetime.now(UTC)


def claim(session: Session, deployment_id: str, *, skip_locked: bool = False) -> Deployment | None:
    """Lock one deployment row for this transaction (None if ``skip_locked`` and another
    process holds it, or when it does not exist)."""
    if session.get_bind().dialect.name == "sqlite":
        # pysqlite opens a transaction only at the first write, so SELECT ... FOR UPDATE means
        # nothing there: a no-op write takes SQLite's single write lock now, and every read
        # that follows sees a state no other process can change before this one commits.
        session.execute(
            update(Deployment)
            .where(col(Deployment.id) == deployment_id)
            .values(updated_at=Deployment.updated_at)
        )
        return session.get(Deployment, deployment_id, populate_existing=True)
    query = (
        select(Deployment)
        .where(col(Deployment.id) == deployment_id)
        .with_for_update(skip_locked=skip_locked)
        .execution_options(populate_existing=True)
    )
    return session.exec(query).first()


def _visible(session: Session, deployment: Deployment, scope: Scope) -> bool:
    """A tag-scoped caller sees a deployment only when every device it targets is theirs."""
    if scope is None or scope.tag is None:
        return True
    ids = list(deployment.target_device_ids or [])
    devices = session.exec(select(Device).where(col(Device.id).in_(ids))).all()
    return len(devices) == len(ids) and all(in_scope(d, scope) for d in devices)


def _claim_or_404(session: Session, deployment_id: str, scope: Scope = None) -> Deployment:
    deployment = claim(session, deployment_id)
    if deployment is None or not _visible(session, deployment, scope):
        raise NotFoundError(f"deployment {deployment_id!r} does not exist")
    return deployment


def _release(session: Session, release_id: str) -> ModelRelease:
    release = session.get(ModelRelease, release_id)
    if release is None:
        raise NotFoundError(
            f"release {release_id!r} does not exist; `edgefleet models list` shows the releases"
        )
    return release


def _manifest(release: ModelRelease) -> SignedManifest:
    return signed_manifest_of(release)


def _target_devices(session: Session, body: DeploymentCreate, scope: Scope) -> list[Device]:
    if scope is not None and scope.tag is not None and body.tag is not None:
        own = "=".join(scope.tag)
        if body.tag != own:
            raise ForbiddenError(
                f"{scope.name} is limited to devices tagged {own}: deploy to tag {own} (or to "
                f"device ids carrying it), not to {body.tag}"
            )
    if body.tag is not None:
        key, _, value = body.tag.partition("=")
        rows = session.exec(select(Device).order_by(col(Device.id)))
        devices = [d for d in rows if d.tags.get(key) == value and in_scope(d, scope)]
        if not devices:
            raise NotFoundError(f"no device carries the tag {body.tag!r}")
        return devices
    wanted = list(dict.fromkeys(body.device_ids or []))
    found = {
        d.id: d
        for d in session.exec(select(Device).where(col(Device.id).in_(wanted)))
        if in_scope(d, scope)
    }
    missing = [device_id for device_id in wanted if device_id not in found]
    if missing:
        raise NotFoundError(f"not enrolled: {', '.join(missing)}; `edgefleet devices list`")
    return [found[device_id] for device_id in wanted]


def _verdicts(
    session: Session, body: DeploymentCreate, scope: Scope = None
) -> tuple[ModelRelease, list[Device], list[tuple[Device, list[str]]]]:
    release = _release(session, body.release_id)
    if release.expires_at <= _now():
        raise ServiceError(
            f"release {release.id} ({release.name} {release.version}) expired at "
            f"{release.expires_at:%Y-%m-%d %H:%M %Z}; devices would refuse it: upload it again",
            status=422,
        )
    manifest = _manifest(release).manifest
    devices = _target_devices(session, body, scope)
    verdicts = [(d, incompatibilities(manifest, d.latest_telemetry)) for d in devices]
    compatible = [d for d, reasons in verdicts if not reasons]
    if (
        compatible
        and body.canary is not None
        and not any(
            desired_release_id(d, release.name) not in (None, release.id)
            for d in compatible[: body.batch_size]
        )
    ):
        raise ServiceError(
            f"a canary compares the new release with the one it replaces, but no device of the "
            f"first batch runs {release.name} yet; deploy without a canary",
            status=422,
        )
    return release, compatible, verdicts


def preview(session: Session, body: DeploymentCreate, *, scope: Scope = None) -> DeploymentPreview:
    """Which targets can take the release, and why the others cannot; nothing is stored."""
    release, compatible, verdicts = _verdicts(session, body, scope)
    return DeploymentPreview(
        release_id=release.id,
        compatible=[d.id for d in compatible],
        incompatible=[
            IncompatibleDevice(device_id=d.id, reasons=reasons)
            for d, reasons in verdicts
            if reasons
        ],
    )


def create_deployment(
    session: Session, body: DeploymentCreate, *, created_by: str, scope: Scope = None
) -> Change:
    """Store a deployment (targets within ``scope`` only); the rollout engine sends its first
    batch on its next tick."""
    release, compatible, verdicts = _verdicts(session, body, scope)
    if not compatible:
        why = "; ".join(f"{d.id}: {', '.join(r)}" for d, r in verdicts)
        raise ServiceError(
            f"no target can take {release.name} {release.version}: {why}", status=422
        )
    now = _now()
    deployment = Deployment(
        id="dep-" + secrets.token_hex(8),
        release_id=release.id,
        model_name=release.name,
        target_tag=body.tag,
        target_device_ids=[d.id for d, _ in verdicts],
        batch_size=body.batch_size,
        pause_s=body.pause_s,
        max_failure_ratio=body.max_failure_ratio,
        canary=body.canary.model_dump() if body.canary else None,
        schedules=[s.model_dump(mode="json", exclude_none=True) for s in body.schedules],
        state="running",
        current_batch=0,
        next_batch_at=now,
        detail="starting: batch 1 is sent on the next rollout tick",
        created_by=created_by,
        created_at=now,
        updated_at=now,
    )
    session.add(deployment)
    session.flush()
    for index, device in enumerate(compatible):
        session.add(
            DeploymentTarget(
                deployment_id=deployment.id,
                device_id=device.id,
                batch=index // body.batch_size + 1,
                state="waiting",
                updated_at=now,
            )
        )
    for device, reasons in verdicts:
        if reasons:
            session.add(
                DeploymentTarget(
                    deployment_id=deployment.id,
                    device_id=device.id,
                    batch=0,
                    state="incompatible",
                    detail="; ".join(reasons),
                    updated_at=now,
                )
            )
    _supersede(session, deployment, {d.id for d in compatible}, now)
    session.flush()
    return Change(deployment)


def _supersede(session: Session, new: Deployment, device_ids: set[str], now: datetime) -> None:
    """Halt running or paused deployments of the same model that share a device with ``new``."""
    others = session.exec(
        select(Deployment.id).where(
            Deployment.model_name == new.model_name,
            col(Deployment.state).in_(ACTIVE_STATES),
            Deployment.id != new.id,
        )
    ).all()
    for other_id in others:
        other = claim(session, other_id)
        if other is None or other.state not in ACTIVE_STATES:
            continue
        shared = [t for t in _targets(session, other.id) if t.device_id in device_ids]
        if not shared:
            continue
        other.state = "halted"
        other.detail = (
            f"superseded by {new.id} ({len(shared)} shared device(s) now follow it); "
            "nothing more is sent"
        )
        other.updated_at = now
        session.add(other)


def _targets(session: Session, deployment_id: str) -> list[DeploymentTarget]:
    return list(
        session.exec(
            select(DeploymentTarget)
            .where(DeploymentTarget.deployment_id == deployment_id)
            .order_by(col(DeploymentTarget.batch), col(DeploymentTarget.device_id))
        )
    )


def target_report(
    device: Device | None, deployment: Deployment, target: DeploymentTarget
) -> ModelReport | None:
    """The device's report about this deployment's release, once it has seen the desired
    generation that carried it; None before that."""
    if device is None or target.sent_generation is None:
        return None
    if device.reported_generation is None or device.reported_generation < target.sent_generation:
        return None
    raw = (device.reported_models or {}).get(deployment.model_name)
    if raw is None:
        return None
    report = ModelReport.model_validate(raw)
    return report if report.release_id == deployment.release_id else None


def send_target(
    session: Session,
    deployment: Deployment,
    release: ModelRelease,
    target: DeploymentTarget,
    now: datetime,
) -> str | None:
    """Set the target device's desired model to the release; the device id, or None when it
    could not be (the target is then failed with the reason)."""
    device = session.get(Device, target.device_id)
    previous = desired_release_id(device, release.name) if device is not None else None
    try:
        device = assign_model(session, target.device_id, _assignment(deployment, release))
    except ServiceError as exc:
        target.state, target.detail, target.updated_at = "failed", exc.detail, now
        session.add(target)
        return None
    # Kept even when it is this release (a redeploy, say with new schedules): a rollback then
    # leaves the device on it instead of taking the model away.
    target.previous_release_id = previous
    target.state = "sent"
    target.sent_generation = device.desired_generation
    target.detail = None
    target.updated_at = now
    session.add(target)
    return device.id


def _assignment(deployment: Deployment, release: ModelRelease) -> ModelAssignment:
    schedules = [InferenceSchedule.model_validate(s) for s in deployment.schedules or []]
    return model_assignment(release, schedules)


def roll_back_target(
    session: Session,
    signer: ReleaseSigner,
    deployment: Deployment,
    target: DeploymentTarget,
    resigned: dict[str, ModelRelease],
    *,
    by: str,
    now: datetime,
) -> str | None:
    """Put the device back on the release it ran before this deployment, re-signed with a new
    release number so it passes the device's downgrade floor (or take the model out of its
    desired state when there was none). ``resigned`` caches one re-signing per previous release.
    Returns the device id when its desired state changed."""
    device = session.get(Device, target.device_id)
    if device is None:
        return None
    current = desired_release_id(device, deployment.model_name)
    previous = target.previous_release_id
    if current != deployment.release_id or previous == deployment.release_id:
        # Another deployment (or a rollback already done) owns this device's model now, or the
        # device ran this very release before: either way there is nothing to go back to. The
        # target is closed, so later ticks do not come back to it.
        why = (
            f"it now follows {current}"
            if current != deployment.release_id
            else "it ran this release before the deployment"
        )
        target.state = "rolled_back"
        target.detail = _join(target.detail, f"left as it is: {why}")
        target.updated_at = now
        session.add(target)
        return None
    schedules = next(
        (a.schedules for a in desired_assignments(device) if a.name == deployment.model_name), []
    )
    if previous is None:
        device = remove_model(session, device.id, deployment.model_name)
        note = f"rolled back: {deployment.model_name} removed (it had no earlier release)"
    else:
        release = resigned.get(previous)
        if release is None:
            release = resign_release(session, signer, previous, created_by=by)
            resigned[previous] = release
        device = assign_model(session, device.id, model_assignment(release, schedules))
        note = (
            f"rolled back to {release.version} (release {previous} re-signed as release "
            f"{release.release}, {release.id})"
        )
    target.state = "rolled_back"
    target.sent_generation = device.desired_generation
    target.detail = _join(target.detail, note)
    target.updated_at = now
    session.add(target)
    return device.id


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second


def deployment_public(session: Session, deployment: Deployment) -> DeploymentPublic:
    """The API shape of a deployment with its targets and their reported progress."""
    release = session.get(ModelRelease, deployment.release_id)
    assert release is not None  # a foreign key
    targets = _targets(session, deployment.id)
    ids = [t.device_id for t in targets]
    devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))}
    rows = []
    for target in targets:
        report = target_report(devices.get(target.device_id), deployment, target)
        rows.append(
            DeploymentTargetPublic(
                device_id=target.device_id,
                batch=target.batch,
                state=target.state,  # only the literals are stored
                detail=target.detail,
                previous_release_id=target.previous_release_id,
                phase=report.phase.value if report else None,
                bytes_done=report.bytes_done if report else 0,
                bytes_total=report.bytes_total if report else 0,
                updated_at=target.updated_at,
            )
        )
    return DeploymentPublic(
        id=deployment.id,
        release_id=deployment.release_id,
        model_name=deployment.model_name,
        version=release.version,
        release=release.release,
        target_tag=deployment.target_tag,
        state=deployment.state,  # only the literals are stored
        current_batch=deployment.current_batch,
        batch_count=max((t.batch for t in targets), default=0),
        batch_size=deployment.batch_size,
        pause_s=deployment.pause_s,
        max_failure_ratio=deployment.max_failure_ratio,
        canary=CanaryPublic.model_validate(deployment.canary) if deployment.canary else None,
        schedules=list(deployment.schedules or []),  # validated on the way in
        detail=deployment.detail,
        next_batch_at=deployment.next_batch_at,
        created_by=deployment.created_by,
        created_at=deployment.created_at,
        updated_at=deployment.updated_at,
        targets=rows,
    )


def get_deployment(
    session: Session, deployment_id: str, *, scope: Scope = None
) -> DeploymentPublic:
    """One deployment (within ``scope``), or :class:`NotFoundError`."""
    deployment = session.get(Deployment, deployment_id)
    if deployment is None or not _visible(session, deployment, scope):
        raise NotFoundError(f"deployment {deployment_id!r} does not exist")
    return deployment_public(session, deployment)


def list_deployments(
    session: Session,
    *,
    model: str | None = None,
    state: str | None = None,
    limit: int = 100,
    scope: Scope = None,
) -> list[DeploymentPublic]:
    """Newest first, optionally of one model and in one state; only those within ``scope``."""
    query = select(Deployment).order_by(col(Deployment.created_at).desc())
    if model is not None:
        query = query.where(Deployment.model_name == model)
    if state is not None:
        query = query.where(Deployment.state == state)
    if scope is None or scope.tag is None:
        rows = list(session.exec(query.limit(limit)))
    else:
        rows = [d for d in session.exec(query) if _visible(session, d, scope)][:limit]
    return [deployment_public(session, d) for d in rows]


def pause(session: Session, deployment_id: str, *, by: str, scope: Scope = None) -> Change:
    """Stop sending new batches; devices already sent keep going and keep reporting."""
    deployment = _claim_or_404(session, deployment_id, scope)
    if deployment.state != "running":
        raise ConflictError(
            f"deployment {deployment_id} is {deployment.state}; only a running one can be paused"
        )
    deployment.state = "paused"
    deployment.detail = f"paused by {by} at batch {deployment.current_batch}"
    deployment.updated_at = _now()
    session.add(deployment)
    return Change(deployment)


def resume(session: Session, deployment_id: str, *, by: str, scope: Scope = None) -> Change:
    """Carry on a paused deployment where it stopped."""
    deployment = _claim_or_404(session, deployment_id, scope)
    if deployment.state != "paused":
        raise ConflictError(
            f"deployment {deployment_id} is {deployment.state}; only a paused one can be resumed"
        )
    deployment.state = "running"
    deployment.detail = f"resumed by {by} at batch {deployment.current_batch}"
    deployment.updated_at = _now()
    session.add(deployment)
    return Change(deployment)


def rollback(
    session: Session, signer: ReleaseSigner, deployment_id: str, *, by: str, scope: Scope = None
) -> Change:
    """Put every device this deployment sent the release to back on its previous release."""
    deployment = _claim_or_404(session, deployment_id, scope)
    if deployment.state == "rolled_back":
        raise ConflictError(f"deployment {deployment_id} is already rolled back")
    now = _now()
    change = Change(deployment)
    resigned: dict[str, ModelRelease] = {}
    targets = [
        t for t in _targets(session, deployment.id) if t.state in ("sent", "running", "failed")
    ]
    for target in sorted(targets, key=lambda t: t.device_id):
        device_id = roll_back_target(session, signer, deployment, target, resigned, by=by, now=now)
        if device_id is not None:
            change.devices.add(device_id)
    deployment.state = "rolled_back"
    deployment.detail = f"rolled back by {by}: {len(change.devices)} device(s) sent back"
    deployment.updated_at = now
    session.add(deployment)
    return change


def failure_counts(targets: list[DeploymentTarget]) -> tuple[int, int]:
    """(failed, sent) over the targets sent so far; a rolled-back one failed first."""
    states = Counter(t.state for t in targets if t.state in SENT_STATES)
    return states["failed"] + states["rolled_back"], sum(states.values())


def report_phase(report: ModelReport | None) -> str:
    """A few words on where a device is with the release, for details."""
    if report is None:
        return "not reported yet"
    if report.phase is ModelPhase.DOWNLOADING and report.bytes_total:
        return f"downloading {100 * report.bytes_done // report.bytes_total}%"
    return report.phase.value
