"""The HTTP edges of the service: security headers and CSP, CORS, request body limits.

Pure ASGI middleware (no ``BaseHTTPMiddleware``), so the event stream and artifact downloads
stream through untouched. :func:`install_edges` stacks them, outermost first:

    SecurityHeaders   every answer: nosniff, no framing, no referrer, HSTS, a CSP
    ProblemCORS       only when ``cors_origins`` is set; refusals are problem+json
    BodyLimit         413 problem+json past ``max_request_bytes`` (the model upload has its own)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Final

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet_service.api.problems import problem
from fleet_service.config import ServiceSettings

__all__ = [
    "API_CSP",
    "DASHBOARD_CSP",
    "DOCS_CSP",
    "SECURITY_HEADERS",
    "UNLIMITED_BODY_ROUTES",
    "BodyLimitMiddleware",
    "ProblemCORSMiddleware",
    "SecurityHeadersMiddleware",
    "install_edges",
]

# The dashboard is a Vite build: one module script and one stylesheet from /assets, no inline
# code (tests/test_hardening.py loads it in Chromium under this policy). Images may be data:
# URIs, which Vite makes of small imported assets. Everything else is same-origin or nothing.
DASHBOARD_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# JSON, PEM and blobs are never rendered as pages: a browser opening one runs nothing.
API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
# Swagger UI (only with api_docs on): FastAPI's page pulls it from jsDelivr and starts it with
# an inline script, and Swagger UI styles some elements inline, so this page alone allows them.
DOCS_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'unsafe-inline' https://cdn.jsdelivr.net; "
    "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
    # Browsers ignore it over plain HTTP; behind a TLS proxy (http_tls false) it is still right.
    "Strict-Transport-Security": "max-age=31536000",
}

# Routes that stream their body with their own limit instead: the model upload spools to
# disk and answers 413 past max_artifact_bytes (fleet_service/api/routes/models.py).
UNLIMITED_BODY_ROUTES: Final[frozenset[tuple[str, str]]] = frozenset({("POST", "/api/v1/models")})

_API_PREFIX = "/api/"


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` and a Content-Security-Policy to every HTTP answer.

    HTML gets :data:`DASHBOARD_CSP` (``docs_path`` gets :data:`DOCS_CSP`), everything else
    :data:`API_CSP`. API answers that set no Cache-Control get ``no-store``: they hold tokens,
    keys and fleet data that no shared cache should keep. Headers a route set are left alone.
    """

    def __init__(self, app: ASGIApp, *, docs_path: str | None = None) -> None:
        self.app = app
        self.docs_path = docs_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("Content-Security-Policy", self._policy(path, headers))
                if path.startswith(_API_PREFIX):
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _policy(self, path: str, headers: MutableHeaders) -> str:
        if self.docs_path is not None and path in (self.docs_path, f"{self.docs_path}/"):
            return DOCS_CSP
        if headers.get("content-type", "").startswith("text/html"):
            return DASHBOARD_CSP
        return API_CSP


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered as problem+json like every error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        origin = request_headers.get("origin", "")
        return problem(
            response.status_code,
            "cross-origin request refused",
            f"CORS preflight from {origin} refused ({refused}); the service allows only the "
            "origins in its cors_origins setting, with their listed methods and headers",
        )


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 problem+json.

    A declared Content-Length over the limit is refused before the route runs. A body sent
    without one (chunked) is counted as it is read; past the limit the read raises a 413
    HTTPException, which the problem handler answers.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, exempt: Collection[tuple[str, str]] = ()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(int(declared))(scope, receive, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._detail(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, receive_limited, send)

    def _too_large(self, size: int) -> Response:
        return problem(413, "content too large", self._detail(str(size)))

    def _detail(self, size: str) -> str:
        return (
            f"the request body is {size} bytes; this service accepts at most {self.max_bytes} "
            "(setting max_request_bytes; model files go to POST /api/v1/models, which streams)"
        )


def install_edges(app: FastAPI, settings: ServiceSettings) -> None:
    """Stack the edge middleware on ``app`` as the module docstring draws it."""
    # add_middleware puts each one outside the ones added before it.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_request_bytes, exempt=UNLIMITED_BODY_ROUTES
    )
    if settings.cors_origins:
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            # Bearer tokens travel in a header, never in cookies: no credentialed CORS.
            allow_credentials=False,
            expose_headers=["Retry-After", "Content-Range", "ETag"],
            max_age=600,
        )
    app.add_middleware(SecurityHeadersMiddleware, docs_path=app.docs_url)
    # For the 500 answer, which Starlette sends outside every middleware (api.problems).
    app.state.error_headers = {
        **SECURITY_HEADERS,
        "Content-Security-Policy": API_CSP,
        "Cache-Control": "no-store",
    }
