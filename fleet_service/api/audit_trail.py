"""Refused and failed state-changing requests go to the audit log, once, for every route.

A route records its successful action itself, in the transaction of the change
(:func:`fleet_service.audit.record`). When the request is refused (401, 403, 405, 429) or fails
(any other 4xx or 5xx) that transaction is rolled back, so this middleware records the attempt
apart, with the caller when one was authenticated (``request.state.principal``). A route that
records its own failure (login) sets ``request.state.audited`` and is left alone.

The action is the route's name when it has the ``<object>.<verb>`` form (``command.create``),
else ``METHOD /path/template``. Device traffic (``/api/v1/agent/...``) is not an operator action
and is not recorded; refusals of unauthenticated callers are capped per address, so a flood of
anonymous requests cannot fill the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet_service.api.route_templates import RouteTemplates
from fleet_service.audit import Outcome, record_apart
from fleet_service.db import session_scope
from fleet_service.errors import RateLimitedError
from fleet_service.ratelimit import RateLimiter
from fleet_service.roles import Principal
from fleet_service.tables import AuditEvent

__all__ = [
    "AuditTrail",
    "action_name",
    "record_unverified",
    "unverified_event",
]

logger = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API_PREFIX = "/api/v1/"
DEVICE_PREFIX = "/api/v1/agent/"
DENIED = frozenset({401, 403, 405, 429})
# Refusals of callers nobody authenticated, recorded per address; past it they are only counted
# in the log. A person probing by hand stays well under it.
ANONYMOUS_RATE = "60/minute"
# Enough of a problem+json body to keep its detail.
BODY_KEPT = 4096


def action_name(name: str | None, method: str, path: str) -> str:
    """The audit action of a route: its name when it reads ``<object>.<verb>``, else
    ``METHOD /path/template``."""
    if name and "." in name:
        return name
    return f"{method} {path}"[:64]


class AuditTrail:
    """ASGI middleware recording refused and failed writes (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._anonymous = RateLimiter({"anonymous": ANONYMOUS_RATE})
        self._templates = RouteTemplates()

    def _template(self, application: Any, route: Any, path: str) -> str:
        return self._templates.of(application, route) or path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] not in WRITE_METHODS
            or not path.startswith(API_PREFIX)
            or path.startswith(DEVICE_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        status = 0
        body = bytearray()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif (
                message["type"] == "http.response.body" and status >= 400 and len(body) < BODY_KEPT
            ):
                body.extend(message.get("body", b"")[: BODY_KEPT - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            await self._record(scope, 500, b"")
            raise
        if status >= 400:
            await self._record(scope, status, bytes(body))

    async def _record(self, scope: Scope, status: int, body: bytes) -> None:
        state: dict[str, Any] = scope.get("state") or {}
        route = scope.get("route")
        if state.get("audited") or route is None:
            return  # recorded by the route itself, or no such route (nothing was attempted)
        app = scope.get("app")
        context = getattr(getattr(app, "state", None), "context", None)
        if context is None:
            return
        method, path = scope["method"], scope["path"]
        params = scope.get("path_params") or {}
        target = str(next(iter(params.values())))[:200] if params else None
        detail: dict[str, Any] = {"status": status, "method": method, "path": path[:500]}
        reason = _problem_detail(body)
        if reason:
            detail["reason"] = reason[:500]
        outcome: Outcome = "denied" if status in DENIED else "failed"
        action = action_name(getattr(route, "name", None), method, self._template(app, route, path))
        principal = state.get("principal")
        client = scope.get("client")
        address = client[0] if client else None
        if not isinstance(principal, Principal):
            try:
                self._anonymous.hit("anonymous", address or "-", what="anonymous refusals")
            except RateLimitedError:
                logger.warning(
                    "anonymous refusal not audited (rate cap)",
                    extra={"address": address, "action": action},
                )
                return
        try:
            await asyncio.to_thread(
                _write, context.engine, principal, action, target, outcome, detail, address
            )
        except Exception:  # the answer is already sent; a lost audit row must not hide it
            logger.exception("could not record a refused request in the audit log")


def _problem_detail(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    return detail if isinstance(detail, str) else None


def _write(
    engine: Engine,
    principal: Principal | None,
    action: str,
    target: str | None,
    outcome: Outcome,
    detail: dict[str, Any],
    address: str | None,
) -> None:
    if principal is not None:
        record_apart(engine, principal, action, target, outcome=outcome, detail=detail)
        return
    with session_scope(engine) as session:
        session.add(unverified_event("anonymous", action, target, outcome, detail, address))


def unverified_event(
    actor: str,
    action: str,
    target: str | None,
    outcome: Outcome,
    detail: dict[str, Any] | None,
    address: str | None,
) -> AuditEvent:
    """An event whose actor nobody authenticated: ``anonymous``, or the name a failed login
    claimed. Its role is unknown."""
    return AuditEvent(
        at=datetime.now(UTC),
        actor=actor[:200],
        actor_kind="anonymous",
        role=None,
        action=action,
        target=target[:200] if target else None,
        address=address[:64] if address else None,
        outcome=outcome,
        detail=detail,
    )


def record_unverified(
    engine: Engine,
    actor: str,
    action: str,
    target: str | None,
    *,
    outcome: Outcome,
    detail: dict[str, Any] | None,
    address: str | None,
) -> None:
    """:func:`unverified_event` in its own transaction (the request's is rolled back)."""
    with session_scope(engine) as session:
        session.add(unverified_event(actor, action, target, outcome, detail, address))
