"""The agent's model side in one place: worker pool, reconciler, schedules and the local API.

:class:`ModelServices` is opened by :class:`~device_agent.agent.Agent` for the whole run and
gives it three run-wide loops (names as the agent's TaskGroup shows them):

    models      converges to the desired models (device_agent/reconcile.py); its own tasks
                ``model:<name>``, ``model-reports`` and ``model-watch`` run inside it
    schedules   scheduled inference, ``schedule:<model>:<index>`` (device_agent/schedules.py)
    local-api   the loopback inference API (device_agent/local_api.py)

Before the agent connects, :meth:`ModelServices.restore` loads every active model from disk, so a
device serves (local API, schedules, commands) while it is offline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from device_agent.config import AgentSettings
from device_agent.inference import ModelPool, PushInbox, ResultSink, available_runtimes
from device_agent.local_api import LocalApi
from device_agent.metrics import AgentMetrics
from device_agent.reconcile import ModelReconciler
from device_agent.schedules import ScheduleRunner
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import ModelRuntime

__all__ = ["ModelServices"]

logger = logging.getLogger(__name__)

Loop = tuple[str, Callable[[], Awaitable[None]]]


class ModelServices:
    """The open pool, reconciler, schedules and local API of one agent run."""

    def __init__(
        self,
        settings: AgentSettings,
        pool: ModelPool,
        inbox: PushInbox,
        reconciler: ModelReconciler,
        schedules: ScheduleRunner,
        results: ResultSink,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._settings = settings
        self.pool = pool
        self.inbox = inbox
        self.reconciler = reconciler
        self.schedules = schedules
        self._results = results
        self._metrics = metrics
        # Which runtimes import here does not change while the agent runs; finding out imports
        # each runtime's module once, which is slow on a Pi, so it is done at start only.
        self.runtimes: list[ModelRuntime] = available_runtimes()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: AgentSettings,
        identity: DeviceIdentity,
        state: StateDir,
        *,
        results: ResultSink,
        metrics: AgentMetrics | None = None,
    ) -> AsyncIterator[ModelServices]:
        """Everything closed (workers stopped) on exit; ``results`` takes every result."""
        pool = ModelPool(settings.inference)
        try:
            inbox = PushInbox(settings.inference.push_inbox_depth)
            schedules = ScheduleRunner(settings, state.root, pool, results, inbox)
            reconciler = ModelReconciler(settings, identity, state, pool, schedules=schedules)
            yield cls(settings, pool, inbox, reconciler, schedules, results, metrics)
        finally:
            await pool.aclose()

    async def restore(self) -> None:
        """Load the active models from disk; call before connecting."""
        await self.reconciler.restore()
        loaded = [f"{s.name}@{s.release}" for s in self.pool.specs()]
        logger.info("models serving from disk: %s", ", ".join(loaded) or "none")

    def loops(self, publish: Callable[[], Awaitable[None]]) -> list[Loop]:
        """The run-wide loops; ``publish`` puts the current reported state into the outbox."""
        api = LocalApi(
            self.pool, self.inbox, self._results, self._settings.local_api, metrics=self._metrics
        )
        return [
            ("models", lambda: self.reconciler.run(publish)),
            ("schedules", self.schedules.run),
            ("local-api", api.serve),
        ]
