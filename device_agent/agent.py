"""The agent's supervisor: the outbox, the named loops, the MQTT session with reconnects, stop.

Loops that only produce or consume local data run for the whole life of :meth:`Agent.run`, so a
device keeps sampling, logging and obeying commands it already has while the broker is away:

    telemetry       samples the machine into the outbox every ``telemetry_interval_s``
    log-forwarder   stores forwarded log records in the outbox (device_agent/logforward.py)
    commands        runs received commands one at a time, their acks into the outbox
    models, schedules, local-api
                    install and serve the desired models, run their schedules, answer the
                    loopback inference API (device_agent/model_services.py); the active models
                    are loaded from disk before the first connection, so a device serves offline

Loops that need the broker run once per connection, in a TaskGroup that ends with it
(device_agent/mqtt_delivery.py):

    outbox-pump     publishes what the outbox says is due, in order, at ``drain_rate_per_s``
    inbound         receipts confirm outbox entries; commands and desired state are handled
    cert-renewal    renews the device certificate when due (device_agent/renewal.py); once the
                    new key and certificate are installed, the session ends cleanly and the
                    connection loop reconnects with them at once

One run-wide loop stands in for those two while the broker cannot be reached
(device_agent/fallback.py):

    https-fallback  once there has been no MQTT session for ``https_fallback_after_s``, every
                    ``https_poll_interval_s`` posts the due outbox entries over HTTPS (the
                    answer confirms them, as a receipt would), polls commands and desired state
                    (device_agent/https_transport.py); it stops as soon as a session is up
                    again, while the connection loop keeps trying MQTT with its backoff all along

Every message except ``status`` travels through the outbox (device_agent/outbox.py) and is
deleted only when the service's receipt names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from enum import StrEnum

from device_agent import telemetry
from device_agent.backoff import Backoff, sleep_unless_set
from device_agent.commands import CommandProcessor
from device_agent.config import AgentSettings
from device_agent.connection import Connection, connect
from device_agent.desired import DesiredApplier
from device_agent.errors import ConnectionLostError
from device_agent.fallback import HttpsFallback, MqttLink
from device_agent.logforward import LogForwarder
from device_agent.metrics import AgentMetrics
from device_agent.model_services import ModelServices
from device_agent.mqtt_delivery import MqttDelivery
from device_agent.outbox import Outbox, OutboxError
from device_agent.renewal import CertificateInfo, CertificateRenewer
from device_agent.runtime import RuntimeState
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import DeviceState, ResultMessage, TopicKind

# Backoff is re-exported: it lived here before device_agent/backoff.py, and callers import it.
__all__ = ["STOPPED_REASON", "Agent", "Backoff", "State"]

logger = logging.getLogger(__name__)

# The reason on the retained ``offline`` status after a clean shutdown, as opposed to the Last
# Will's "connection lost": operators tell a maintenance stop from a failure by it.
STOPPED_REASON = "agent stopped"

# A run-wide loop that crashed (a bug) is restarted after this pause, so a loop that fails at
# once cannot spin the CPU of a small device while its errors are logged.
_LOOP_RESTART_DELAY_S = 5.0

# Received commands waiting for the commands loop. The broker queues the rest in the session, so
# a flood of commands stalls the inbound loop a little rather than growing memory.
_COMMAND_QUEUE_MAX = 100


class State(StrEnum):
    """Where the agent is in its lifecycle."""

    STARTING = "starting"
    CONNECTING = "connecting"
    ONLINE = "online"
    BACKING_OFF = "backing_off"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Agent:
    """One device's runtime: the outbox, the agent's loops, and an MQTT session kept up."""

    def __init__(
        self,
        settings: AgentSettings,
        identity: DeviceIdentity,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._state_dir = StateDir(settings.state_dir)
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s, rng=rng)
        self._runtime = RuntimeState.from_settings(settings)
        self._state = State.STARTING
        self._waiters: dict[State, list[asyncio.Future[None]]] = {}
        self._sampler = telemetry.Sampler(self._runtime, self._state_dir.root)
        self._online_since: float | None = None  # loop time of the current session's birth
        self._outbox: Outbox | None = None  # open while run() runs
        self._delivery: MqttDelivery | None = None  # made while run() starts
        self._halt = asyncio.Event()  # stop was asked for, or a restart
        self._restart_requested = False
        self._commands: asyncio.Queue[bytes] = asyncio.Queue(maxsize=_COMMAND_QUEUE_MAX)
        # Whether an MQTT session is up, since when it is down and why: the fallback's cue.
        self._link = MqttLink()
        # Set once a renewed certificate is installed: the session ends and reconnects with it.
        self._reconnect = asyncio.Event()
        self._renewer = CertificateRenewer(
            settings, identity, self._state_dir, on_renewed=self._renewed, rng=rng
        )
        self.metrics = AgentMetrics()  # served on the local API's /metrics

    @property
    def state(self) -> State:
        """The current lifecycle state."""
        return self._state

    @property
    def identity(self) -> DeviceIdentity:
        """The device this agent runs as."""
        return self._identity

    @property
    def runtime(self) -> RuntimeState:
        """The settings that commands and desired state change while the agent runs."""
        return self._runtime

    @property
    def outbox(self) -> Outbox:
        """The open outbox; only while :meth:`run` runs. Its calls block: mind the loop."""
        if self._outbox is None:
            raise RuntimeError("the outbox is open only while the agent runs")
        return self._outbox

    @property
    def restart_requested(self) -> bool:
        """Whether :meth:`run` returned because a command asked for a restart."""
        return self._restart_requested

    def request_restart(self) -> None:
        """Stop as for a clean shutdown; the caller of :meth:`run` starts the agent again."""
        logger.info("agent restart requested")
        self._restart_requested = True
        self._halt.set()

    async def wait_for_state(self, state: State) -> None:
        """Return when the agent next enters ``state``, or at once if it is in it now."""
        if self._state is state:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(state, []).append(waiter)
        await waiter

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set or a restart is requested, then shut down cleanly.

        Shutting down announces ``offline``, disconnects and closes the outbox; what was not
        confirmed yet stays in it for the next run. Raises AgentError only when the state dir's
        databases cannot be opened at all.
        """
        if self._state is not State.STARTING:
            raise RuntimeError(f"agent for {self._identity.device_id} already ran; make a new one")
        root = logging.getLogger()
        try:
            async with contextlib.AsyncExitStack() as resources:
                outbox = await asyncio.to_thread(
                    Outbox.in_state_dir,
                    self._state_dir.root,
                    max_messages=self._settings.outbox_max_messages,
                    max_bytes=self._settings.outbox_max_bytes,
                )
                resources.callback(self._close_outbox, outbox)
                self._outbox = outbox
                current = await asyncio.to_thread(self._renewer.load)
                self._sampler.certificate = (current.serial, current.not_after)
                models = await resources.enter_async_context(
                    ModelServices.open(
                        self._settings,
                        self._identity,
                        self._state_dir,
                        results=self._store_result,
                        metrics=self.metrics,
                    )
                )
                self.metrics.watch(outbox, models.pool)
                resources.callback(self.metrics.unwatch)
                self._sampler.runtimes = list(models.runtimes)
                # Restores the last desired config (and models) before the first sample is taken.
                desired = DesiredApplier(self._state_dir.root, self._runtime, models.reconciler)
                resources.callback(desired.close)
                forwarder = LogForwarder(self._runtime)
                root.addHandler(forwarder)
                resources.callback(root.removeHandler, forwarder)
                processor = await asyncio.to_thread(
                    CommandProcessor,
                    self._state_dir.root,
                    self._runtime,
                    request_restart=self.request_restart,
                    recent_logs=forwarder.recent,
                    pool=models.pool,
                    results=self._store_result,
                )
                resources.callback(processor.close)
                logger.info(
                    "outbox open path=%s depth=%d dropped=%s",
                    outbox.path,
                    outbox.depth(),
                    outbox.dropped(),
                )
                delivery = MqttDelivery(
                    self._settings,
                    self._identity,
                    outbox,
                    commands=self._commands,
                    desired=desired,
                    certificates=self._renewer.handle_answer,
                )
                self._delivery = delivery
                fallback = HttpsFallback(
                    self._settings,
                    self._identity,
                    self._state_dir,
                    outbox=outbox,
                    commands=self._commands,
                    desired=desired,
                    report=delivery.report,
                    link=self._link,
                )
                await models.restore()

                async def publish_reported() -> None:
                    if (reported := desired.current()) is not None:
                        await delivery.report(reported)

                model_loops = models.loops(publish_reported)
                await self._run_all(stop, delivery, fallback, processor, forwarder, model_loops)
        finally:
            self._set_state(State.STOPPED)
            logger.info("agent stopped device_id=%s", self._identity.device_id)

    async def _run_all(
        self,
        stop: asyncio.Event,
        delivery: MqttDelivery,
        fallback: HttpsFallback,
        processor: CommandProcessor,
        forwarder: LogForwarder,
        model_loops: list[tuple[str, Callable[[], Awaitable[None]]]],
    ) -> None:
        """The run-wide loops next to the connection loop, until stop or a restart request."""
        self._link.mark_down("not connected yet")
        async with asyncio.TaskGroup() as group:
            loops = [
                group.create_task(_relay(stop, self._halt), name="stop"),
                group.create_task(
                    self._supervised("telemetry", lambda: self._sampler.run(delivery.put)),
                    name="telemetry",
                ),
                group.create_task(
                    self._supervised("log-forwarder", lambda: forwarder.forward(delivery.put_logs)),
                    name="log-forwarder",
                ),
                group.create_task(
                    self._supervised("commands", lambda: self._command_loop(delivery, processor)),
                    name="commands",
                ),
                group.create_task(
                    self._supervised("https-fallback", fallback.run), name="https-fallback"
                ),
                *(
                    group.create_task(self._supervised(name, loop), name=name)
                    for name, loop in model_loops
                ),
            ]
            await self._connection_loop(delivery)
            for task in loops:
                task.cancel()

    async def _connection_loop(self, delivery: MqttDelivery) -> None:
        """Keep a session up until halted; reconnect with backoff whenever it ends."""
        halt = self._halt
        broker = f"{self._identity.mqtt_host}:{self._identity.mqtt_port}"
        while not halt.is_set():
            self._set_state(State.CONNECTING)
            try:
                await self._session(delivery)
            except ConnectionLostError as exc:
                self.metrics.count_reconnect()
                logger.warning("MQTT session with %s ended: %s", broker, exc)
                self._link.mark_down(str(exc))
                self._renewer.check_expired()
            except Exception as exc:
                # The one catch-all: whatever broke, the device must come back on its own.
                self.metrics.count_reconnect()
                logger.exception("agent session crashed; restarting it")
                self._link.mark_down(f"the session crashed: {exc!r}")
            else:
                if halt.is_set():
                    return
                # A renewed certificate: reconnect with it at once, no backoff.
                self._link.mark_down("reconnecting with a renewed certificate")
                continue
            if halt.is_set():
                return
            if self._was_stable():
                self._backoff.reset()
            delay = self._backoff.next_delay()
            self._set_state(State.BACKING_OFF)
            logger.info(
                "reconnecting to %s in %.1f s (attempt %d)",
                broker,
                delay,
                self._backoff.attempt,
            )
            await sleep_unless_set(halt, delay)

    async def _session(self, delivery: MqttDelivery) -> None:
        """One connection: birth, loops until halted or renewed (return) or lost
        (ConnectionLostError)."""
        self._online_since = None
        async with connect(self._identity, self._state_dir, self._settings) as connection:
            await connection.publish_status(DeviceState.ONLINE)
            self._online_since = asyncio.get_running_loop().time()
            self._link.mark_up()
            self._set_state(State.ONLINE)
            await self._run_loops(connection, delivery)
            renewed = not self._halt.is_set()
            if not renewed:
                await self._announce_stop(connection)
        if renewed:
            # A renewed certificate: the disconnect was clean (no Last Will) and the next
            # session says online again. What arrived while the loops stopped is handled
            # now, since the broker counts it as delivered (a command must not be lost).
            self._reconnect.clear()
            unread = connection.take_unread()
            for message in unread:
                await delivery.handle(message)
            logger.debug("handled %d messages that arrived while switching", len(unread))

    async def _announce_stop(self, connection: Connection) -> None:
        """The clean shutdown's retained ``offline``, published before disconnecting."""
        self._set_state(State.STOPPING)
        try:
            await connection.publish_status(DeviceState.OFFLINE, reason=STOPPED_REASON)
        except ConnectionLostError as exc:
            logger.warning(
                "could not announce the clean stop (%s); the broker's Last Will says "
                "offline instead",
                exc,
            )

    async def _run_loops(self, connection: Connection, delivery: MqttDelivery) -> None:
        """Run the per-connection loops until halted or renewed; raise the error that ended
        them otherwise."""
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                loops = [
                    group.create_task(delivery.pump(connection), name="outbox-pump"),
                    group.create_task(delivery.inbound(connection), name="inbound"),
                    group.create_task(self._renewer.run(connection), name="cert-renewal"),
                ]
                await _either(self._halt, self._reconnect)
                for task in loops:
                    task.cancel()
        except ExceptionGroup as errors:
            failure = _primary_error(errors)
        if failure is not None:
            # Raised outside the except block, so it does not drag the group along as context.
            raise failure

    # -- run-wide loops -------------------------------------------------------------------------

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop``; if it crashes, log it and start it again after a pause."""
        while True:
            try:
                await loop()
            except Exception:
                # A supervisor: a bug in one loop must not take the device's other loops down.
                logger.exception(
                    "%s loop crashed; restarting it in %.0f s", name, _LOOP_RESTART_DELAY_S
                )
            else:
                return
            await asyncio.sleep(_LOOP_RESTART_DELAY_S)

    async def _command_loop(self, delivery: MqttDelivery, processor: CommandProcessor) -> None:
        """Run received commands one at a time; each ack is stored before the next is made."""
        while True:
            payload = await self._commands.get()
            async for ack in processor.handle(payload):
                await delivery.put(TopicKind.ACKS, ack)

    # -- helpers --------------------------------------------------------------------------------

    def _renewed(self, certificate: CertificateInfo) -> None:
        """A renewed key and certificate are installed: report them and reconnect with them."""
        self._sampler.certificate = (certificate.serial, certificate.not_after)
        self._reconnect.set()

    async def _store_result(self, result: ResultMessage) -> None:
        """The result sink of commands, schedules and the local API: ``results/<model>``."""
        if self._delivery is None:
            raise RuntimeError("results are stored only while the agent runs")
        self.metrics.observe_result(result)
        try:
            await self._delivery.put(TopicKind.RESULTS, result, model=result.model)
        except OutboxError as exc:
            logger.warning("result of %s not stored: %s", result.model, exc)

    def _close_outbox(self, outbox: Outbox) -> None:
        self._outbox = None
        depth = outbox.depth()
        outbox.close()
        logger.info("outbox closed with %d messages waiting for a receipt", depth)

    def _was_stable(self) -> bool:
        """Whether the session that just ended lasted long enough to start the backoff over."""
        if self._online_since is None:
            return False
        lasted = asyncio.get_running_loop().time() - self._online_since
        return lasted >= self._settings.stable_connection_s

    def _set_state(self, state: State) -> None:
        if state is self._state:
            return
        logger.debug("agent state %s -> %s", self._state.value, state.value)
        self._state = state
        for waiter in self._waiters.pop(state, []):
            if not waiter.done():
                waiter.set_result(None)


def _primary_error(errors: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error worth reporting: a lost connection explains everything that failed with it."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [errors]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(reversed(error.exceptions))
        else:
            leaves.append(error)
    for leaf in leaves:
        if isinstance(leaf, ConnectionLostError):
            return leaf
    return leaves[0] if len(leaves) == 1 else errors


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    """Return once either event is set."""
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    """Set ``target`` once ``source`` is set."""
    await source.wait()
    target.set()
