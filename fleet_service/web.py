"""Serve the built dashboard: assets as files, every client-side route as ``index.html``."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["default_dashboard_dir", "mount_dashboard"]

logger = logging.getLogger(__name__)

_MISSING = """<!doctype html><title>edgefleet</title>
<p>The dashboard is not built. Run <code>make setup</code> (or <code>npm ci && npm run build</code>
in <code>dashboard/</code>); the API is described at
<a href="/api/v1/openapi.json">/api/v1/openapi.json</a>.</p>"""


def default_dashboard_dir() -> Path:
    """``dashboard/dist`` of the source tree this package runs from."""
    return Path(__file__).resolve().parent.parent / "dashboard" / "dist"


def mount_dashboard(app: FastAPI, dist: Path) -> None:
    """Serve ``dist`` at ``/`` with history-mode fallback for the app's routes."""
    index = dist / "index.html"
    if (dist / "assets").is_dir():
        app.mount("/assets", StaticFiles(directory=dist / "assets"), name="assets")
    else:
        logger.warning("dashboard not built at %s; serving a placeholder page", dist)

    async def spa(path: str = "") -> FileResponse | HTMLResponse:
        if index.is_file():
            return FileResponse(index, headers={"Cache-Control": "no-cache"})
        return HTMLResponse(_MISSING, status_code=503)

    for route in (
        "/",
        "/login",
        "/devices/{path:path}",
        "/models",
        "/models/{path:path}",
        "/deployments",
        "/deployments/{path:path}",
        "/results",
        # access management and third-party access (admin pages, issue 6)
        "/users",
        "/tokens",
        "/audit",
        "/integrations",
        "/webhooks",
        "/webhooks/{path:path}",
        "/security",
    ):
        app.add_api_route(route, spa, methods=["GET"], include_in_schema=False, response_model=None)
