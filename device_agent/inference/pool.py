"""The loaded models: one worker process each, a bounded queue each, and their supervision.

Per model, requests run one at a time in its worker, in arrival order; up to
``inference.queue_depth`` more may wait, past that QueueFullError. Each request has
``inference.request_timeout_s`` in all, queueing included.

One named task per model (``model-supervisor:<name>``) waits for its worker to end. A worker
the agent did not stop (a crash, an OOM kill, a request that timed out) is restarted with the
same release after a capped, jittered backoff, counted in :meth:`ModelPool.worker_restarts` and
logged; the request it was running fails with WorkerCrashedError, the ones queued behind it wait
for the new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from device_agent.backoff import Backoff
from device_agent.config import InferenceSettings
from device_agent.inference.errors import (
    HealthCheckError,
    InferenceFailure,
    InferenceTimeoutError,
    ModelLoadError,
    ModelNotLoadedError,
    QueueFullError,
    WorkerCrashedError,
)
from device_agent.inference.inputs import InferenceInput, ProbeInput
from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.runtime import RuntimeOptions
from device_agent.inference.spec import ModelInfo, ModelSpec
from device_agent.inference.worker import WorkerProcess

__all__ = ["ModelPool"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Slot:
    """One model name: its current worker and what waits for it."""

    spec: ModelSpec
    worker: WorkerProcess
    backoff: Backoff
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    restarts: int = 0
    closing: bool = False
    # Set while ``worker`` is alive; cleared from a crash until the restarted worker is in.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    supervisor: asyncio.Task[None] | None = None


class ModelPool:
    """The models this device serves, each in its own worker process."""

    def __init__(self, settings: InferenceSettings) -> None:
        self._settings = settings
        self._options = RuntimeOptions(
            threads=settings.threads or os.cpu_count() or 1,
            gguf_context_tokens=settings.gguf_context_tokens,
            default_max_tokens=settings.default_max_tokens,
        )
        self._slots: dict[str, _Slot] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}

    @property
    def settings(self) -> InferenceSettings:
        """The settings the pool runs with."""
        return self._settings

    # --- lifecycle ---

    async def load(self, spec: ModelSpec) -> None:
        """Start a worker for ``spec`` and wait until the model has loaded.

        A model of the same name that already serves keeps serving until the new one has loaded,
        then its worker finishes the request it is on and stops. Raises ModelLoadError (the old
        model, if any, still serves).
        """
        lock = self._load_locks.setdefault(spec.name, asyncio.Lock())
        async with lock:
            worker = await WorkerProcess.start(
                spec, self._options, load_timeout_s=self._settings.load_timeout_s
            )
            slot = self._slots.get(spec.name)
            if slot is None:
                slot = _Slot(
                    spec=spec,
                    worker=worker,
                    backoff=Backoff(self._settings.restart_min_s, self._settings.restart_max_s),
                )
                slot.ready.set()
                slot.supervisor = asyncio.create_task(
                    self._supervise(slot), name=f"model-supervisor:{spec.name}"
                )
                self._slots[spec.name] = slot
                return
            old = slot.worker
            slot.spec, slot.worker = spec, worker
            slot.backoff.reset()
            slot.ready.set()
            logger.info(
                "model replaced model=%s version=%s release=%d old_pid=%s new_pid=%s",
                spec.name,
                spec.version,
                spec.release,
                old.pid,
                worker.pid,
            )
            await old.stop(self._settings.stop_timeout_s)

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: queued requests fail with ModelNotLoadedError."""
        slot = self._slots.pop(name, None)
        if slot is None:
            return
        slot.closing = True
        slot.ready.set()  # wake queued requests so they see it is gone
        if slot.supervisor is not None:
            slot.supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slot.supervisor
        await slot.worker.stop(self._settings.stop_timeout_s)
        logger.info("model unloaded model=%s version=%s", name, slot.spec.version)

    async def aclose(self) -> None:
        """Unload every model."""
        async with asyncio.TaskGroup() as group:
            for name in list(self._slots):
                group.create_task(self.unload(name), name=f"model-unload:{name}")

    # --- what is loaded ---

    def spec(self, name: str) -> ModelSpec | None:
        """The release ``name`` serves, or None."""
        slot = self._slots.get(name)
        return slot.spec if slot is not None else None

    def specs(self) -> list[ModelSpec]:
        """Every loaded release, by name."""
        return [self._slots[name].spec for name in sorted(self._slots)]

    def info(self, name: str) -> ModelInfo | None:
        """What the worker found in ``name``'s model (tensors, labels), or None."""
        slot = self._slots.get(name)
        return slot.worker.info if slot is not None else None

    def is_ready(self, name: str) -> bool:
        """Whether ``name`` is loaded and its worker is up (not restarting)."""
        slot = self._slots.get(name)
        return slot is not None and slot.ready.is_set() and slot.worker.alive

    def worker_restarts(self, name: str) -> int:
        """How often ``name``'s worker was restarted after it ended on its own (or hung)."""
        slot = self._slots.get(name)
        return slot.restarts if slot is not None else 0

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting for each loaded model's worker (for /metrics)."""
        return {name: slot.waiting for name, slot in self._slots.items()}

    def worker_pid(self, name: str) -> int | None:
        """The process id of ``name``'s worker (for operators and tests)."""
        slot = self._slots.get(name)
        return slot.worker.pid if slot is not None else None

    # --- inference ---

    async def infer(self, name: str, request: InferenceInput) -> InferenceOutput:
        """Run one request on ``name`` and return its output.

        Raises ModelNotLoadedError, QueueFullError, WorkerCrashedError or InferenceError
        (InvalidInputError, InferenceTimeoutError): all InferenceFailure.
        """
        return await self._complete(name, request)

    def stream(self, name: str, request: InferenceInput) -> AsyncGenerator[str | InferenceOutput]:
        """Run a chat or completion on ``name``, yielding text chunks and then the output.

        Close the iterator (``contextlib.aclosing``) if you stop early: it holds the model.
        """
        return self._run(name, request, stream=True)

    async def health_check(self, name: str) -> None:
        """One probe inference (one token, or zeros of the input shapes); HealthCheckError."""
        try:
            await self._complete(name, ProbeInput())
        except ModelNotLoadedError:
            raise
        except InferenceFailure as exc:
            raise HealthCheckError(f"model {name!r} failed its health check: {exc}") from exc

    async def _complete(self, name: str, request: InferenceInput | ProbeInput) -> InferenceOutput:
        async with contextlib.aclosing(self._run(name, request, stream=False)) as items:
            async for item in items:
                if isinstance(item, InferenceOutput):
                    return item
        raise WorkerCrashedError(f"the worker of model {name!r} gave no answer")

    async def _run(
        self, name: str, request: InferenceInput | ProbeInput, *, stream: bool
    ) -> AsyncGenerator[str | InferenceOutput]:
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotLoadedError(name)
        depth = self._settings.queue_depth
        if slot.lock.locked() and slot.waiting >= depth:
            raise QueueFullError(name, depth)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.request_timeout_s
        slot.waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                await slot.lock.acquire()
        except TimeoutError:
            raise InferenceTimeoutError(
                f"model {name!r}: the request waited in the queue longer than "
                f"{self._settings.request_timeout_s:g} s (inference.request_timeout_s)"
            ) from None
        finally:
            slot.waiting -= 1
        try:
            worker = await self._live_worker(slot, deadline)
            items = worker.run(request, stream=stream, deadline=deadline)
            async with contextlib.aclosing(items):
                async for item in items:
                    if isinstance(item, InferenceOutput):
                        # A restarted worker that answers is healthy again: start backoff over.
                        slot.backoff.reset()
                    yield item
        finally:
            slot.lock.release()

    async def _live_worker(self, slot: _Slot, deadline: float) -> WorkerProcess:
        while True:
            if slot.closing:
                raise ModelNotLoadedError(slot.spec.name)
            if slot.worker.alive:
                return slot.worker
            slot.ready.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await slot.ready.wait()
            except TimeoutError:
                raise WorkerCrashedError(
                    f"the worker of model {slot.spec.name!r} ended and is not back yet "
                    f"({slot.restarts} restarts); see the agent log"
                ) from None

    # --- supervision ---

    async def _supervise(self, slot: _Slot) -> None:
        while not slot.closing:
            worker = slot.worker
            await worker.exited.wait()
            if slot.closing:
                return
            if slot.worker is not worker:
                continue  # replaced by load(); the old one was stopped on purpose
            slot.ready.clear()
            slot.restarts += 1
            logger.warning(
                "model worker ended model=%s version=%s pid=%s reason=%s restarts=%d; "
                "restarting it",
                slot.spec.name,
                slot.spec.version,
                worker.pid,
                worker.ended_by_agent or _exit_reason(worker.exitcode),
                slot.restarts,
            )
            await self._restart(slot, worker)

    async def _restart(self, slot: _Slot, dead: WorkerProcess) -> None:
        while slot.worker is dead and not slot.closing:
            await asyncio.sleep(slot.backoff.next_delay())
            if slot.worker is not dead or slot.closing:
                return
            spec = slot.spec
            try:
                worker = await WorkerProcess.start(
                    spec, self._options, load_timeout_s=self._settings.load_timeout_s
                )
            except ModelLoadError as exc:
                logger.error(
                    "model worker restart failed model=%s attempt=%d: %s",
                    spec.name,
                    slot.backoff.attempt,
                    exc,
                )
                continue
            except Exception:  # supervisor: a failed spawn (ENOMEM, EAGAIN) is tried again
                logger.exception(
                    "model worker restart crashed model=%s attempt=%d",
                    spec.name,
                    slot.backoff.attempt,
                )
                continue
            if slot.worker is not dead or slot.closing or slot.spec is not spec:
                await worker.stop(self._settings.stop_timeout_s)
                return
            slot.worker = worker
            slot.ready.set()
            logger.info(
                "model worker restarted model=%s pid=%s restarts=%d",
                spec.name,
                worker.pid,
                slot.restarts,
            )


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    return f"signal {-exitcode}" if exitcode < 0 else f"exit code {exitcode}"
