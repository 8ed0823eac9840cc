"""The local API server: a Starlette app served by uvicorn inside the agent's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from device_agent.config import LocalApiSettings
from device_agent.errors import AgentError
from device_agent.inference import ModelPool, PushInbox, ResultSink
from device_agent.local_api.common import ApiContext, ApiError, ErrorStyle, error_response
from device_agent.local_api.kserve_routes import kserve_routes
from device_agent.local_api.openai_routes import openai_routes
from device_agent.metrics import AgentMetrics

__all__ = ["LocalApi", "LocalApiError", "build_app"]

logger = logging.getLogger(__name__)

# On stop, requests in flight (a streaming chat) get this long to finish before their
# connections are closed; the agent's own shutdown should not wait on a chatty client.
_GRACEFUL_SHUTDOWN_S = 5
# Pending connections the kernel queues for us: a device API sees a few clients at a time.
_LISTEN_BACKLOG = 64


class LocalApiError(AgentError):
    """The local API cannot serve: its address is in use or cannot be bound."""


def _style(path: str) -> ErrorStyle:
    return ErrorStyle.KSERVE if path.startswith("/v2") else ErrorStyle.OPENAI


class _ApiKeyMiddleware:
    """Every request must carry ``Authorization: Bearer <api_key>`` (when a key is set)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self._expected):
            error = ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                "in the agent's local_api.api_key",
                kind="authentication_error",
                code="invalid_api_key",
            )
            response = error_response(error, _style(scope["path"]))
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


# Host names a request to a loopback-bound API may carry. Anything else means a browser was
# steered here by DNS rebinding (a web page's own name resolving to 127.0.0.1).
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def _host_name(value: str) -> str:
    """``host[:port]`` (``[v6]:port`` too) without the port, lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _LoopbackOnlyMiddleware:
    """Without an API key, only programs on this device may call: a web page in the device's
    browser can reach 127.0.0.1 too, so a foreign ``Host`` (DNS rebinding) or ``Origin`` (a
    cross-site request) is refused with 403."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b"localhost").decode("latin-1"))
        origin = headers.get(b"origin", b"").decode("latin-1")
        origin_host = _host_name(origin.split("://", 1)[-1]) if origin else "localhost"
        if host not in _LOOPBACK_NAMES or origin_host not in _LOOPBACK_NAMES:
            error = ApiError(
                403,
                "the local API answers programs on this device only (Host and Origin must be "
                "localhost); to serve other machines, bind it elsewhere with an API key",
                kind="permission_error",
                code="not_loopback",
            )
            await error_response(error, _style(scope["path"]))(scope, receive, send)
            return
        await self._app(scope, receive, send)


def metrics_routes(context: ApiContext) -> list[Route]:
    """``GET /metrics``: the agent's Prometheus text exposition (device_agent/metrics.py)."""
    metrics = context.metrics
    if metrics is None:
        return []

    async def scrape(request: Request) -> Response:
        body = await asyncio.to_thread(metrics.render)  # reads the outbox's database
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", scrape, methods=["GET"])]


def build_app(context: ApiContext) -> ASGIApp:
    """The ASGI app: /v1 (OpenAI) and /v2 (KServe) routes, errors in each one's shape."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc, _style(request.url.path))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")
        error.kind = kind
        return error_response(error, _style(request.url.path))

    app = Starlette(
        routes=[*openai_routes(context), *kserve_routes(context), *metrics_routes(context)],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
    )
    api_key = context.settings.api_key
    if api_key is None:
        return _LoopbackOnlyMiddleware(app)
    return _ApiKeyMiddleware(app, api_key.get_secret_value())


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM belongs to the agent, which stops us."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LocalApi:
    """The device's local inference API; :meth:`serve` runs it until cancelled.

    OpenAI-compatible ``/v1/models``, ``/v1/chat/completions`` (SSE with ``stream: true``),
    ``/v1/completions``, ``/v1/embeddings`` for GGUF models; KServe v2 ``/v2/health/*``,
    ``/v2/models/{name}[/ready|/infer]`` for ONNX and TFLite; ``/v1/push/{model}`` into the push
    inbox; ``/metrics`` (Prometheus) when ``metrics`` are given. Every inference it serves goes
    to ``sink`` as a result with source ``api``.
    """

    def __init__(
        self,
        pool: ModelPool,
        inbox: PushInbox,
        sink: ResultSink,
        settings: LocalApiSettings,
        *,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._context = ApiContext(
            pool=pool, inbox=inbox, sink=sink, settings=settings, metrics=metrics
        )
        self.app = build_app(self._context)
        self.started = asyncio.Event()
        self._port: int | None = None

    @property
    def port(self) -> int | None:
        """The port it listens on, once started (the chosen one when configured as 0)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``; only meaningful once :attr:`started` is set."""
        host = self._settings.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self._port}"

    def _bind(self) -> socket.socket:
        host, port = self._settings.host, self._settings.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise LocalApiError(
                f"cannot resolve the local API address {host}:{port}: {exc}"
            ) from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(_LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise LocalApiError(
                f"the local API cannot listen on {host}:{port} ({exc.strerror}); another "
                "program (or agent) uses it: set local_api.port or local_api.enabled=false"
            ) from exc
        sock.setblocking(False)
        return sock

    async def serve(self) -> None:
        """Listen and serve until cancelled; LocalApiError if the address cannot be bound."""
        if not self._settings.enabled:
            logger.info("local API disabled (local_api.enabled=false)")
            await asyncio.Event().wait()
        sock = self._bind()
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the agent's logging stays as the agent set it up
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        server = _EmbeddedServer(config)
        logger.info(
            "local API listening url=%s api_key=%s",
            self.url,
            "required" if self._settings.api_key is not None else "none",
        )
        self.started.set()
        try:
            await server.serve(sockets=[sock])
        except asyncio.CancelledError:
            server.should_exit = True
            if server.started:
                await server.shutdown(sockets=[sock])
            raise
        finally:
            sock.close()
            self.started.clear()
