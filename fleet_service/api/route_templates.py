"""The full path template of the route a request matched, for the audit log and /metrics.

FastAPI (0.165 on) may keep included routers apart: the route in ``scope["route"]`` then holds
only its own part of the path (``/devices/{device_id}``, not ``/api/v1/devices/{device_id}``),
so the full template is looked up among the app's routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fastapi.routing

__all__ = ["RouteInfo", "RouteTemplates", "api_routes"]


@dataclass(frozen=True)
class RouteInfo:
    """One route of the app as a client sees it: full path template, methods, name."""

    route: Any  # the route object the router puts in scope["route"]
    path: str
    methods: frozenset[str]
    name: str | None


def api_routes(app: Any) -> list[RouteInfo]:
    """Every route of ``app`` with its full path template."""
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    found = []
    for item in iterate(app.routes) if iterate is not None else app.routes:
        path = getattr(item, "path_format", None) or getattr(item, "path", None)
        if not isinstance(path, str):
            continue
        found.append(
            RouteInfo(
                route=getattr(item, "original_route", item),
                path=path,
                methods=frozenset(getattr(item, "methods", None) or ()),
                name=getattr(item, "name", None),
            )
        )
    return found


class RouteTemplates:
    """Route object -> full template, read from the app on first use (routes do not change
    once the app serves)."""

    def __init__(self) -> None:
        self._templates: dict[int, str | None] = {}

    def of(self, app: Any, route: Any) -> str | None:
        """The full template of ``route`` in ``app``, or None when it is not one of its routes."""
        key = id(route)
        if key not in self._templates and app is not None:
            self._templates = {id(r.route): r.path for r in api_routes(app)}
            # A route the app does not list (the dashboard's mount) is remembered as such, so
            # its requests do not rebuild the table each time.
            self._templates.setdefault(key, None)
        return self._templates.get(key)
