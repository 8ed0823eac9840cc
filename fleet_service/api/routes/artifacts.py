"""Artifact downloads by signed URL (Range resume); the agent's signing-key and URL routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from fleet_service.api.deps import ContextDep, DeviceIdDep, OptionalDeviceIdDep, SessionDep
from fleet_service.api.problems import problem
from fleet_service.artifacts import UrlRefusedError, release_urls, signing_keys
from fleet_service.artifacts.ranges import RangeNotSatisfiable, parse_range
from fleet_service.schemas import ReleaseUrlsPublic, SigningKeysPublic

__all__ = ["router"]

router = APIRouter(tags=["artifacts"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PROBLEM = {"application/problem+json": {"schema": {"type": "object"}}}


@router.get(
    "/artifacts/{sha256}",
    response_class=Response,
    responses={
        200: {"description": "the whole blob", "content": {"application/octet-stream": _BINARY}},
        206: {
            "description": "the requested range",
            "content": {"application/octet-stream": _BINARY},
        },
        403: {"description": "expired, altered or another device's URL", "content": _PROBLEM},
        404: {"description": "no such blob", "content": _PROBLEM},
        416: {"description": "the range starts past the end", "content": _PROBLEM},
    },
)
def download(
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
    device: Annotated[str, Query(min_length=1, max_length=64)],
    expires: int,
    sig: Annotated[str, Query(min_length=1, max_length=128)],
    request: Request,
    context: ContextDep,
    caller: OptionalDeviceIdDep,
) -> Response:
    """One stored blob by a signed URL (no operator login); send ``Range: bytes=N-`` to resume."""
    try:
        context.artifact_urls.verify(sha256, device_id=device, expires=expires, sig=sig)
        if caller is not None and caller != device:
            raise UrlRefusedError(
                "device",
                f"this URL was issued to {device}, not to {caller}; ask for your own URLs: "
                "GET /api/v1/agent/releases/{release_id}/urls",
            )
    except UrlRefusedError as exc:
        return problem(exc.status, exc.title, exc.detail, reason=exc.reason)
    size = context.store.size(sha256)
    etag = f'"{sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Cache-Control": "private, no-store",
    }
    if_range = request.headers.get("if-range")
    asked = request.headers.get("range") if if_range in (None, etag) else None
    try:
        wanted = parse_range(asked, size)
    except RangeNotSatisfiable as exc:
        response = problem(416, "range not satisfiable", str(exc))
        response.headers["Content-Range"] = f"bytes */{size}"
        return response
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            context.store.open_range(sha256), media_type="application/octet-stream", headers=headers
        )
    headers["Content-Length"] = str(wanted.length)
    headers["Content-Range"] = wanted.content_range
    return StreamingResponse(
        context.store.open_range(sha256, wanted.start, wanted.end),
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )


@router.get("/agent/signing-keys", tags=["agent (HTTPS fallback)"])
def agent_signing_keys(context: ContextDep, _device_id: DeviceIdDep) -> SigningKeysPublic:
    """The public keys a device should trust for release manifests (several during rotation)."""
    return signing_keys(context.signer)


@router.get("/agent/releases/{release_id}/urls", tags=["agent (HTTPS fallback)"])
def agent_release_urls(
    release_id: str, context: ContextDep, session: SessionDep, device_id: DeviceIdDep
) -> ReleaseUrlsPublic:
    """Short-lived download URLs of a release's files; 403 unless it is deployed to the caller."""
    return release_urls(session, context.store, device_id=device_id, release_id=release_id)
