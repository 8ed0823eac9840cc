"""Converge the device's models to the desired ones: verify, fetch, install, load, switch, report.

:class:`ModelReconciler` gets the desired models from :class:`~device_agent.desired.DesiredApplier`
(:meth:`~ModelReconciler.assign`) and runs one task per model, ``model:<name>``, off the MQTT loop.
For a new release it goes through the phases of ``ModelReport``::

    pending      verify the manifest (signature by a trusted key, expiry): else refused
                 refuse a release below the accepted floor, another architecture, a runtime not
                 installed here, too little RAM or disk
    downloading  fetch each file by its signed URL (resumable; device_agent/artifacts.py)
    installing   decrypt or link into a release directory (device_agent/model_store.py)
    loading      load it in the worker pool (the old worker serves until the new one is up),
                 health-check it; on failure load the previous release back
    running      switch the active pointer, raise the floor, prune old releases

A failure after the install leaves the previous release serving and reports ``failed`` with the
reason; a refusal never touches what serves. A release that could not be fetched (network, the
service down) is tried again with capped backoff, so an offline device converges when it returns;
a refused or failed release is not retried until the desired state names another one (or the
agent restarts). Models no longer desired are unloaded and their releases deleted (the floor
stays, so an older release cannot come back in through a removal).

At start, :meth:`~ModelReconciler.restore` loads every active release from disk before the agent
connects, so a device serves offline. Reports go into the retained ``ReportedState`` through
the ``model-reports`` loop, at most every ``model_progress_interval_s``; ``model-watch`` reports
worker restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import platform
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psutil

from device_agent import failpoints
from device_agent.artifacts import (
    ArtifactError,
    ArtifactUnavailableError,
    InsufficientDiskError,
    ServiceClient,
    check_disk,
    download_file,
)
from device_agent.backoff import Backoff
from device_agent.config import AgentSettings
from device_agent.errors import AgentError
from device_agent.inference import (
    HealthCheckError,
    InferenceFailure,
    ModelLoadError,
    ModelPool,
    QueueFullError,
    available_runtimes,
)
from device_agent.model_store import InstalledRelease, InstallError, ModelStore
from device_agent.schedules import ScheduleRunner, schedule_problems
from device_agent.signing_keys import TrustedKeys
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import ManifestError, ModelAssignment, ModelManifest, ModelPhase, ModelReport
from fleet_protocol.manifest import normalise_architecture

__all__ = ["ModelReconciler"]

logger = logging.getLogger(__name__)

# A health check that finds the new model's queue full (callers got to it first) waits this long
# and tries again, this many times in all, before the release counts as unhealthy.
_HEALTH_CHECK_ATTEMPTS = 5
_HEALTH_CHECK_RETRY_S = 2.0


class _Refused(Exception):  # noqa: N818 -- an outcome: the release is refused, with the reason
    pass


class _Failed(Exception):  # noqa: N818 -- an outcome: the release was tried and failed
    pass


def _task_key(assignment: ModelAssignment) -> tuple[str, str, str | None]:
    # What makes a new attempt worth it; new schedules alone do not reinstall a model.
    return (assignment.release_id, assignment.manifest.signature, assignment.key)


class ModelReconciler:
    """Installs and loads the desired models; see the module docstring."""

    def __init__(
        self,
        settings: AgentSettings,
        identity: DeviceIdentity,
        state: StateDir,
        pool: ModelPool,
        *,
        schedules: ScheduleRunner | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._state = state
        self._pool = pool
        self._schedules = schedules
        self._now = now
        self.store = ModelStore(state.root)
        self._keys = TrustedKeys(state.root)
        self._desired: dict[str, ModelAssignment] | None = None  # None until first assigned
        self._reports: dict[str, ModelReport] = {}
        self._tasks: dict[str, tuple[tuple[str, str, str | None], asyncio.Task[None]]] = {}
        self._changed = asyncio.Event()
        self._dirty = asyncio.Event()

    # -- the DesiredApplier side --------------------------------------------------------------

    def assign(self, assignments: Sequence[ModelAssignment]) -> None:
        """The models to converge to; the ``model:<name>`` tasks start from :meth:`run`."""
        self._desired = {a.name: a for a in assignments}
        for assignment in assignments:
            report = self._reports.get(assignment.name)
            if report is None or report.release_id != assignment.release_id:
                self._set(assignment, ModelPhase.PENDING)
        self._changed.set()

    def reports(self) -> dict[str, ModelReport]:
        """The report of every desired model."""
        desired = self._desired or {}
        return {name: r for name, r in self._reports.items() if name in desired}

    # -- lifecycle ----------------------------------------------------------------------------

    async def restore(self) -> None:
        """Load each model's active release from disk (its previous one if that fails)."""
        await asyncio.to_thread(self.store.clean)
        for name in await asyncio.to_thread(self.store.names):
            for installed in (
                await asyncio.to_thread(self.store.active, name),
                await asyncio.to_thread(self.store.previous, name),
            ):
                if installed is None:
                    continue
                try:
                    await self._pool.load(installed.spec())
                except (ModelLoadError, InferenceFailure) as exc:
                    logger.error("cannot load %s release %d: %s", name, installed.release, exc)
                    continue
                logger.info("serving %s release %d from disk", name, installed.release)
                break

    async def run(self, publish: Callable[[], Awaitable[None]]) -> None:
        """The per-model tasks, ``model-reports`` (calls ``publish``) and ``model-watch``."""
        # Start from what is desired now: after a supervisor restart nothing else would wake us.
        self._changed.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._report_loop(publish), name="model-reports")
                group.create_task(self._watch_loop(), name="model-watch")
                while True:
                    await self._changed.wait()
                    self._changed.clear()
                    await self._sync(group)
        finally:
            for _, task in self._tasks.values():
                task.cancel()
            self._tasks.clear()

    async def _sync(self, group: asyncio.TaskGroup) -> None:
        desired = self._desired
        if desired is None:
            return  # no desired state yet: keep serving what is on disk
        for name, (key, task) in list(self._tasks.items()):
            if name not in desired or key != _task_key(desired[name]):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                del self._tasks[name]
        for name, assignment in desired.items():
            if name not in self._tasks:
                task = group.create_task(self._converge(assignment), name=f"model:{name}")
                self._tasks[name] = (_task_key(assignment), task)
        loaded = {spec.name for spec in self._pool.specs()}
        on_disk = set(await asyncio.to_thread(self.store.names))
        for name in sorted((loaded | on_disk) - desired.keys()):
            logger.info("model %s is no longer desired; unloading and deleting it", name)
            await asyncio.to_thread(self.store.remove, name)
            await self._pool.unload(name)
            if self._reports.pop(name, None) is not None:
                self._dirty.set()  # its report leaves the reported state
        if self._schedules is not None:
            self._schedules.update({name: a.schedules for name, a in desired.items()})

    # -- one model ----------------------------------------------------------------------------

    async def _converge(self, assignment: ModelAssignment) -> None:
        """Bring one model to ``assignment``; the outcome goes into its report."""
        backoff = Backoff(self._settings.model_retry_min_s, self._settings.model_retry_max_s)
        while True:
            try:
                await self._attempt(assignment)
            except ArtifactUnavailableError as exc:
                delay = backoff.next_delay()
                logger.warning("%s: %s; trying again in %.0f s", assignment.name, exc, delay)
                self._set(assignment, detail=f"{exc}; trying again in {delay:.0f} s")
                await asyncio.sleep(delay)
                continue
            except _Refused as exc:
                logger.warning("%s release refused: %s", assignment.name, exc)
                self._set(assignment, ModelPhase.REFUSED, detail=str(exc))
            except (_Failed, ArtifactError, InstallError) as exc:
                logger.warning("%s release failed: %s", assignment.name, exc)
                self._set(assignment, ModelPhase.FAILED, detail=str(exc))
            except Exception as exc:
                # A bug must not leave the model's report stuck in a busy phase.
                logger.exception("converging %s crashed", assignment.name)
                self._set(assignment, ModelPhase.FAILED, detail=f"internal error: {exc!r}")
            return

    async def _attempt(self, assignment: ModelAssignment) -> None:
        name = assignment.name
        signed = assignment.manifest
        store = self.store
        active = await asyncio.to_thread(store.active, name)
        if active is not None and active.signed == signed:
            # Verified when it was installed; its expiry bounds installs, not serving.
            await self._serve(assignment, active, previous=None)
            return
        async with ServiceClient.open(self._identity, self._state, self._settings) as client:
            self._set(assignment, ModelPhase.PENDING, detail=None)
            try:
                manifest = await self._keys.verify(signed, client, now=self._now())
            except ManifestError as exc:
                raise _Refused(str(exc)) from exc
            await self._check_allowed(manifest)
            installed = await asyncio.to_thread(store.installed, name, manifest.release)
            if installed is None or installed.signed != signed:
                await self._download(assignment, manifest, client)
                failpoints.hit(failpoints.Step.DOWNLOADED)
                self._set(assignment, ModelPhase.INSTALLING)
                installed = await asyncio.to_thread(
                    store.install, assignment.release_id, signed, assignment.key
                )
        await self._serve(assignment, installed, previous=active)

    async def _check_allowed(self, manifest: ModelManifest) -> None:
        floor = await asyncio.to_thread(self.store.floor, manifest.name)
        if manifest.release < floor:
            raise _Refused(
                f"downgrade: release {manifest.release} ({manifest.version}) is below release "
                f"{floor}, the highest this device accepted; publish it again as a new release "
                "(a deployment rollback does) to go back"
            )
        wanted = [normalise_architecture(a) for a in manifest.constraints.architectures]
        here = normalise_architecture(platform.machine())
        if wanted and here not in wanted:
            raise _Refused(
                f"built for {', '.join(manifest.constraints.architectures)}; this device is {here}"
            )
        runtimes = available_runtimes()
        if manifest.runtime not in runtimes:
            have = ", ".join(r.value for r in runtimes) or "none"
            raise _Refused(
                f"needs the {manifest.runtime.value} runtime, which is not installed here "
                f"(installed: {have}); install the agent's {manifest.runtime.value} extra"
            )
        available = psutil.virtual_memory().available
        if available < manifest.constraints.min_ram_bytes:
            raise _Refused(
                f"needs {manifest.constraints.min_ram_bytes} bytes of RAM available, this device "
                f"has {available}"
            )
        partial = await asyncio.to_thread(self.store.partial_bytes, manifest)
        needed = max(
            manifest.stored_bytes
            - partial
            + manifest.installed_bytes
            + self._settings.model_disk_margin_bytes,
            manifest.constraints.min_disk_bytes,
        )
        try:
            await asyncio.to_thread(
                check_disk, self.store.root, needed, what=f"{manifest.name} {manifest.version}"
            )
        except InsufficientDiskError as exc:
            raise _Refused(str(exc)) from exc

    async def _download(
        self, assignment: ModelAssignment, manifest: ModelManifest, client: ServiceClient
    ) -> None:
        total = manifest.stored_bytes
        done: dict[str, int] = {}
        urls: dict[str, str] = {}

        def progress(name: str, size: int) -> None:
            done[name] = size
            self._set(assignment, bytes_done=sum(done.values()), bytes_total=total, quiet=True)

        async def url(file_name: str, fresh: bool) -> str:
            if fresh or file_name not in urls:
                issued = await client.release_urls(assignment.release_id)
                urls.update(issued.urls)
            if file_name not in urls:
                raise ArtifactError(
                    f"the service gave no URL for {file_name} of {assignment.release_id}"
                )
            return urls[file_name]

        self._set(assignment, ModelPhase.DOWNLOADING, bytes_done=0, bytes_total=total)
        for file in manifest.files:
            await download_file(
                client.downloads,
                file,
                self.store.partial_path(file),
                url=functools.partial(url, file.name),
                progress=functools.partial(progress, file.name),
                settings=self._settings,
            )
        self._set(assignment, ModelPhase.VERIFYING, bytes_done=total, bytes_total=total)

    async def _serve(
        self,
        assignment: ModelAssignment,
        installed: InstalledRelease,
        *,
        previous: InstalledRelease | None,
    ) -> None:
        """Load ``installed`` (unless it serves already), health-check it, make it active."""
        name = installed.name
        store = self.store
        loaded = self._pool.spec(name)
        fresh = loaded is None or loaded.release != installed.release
        if fresh:
            self._set(assignment, ModelPhase.LOADING)
            try:
                await self._pool.load(installed.spec())
            except (ModelLoadError, InferenceFailure) as exc:
                await asyncio.to_thread(store.discard, name, installed.release)
                raise _Failed(
                    f"release {installed.release} did not load: {exc}; {self._serving(name)}"
                ) from exc
            failpoints.hit(failpoints.Step.LOADED)
        try:
            # A release that already serves (restored from disk at start) passed its health
            # check when it was installed; probing it again behind a busy queue could only
            # take a good model away.
            if fresh:
                await self._health_check(name)
        except InferenceFailure as exc:
            rolled_back = await self._roll_back(name, previous)
            await asyncio.to_thread(store.discard, name, installed.release)
            raise _Failed(
                f"release {installed.release} failed its health check: {exc}; {rolled_back}"
            ) from exc
        failpoints.hit(failpoints.Step.HEALTHY)
        await asyncio.to_thread(store.activate, name, installed.release)
        failpoints.hit(failpoints.Step.ACTIVATED)
        await asyncio.to_thread(store.raise_floor, name, installed.release)
        failpoints.hit(failpoints.Step.FLOOR_RAISED)
        await asyncio.to_thread(store.prune, name)
        problems = schedule_problems(assignment.schedules, self._settings)
        self._set(
            assignment,
            ModelPhase.RUNNING,
            detail="; ".join(problems) or None,
            bytes_done=installed.manifest.stored_bytes,
            bytes_total=installed.manifest.stored_bytes,
        )
        logger.info("%s release %d is running", name, installed.release)

    async def _health_check(self, name: str) -> None:
        """The pool's probe, tried again while the model's queue is full of callers' requests."""
        for attempt in range(_HEALTH_CHECK_ATTEMPTS):
            try:
                await self._pool.health_check(name)
                return
            except HealthCheckError as exc:
                busy = isinstance(exc.__cause__, QueueFullError)
                if not busy or attempt == _HEALTH_CHECK_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(_HEALTH_CHECK_RETRY_S)

    async def _roll_back(self, name: str, previous: InstalledRelease | None) -> str:
        """Load ``previous`` back; a sentence saying what serves now."""
        if previous is None:
            await self._pool.unload(name)
            return "no earlier release to go back to; the model is not served"
        try:
            await self._pool.load(previous.spec())
        except (ModelLoadError, InferenceFailure) as exc:
            logger.error("rolling %s back to release %d failed: %s", name, previous.release, exc)
            await self._pool.unload(name)
            return f"rolling back to release {previous.release} failed too ({exc})"
        return f"rolled back to release {previous.release}"

    def _serving(self, name: str) -> str:
        spec = self._pool.spec(name)
        if spec is None:
            return "the model is not served"
        return f"release {spec.release} ({spec.version}) keeps serving"

    # -- reports ------------------------------------------------------------------------------

    def _set(
        self,
        assignment: ModelAssignment,
        phase: ModelPhase | None = None,
        *,
        quiet: bool = False,
        **fields: Any,
    ) -> None:
        """Update ``assignment``'s report; ``quiet`` changes (progress) wait for the throttle."""
        manifest = assignment.manifest.manifest
        report = self._reports.get(assignment.name)
        if report is None or report.release_id != assignment.release_id:
            report = ModelReport(
                name=manifest.name,
                release_id=assignment.release_id,
                release=manifest.release,
                version=manifest.version,
                phase=ModelPhase.PENDING,
            )
        if phase is not None:
            fields["phase"] = phase
            if phase is not ModelPhase.DOWNLOADING and "detail" not in fields:
                fields["detail"] = None
        spec = self._pool.spec(assignment.name)
        fields["healthy"] = spec is not None and (
            fields.get("phase", report.phase) is not ModelPhase.LOADING
        )
        fields["active_release"] = None if spec is None else spec.release
        fields["active_version"] = None if spec is None else spec.version
        fields["accepted_release"] = self._floor_cache(assignment.name)
        fields["worker_restarts"] = self._pool.worker_restarts(assignment.name)
        if "detail" in fields and fields["detail"] is not None:
            fields["detail"] = str(fields["detail"])[:2000]
        self._reports[assignment.name] = report.model_copy(update=fields)
        if not quiet:
            logger.debug("%s report: %s", assignment.name, self._reports[assignment.name].phase)
        self._dirty.set()

    def _floor_cache(self, name: str) -> int:
        # A small JSON read; reports change a few times a second at most.
        return self.store.floor(name)

    async def _report_loop(self, publish: Callable[[], Awaitable[None]]) -> None:
        interval = self._settings.model_progress_interval_s
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await publish()
            except AgentError as exc:  # a full disk or outbox: report again on the next change
                logger.warning("model report not stored: %s", exc)
                self._dirty.set()
            await asyncio.sleep(interval)

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.model_watch_interval_s)
            desired = self._desired or {}
            for name, report in list(self._reports.items()):
                restarts = self._pool.worker_restarts(name)
                if restarts != report.worker_restarts and name in desired:
                    logger.warning("%s worker was restarted (%d restarts so far)", name, restarts)
                    self._set(desired[name], worker_restarts=restarts)
