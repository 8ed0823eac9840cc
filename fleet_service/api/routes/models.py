"""Model releases: upload one (multipart, streamed to disk), list them, read one."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet_protocol.manifest import MODEL_NAME_PATTERN, FileRole
from fleet_service.api.deps import ContextDep, OperatorDep, SessionDep, ViewerDep
from fleet_service.artifacts import (
    ReleaseFile,
    ReleaseInvalidError,
    artifacts_dir,
    constraints_from,
    create_release,
    get_release,
    list_releases,
    release_public,
)
from fleet_service.artifacts.uploads import ReceivedUpload, receive_multipart
from fleet_service.audit import record
from fleet_service.context import ServiceContext
from fleet_service.db import session_scope
from fleet_service.roles import Principal
from fleet_service.schemas import ModelReleasePublic

__all__ = ["ModelUploadForm", "router"]

router = APIRouter(prefix="/models", tags=["models"])

FILE_PARTS = ("weights", "tokenizer", "labels", "config")


class ModelUploadForm(BaseModel):
    """The text fields of ``POST /api/v1/models``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    runtime: str
    architectures: str = ""  # comma-separated; empty means any
    min_ram_bytes: Annotated[int, Field(ge=0)] = 0
    min_disk_bytes: Annotated[int, Field(ge=0)] = 0
    # Devices refuse an expired manifest; a rollback re-signs, so a year is a safe default.
    expires_in_days: Annotated[int, Field(ge=1, le=3650)] = 365
    encrypt: bool = False


_FIELDS = tuple(ModelUploadForm.model_fields)
_PART_SCHEMA = {"type": "string", "format": "binary"}
_UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "version", "runtime", "weights"],
                    "properties": {
                        **{
                            name: {"type": "string"}
                            for name in ("name", "version", "runtime", "architectures")
                        },
                        "min_ram_bytes": {"type": "integer", "minimum": 0},
                        "min_disk_bytes": {"type": "integer", "minimum": 0},
                        "expires_in_days": {
                            "type": "integer",
                            "default": 365,
                            "minimum": 1,
                            "maximum": 3650,
                        },
                        "encrypt": {"type": "boolean", "default": False},
                        **dict.fromkeys(FILE_PARTS, _PART_SCHEMA),
                    },
                }
            }
        },
    }
}


def _form(upload: ReceivedUpload) -> ModelUploadForm:
    try:
        return ModelUploadForm.model_validate(upload.fields)
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        raise RequestValidationError(errors) from exc


def _store(
    context: ServiceContext, form: ModelUploadForm, upload: ReceivedUpload, operator: Principal
) -> ModelReleasePublic:
    files = [
        ReleaseFile(path=received.path, role=FileRole(part), name=received.filename)
        for part, received in upload.files.items()
    ]
    now = datetime.now(UTC)
    constraints = constraints_from(
        form.architectures.split(","), form.min_ram_bytes, form.min_disk_bytes
    )
    with session_scope(context.engine) as session:
        release = create_release(
            session,
            context.store,
            context.signer,
            name=form.name,
            version=form.version,
            runtime=form.runtime,
            files=files,
            constraints=constraints,
            expires_at=now + timedelta(days=form.expires_in_days),
            encrypt=form.encrypt,
            created_by=operator.name,
            now=now,
        )
        public = release_public(release)
        detail = {"name": public.name, "version": public.version, "release": public.release}
        record(session, operator, "model.create", public.id, detail=detail)
        return public


@router.post(
    "", status_code=status.HTTP_201_CREATED, openapi_extra=_UPLOAD_OPENAPI, name="model.create"
)
async def upload(
    request: Request, context: ContextDep, operator: OperatorDep
) -> ModelReleasePublic:
    """Upload a model release: fields name, version, runtime, architectures, min_ram_bytes,
    min_disk_bytes, expires_in_days, encrypt; files weights (required), tokenizer, labels,
    config. The files stream to disk; past ``max_artifact_bytes`` the answer is 413."""
    received = await receive_multipart(
        request.headers,
        request.stream(),
        spool_dir=artifacts_dir(context.home) / ".tmp",
        max_file_bytes=context.settings.max_artifact_bytes,
        file_parts=FILE_PARTS,
        field_parts=_FIELDS,
    )
    try:
        form = _form(received)
        if "weights" not in received.files:
            raise ReleaseInvalidError(
                "the weights file is missing: send the model file as the multipart part 'weights'"
            )
        return await asyncio.to_thread(_store, context, form, received, operator)
    finally:
        received.cleanup()


@router.get("")
def list_all(
    session: SessionDep,
    _viewer: ViewerDep,
    name: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[ModelReleasePublic]:
    """Releases, newest first; only those of ``name`` when given."""
    return [release_public(r) for r in list_releases(session, name=name, limit=limit)]


@router.get("/{release_id}")
def one(release_id: str, session: SessionDep, _viewer: ViewerDep) -> ModelReleasePublic:
    """One release with its files, constraints and signing key id."""
    return release_public(get_release(session, release_id))
