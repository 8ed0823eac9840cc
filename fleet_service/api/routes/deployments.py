"""Deployments: preview, create, follow, pause, resume and roll back model rollouts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from fleet_service.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from fleet_service.audit import record
from fleet_service.context import ServiceContext
from fleet_service.deployments import (
    Change,
    create_deployment,
    deployment_public,
    get_deployment,
    list_deployments,
    pause,
    preview,
    resume,
    rollback,
)
from fleet_service.schemas import (
    DeploymentCreate,
    DeploymentPreview,
    DeploymentPublic,
    DeploymentState,
)

__all__ = ["router"]

router = APIRouter(prefix="/deployments", tags=["deployments"])


def _announce(context: ServiceContext, public: DeploymentPublic, change: Change) -> None:
    # After the commit: the dispatcher and the engine read what was stored.
    for device_id in change.devices:
        context.desired_changed(device_id)
    context.wake_rollouts()
    context.hub.publish("deployment", public)


@router.post("/preview", name="deployment.preview")
def preview_deployment(
    body: DeploymentCreate, session: SessionDep, operator: OperatorDep
) -> DeploymentPreview:
    """Which targets can take the release and why the others cannot; nothing is sent."""
    return preview(session, body, scope=operator)


@router.post("", status_code=status.HTTP_201_CREATED, name="deployment.create")
def create(
    body: DeploymentCreate, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> DeploymentPublic:
    """Start rolling a release out; incompatible targets are recorded and never sent."""
    change = create_deployment(session, body, created_by=operator.name, scope=operator)
    assert change.deployment is not None
    public = deployment_public(session, change.deployment)
    detail = {
        "release_id": public.release_id,
        "model": public.model_name,
        "version": public.version,
        "tag": public.target_tag,
        "devices": [t.device_id for t in public.targets][:100],
    }
    record(session, operator, "deployment.create", public.id, detail=detail)
    session.commit()
    _announce(context, public, change)
    return public


@router.get("")
def list_all(
    session: SessionDep,
    viewer: ViewerDep,
    model: str | None = None,
    state: DeploymentState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DeploymentPublic]:
    """Deployments, newest first; filter by model and by state."""
    return list_deployments(session, model=model, state=state, limit=limit, scope=viewer)


@router.get("/{deployment_id}")
def one(deployment_id: str, session: SessionDep, viewer: ViewerDep) -> DeploymentPublic:
    """One deployment with every target's progress."""
    return get_deployment(session, deployment_id, scope=viewer)


@router.post("/{deployment_id}/pause", name="deployment.pause")
def pause_deployment(
    deployment_id: str, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> DeploymentPublic:
    """Send no further batch until resumed (409 unless running)."""
    change = pause(session, deployment_id, by=operator.name, scope=operator)
    assert change.deployment is not None
    public = deployment_public(session, change.deployment)
    record(session, operator, "deployment.pause", deployment_id)
    session.commit()
    _announce(context, public, change)
    return public


@router.post("/{deployment_id}/resume", name="deployment.resume")
def resume_deployment(
    deployment_id: str, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> DeploymentPublic:
    """Carry on a paused deployment (409 unless paused)."""
    change = resume(session, deployment_id, by=operator.name, scope=operator)
    assert change.deployment is not None
    public = deployment_public(session, change.deployment)
    record(session, operator, "deployment.resume", deployment_id)
    session.commit()
    _announce(context, public, change)
    return public


@router.post("/{deployment_id}/rollback", name="deployment.rollback")
def rollback_deployment(
    deployment_id: str, context: ContextDep, session: SessionDep, operator: OperatorDep
) -> DeploymentPublic:
    """Put every device the release was sent to back on its previous release (re-signed)."""
    change = rollback(session, context.signer, deployment_id, by=operator.name, scope=operator)
    assert change.deployment is not None
    session.flush()
    public = deployment_public(session, change.deployment)
    detail = {"devices": sorted(change.devices)[:100]}
    record(session, operator, "deployment.rollback", deployment_id, detail=detail)
    session.commit()
    _announce(context, public, change)
    return public
