"""The agent's supervisor: the outbox, the named loops, the MQTT session with reconnects, stop.

Loops that only produce or consume local data run for the whole life of :meth:`Agent.run`, so a
device keeps sampling, logging and obeying commands it already has while the broker is away:

    telemetry       samples the machine into the outbox every ``telemetry_interval_s``
    log-forwarder   stores forwarded log records in the outbox (device_agent/logforward.py)
    commands        runs received commands one at a time, their acks into the outbox

Loops that need the broker run once per connection, in a TaskGroup that ends with it:

    outbox-pump     publishes what the outbox says is due, in order, at ``drain_rate_per_s``
    inbound         receipts confirm outbox entries; commands and desired state are handled

One run-wide loop stands in for those two while the broker cannot be reached:

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
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from enum import StrEnum

from device_agent import telemetry
from device_agent.commands import CommandProcessor
from device_agent.config import AgentSettings
from device_agent.connection import Connection, InboundMessage, connect
from device_agent.desired import DesiredApplier
from device_agent.errors import AgentError, ConnectionLostError, PayloadTooLargeError
from device_agent.https_transport import POSTABLE_KINDS, HttpsTransport
from device_agent.logforward import DELIVERY_LOGGER_NAME, LogForwarder
from device_agent.outbox import Outbox, OutboxEntry, OutboxError
from device_agent.runtime import RuntimeState
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    DeviceMessage,
    DeviceState,
    InvalidTopicError,
    LogMessage,
    MalformedPayloadError,
    ReceiptMessage,
    TelemetryMessage,
    TopicKind,
    decode,
    parse_device_topic,
)

__all__ = ["STOPPED_REASON", "Agent", "Backoff", "State"]

logger = logging.getLogger(__name__)
# Records about moving messages (the pump, receipts): never forwarded, see logforward.py.
delivery_logger = logging.getLogger(DELIVERY_LOGGER_NAME)

# The reason on the retained ``offline`` status after a clean shutdown, as opposed to the Last
# Will's "connection lost": operators tell a maintenance stop from a failure by it.
STOPPED_REASON = "agent stopped"

# A run-wide loop that crashed (a bug) is restarted after this pause, so a loop that fails at
# once cannot spin the CPU of a small device while its errors are logged.
_LOOP_RESTART_DELAY_S = 5.0

# Received commands waiting for the commands loop. The broker queues the rest in the session, so
# a flood of commands stalls the inbound loop a little rather than growing memory.
_COMMAND_QUEUE_MAX = 100

# Ids of commands the HTTPS fallback handed to the commands loop. The service returns a command
# on every poll until its first ack is stored, and the processor would answer a second copy with
# a "replayed" rejection; far more than the service's per-device in-flight limit.
_POLLED_COMMANDS_MAX = 1024


class State(StrEnum):
    """Where the agent is in its lifecycle."""

    STARTING = "starting"
    CONNECTING = "connecting"
    ONLINE = "online"
    BACKING_OFF = "backing_off"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Backoff:
    """Capped exponential backoff with full jitter (each delay uniform in ``[0, ceiling]``).

    The ceiling doubles per failed attempt from ``min_s`` up to ``max_s``. Full jitter spreads a
    fleet's reconnects out after a broker restart instead of having every device retry at once.
    """

    def __init__(self, min_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got min_s={min_s} max_s={max_s}")
        self._min_s = min_s
        self._max_s = max_s
        # Jitter needs no cryptographic randomness.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Failed attempts since the last :meth:`reset`."""
        return self._attempt

    def ceiling(self, attempt: int) -> float:
        """The largest delay for the ``attempt``-th retry (counting from 0)."""
        # Exponent clamped so that a device that was offline for weeks cannot overflow a float.
        return min(self._max_s, self._min_s * 2.0 ** min(attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failed attempt."""
        delay = self._rng.uniform(0, self.ceiling(self._attempt))
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """Start over from ``min_s``, after a connection proved stable."""
        self._attempt = 0


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
        self._last_sample: TelemetryMessage | None = None
        self._online_since: float | None = None  # loop time of the current session's birth
        self._outbox: Outbox | None = None  # open while run() runs
        # Set by every put, so the pump wakes at once instead of at its next idle poll.
        self._outbox_ready = asyncio.Event()
        self._halt = asyncio.Event()  # stop was asked for, or a restart
        self._restart_requested = False
        self._commands: asyncio.Queue[bytes] = asyncio.Queue(maxsize=_COMMAND_QUEUE_MAX)
        # Whether an MQTT session is up, as a pair so the fallback can wait for either; since
        # when it has been down (loop time) and the last reason, for the fallback's grace period.
        self._mqtt_up = asyncio.Event()
        self._mqtt_down = asyncio.Event()
        self._mqtt_down_since = 0.0
        self._mqtt_down_reason = "not connected yet"
        self._polled_commands: OrderedDict[str, None] = OrderedDict()

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
                # Restores the last desired config before the first sample is taken.
                desired = DesiredApplier(self._state_dir.root, self._runtime)
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
                )
                resources.callback(processor.close)
                logger.info(
                    "outbox open path=%s depth=%d dropped=%s",
                    outbox.path,
                    outbox.depth(),
                    outbox.dropped(),
                )
                await self._run_all(stop, outbox, desired, processor, forwarder)
        finally:
            self._set_state(State.STOPPED)
            logger.info("agent stopped device_id=%s", self._identity.device_id)

    async def _run_all(
        self,
        stop: asyncio.Event,
        outbox: Outbox,
        desired: DesiredApplier,
        processor: CommandProcessor,
        forwarder: LogForwarder,
    ) -> None:
        """The run-wide loops next to the connection loop, until stop or a restart request."""
        self._mark_mqtt_down("not connected yet")
        async with asyncio.TaskGroup() as group:
            loops = [
                group.create_task(_relay(stop, self._halt), name="stop"),
                group.create_task(
                    self._supervised("telemetry", lambda: self._telemetry_loop(outbox)),
                    name="telemetry",
                ),
                group.create_task(
                    self._supervised(
                        "log-forwarder", lambda: forwarder.forward(self._store_logs(outbox))
                    ),
                    name="log-forwarder",
                ),
                group.create_task(
                    self._supervised("commands", lambda: self._command_loop(outbox, processor)),
                    name="commands",
                ),
                group.create_task(
                    self._supervised(
                        "https-fallback", lambda: self._https_fallback_loop(outbox, desired)
                    ),
                    name="https-fallback",
                ),
            ]
            await self._connection_loop(outbox, desired)
            for task in loops:
                task.cancel()

    async def _connection_loop(self, outbox: Outbox, desired: DesiredApplier) -> None:
        """Keep a session up until halted; reconnect with backoff whenever it ends."""
        halt = self._halt
        broker = f"{self._identity.mqtt_host}:{self._identity.mqtt_port}"
        while not halt.is_set():
            self._set_state(State.CONNECTING)
            try:
                await self._session(outbox, desired)
            except ConnectionLostError as exc:
                logger.warning("MQTT session with %s ended: %s", broker, exc)
                self._mark_mqtt_down(str(exc))
            except Exception as exc:
                # The one catch-all: whatever broke, the device must come back on its own.
                logger.exception("agent session crashed; restarting it")
                self._mark_mqtt_down(f"the session crashed: {exc!r}")
            else:
                return  # _session returns normally only once halted
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
            await _sleep_unless_set(halt, delay)

    async def _session(self, outbox: Outbox, desired: DesiredApplier) -> None:
        """One connection: birth, loops until halted (return) or loss (ConnectionLostError)."""
        self._online_since = None
        async with connect(self._identity, self._state_dir, self._settings) as connection:
            await connection.publish_status(DeviceState.ONLINE)
            self._online_since = asyncio.get_running_loop().time()
            self._mark_mqtt_up()
            self._set_state(State.ONLINE)
            await self._run_loops(connection, outbox, desired)
            self._set_state(State.STOPPING)
            try:
                await connection.publish_status(DeviceState.OFFLINE, reason=STOPPED_REASON)
            except ConnectionLostError as exc:
                logger.warning(
                    "could not announce the clean stop (%s); the broker's Last Will says "
                    "offline instead",
                    exc,
                )

    async def _run_loops(
        self, connection: Connection, outbox: Outbox, desired: DesiredApplier
    ) -> None:
        """Run the per-connection loops until halted; raise the error that ended them otherwise."""
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                loops = [
                    group.create_task(self._pump_loop(connection, outbox), name="outbox-pump"),
                    group.create_task(
                        self._inbound_loop(connection, outbox, desired), name="inbound"
                    ),
                ]
                await self._halt.wait()
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

    async def _telemetry_loop(self, outbox: Outbox) -> None:
        """Sample into the outbox now, then every ``telemetry_interval_s`` on a fixed schedule.

        The interval is re-read whenever the runtime config changes, measured from the last
        sample, so a shorter interval takes effect without waiting out the old one.
        """
        loop = asyncio.get_running_loop()
        changed = self._runtime.changed
        tick = loop.time()
        while True:
            message = await asyncio.to_thread(
                telemetry.sample, self._last_sample, disk_path=self._state_dir.root
            )
            self._last_sample = message
            try:
                await self._put(outbox, TopicKind.TELEMETRY, message)
            except OutboxError as exc:
                # This sample is lost; the next one may find the disk writable again.
                logger.warning("telemetry sample not stored: %s", exc)
            else:
                logger.debug("telemetry stored message_id=%s", message.message_id)
            while True:
                # A fixed schedule does not drift; ticks missed on a slow device are skipped
                # rather than sampled in a burst.
                tick = _next_tick(tick, self._runtime.telemetry_interval_s, loop.time())
                if not await _sleep_unless_set(changed, tick - loop.time()):
                    break
                changed.clear()

    def _store_logs(self, outbox: Outbox) -> Callable[[list[LogMessage]], Awaitable[None]]:
        async def store(batch: list[LogMessage]) -> None:
            try:
                await asyncio.to_thread(
                    outbox.put_many, [(TopicKind.LOGS, message, None, False) for message in batch]
                )
            except OutboxError as exc:
                logger.warning("%d forwarded log records not stored: %s", len(batch), exc)
                return
            self._outbox_ready.set()

        return store

    async def _command_loop(self, outbox: Outbox, processor: CommandProcessor) -> None:
        """Run received commands one at a time; each ack is stored before the next is made."""
        while True:
            payload = await self._commands.get()
            async for ack in processor.handle(payload):
                await self._put(outbox, TopicKind.ACKS, ack)

    async def _put(
        self,
        outbox: Outbox,
        kind: TopicKind,
        message: DeviceMessage,
        *,
        retain: bool = False,
    ) -> None:
        """Store ``message`` durably, then wake the pump."""
        await asyncio.to_thread(outbox.put, kind, message, retain=retain)
        self._outbox_ready.set()

    # -- per-connection loops -------------------------------------------------------------------

    async def _pump_loop(self, connection: Connection, outbox: Outbox) -> None:
        """Publish due outbox entries in order, at most ``drain_rate_per_s`` of them a second.

        An entry stays in the outbox after its PUBACK; it is due again ``receipt_timeout_s``
        after that unless a receipt deleted it meanwhile.
        """
        settings = self._settings
        ready = self._outbox_ready
        while True:
            # Cleared before looking, so a put landing after the look still wakes us.
            ready.clear()
            entries = await asyncio.to_thread(
                outbox.due,
                settings.pump_batch,
                resend_after_s=settings.receipt_timeout_s,
                now=time.monotonic(),
            )
            if not entries:
                await _sleep_unless_set(ready, settings.pump_idle_s)
                continue
            started = time.monotonic()
            await self._publish_batch(connection, outbox, entries)
            # Pacing per batch: a batch of n takes at least n / rate seconds.
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, len(entries) / settings.drain_rate_per_s - elapsed))

    async def _publish_batch(
        self, connection: Connection, outbox: Outbox, entries: list[OutboxEntry]
    ) -> None:
        """Publish ``entries`` pipelined (sent in order, PUBACKs awaited together)."""
        results = await asyncio.gather(
            *(connection.publish_entry(entry) for entry in entries), return_exceptions=True
        )
        sent: list[int] = []
        unsendable: list[str] = []
        failure: BaseException | None = None
        for entry, result in zip(entries, results, strict=True):
            if result is None:
                sent.append(entry.seq)
            elif isinstance(result, PayloadTooLargeError):
                # Stored by an agent with a larger limit; no broker of this fleet takes it.
                logger.error("dropping outbox entry message_id=%s: %s", entry.message_id, result)
                unsendable.append(entry.message_id)
            elif failure is None:
                failure = result
        if sent:
            await asyncio.to_thread(outbox.mark_sent, sent, time.monotonic())
        if unsendable:
            await asyncio.to_thread(outbox.confirm, unsendable)
        if failure is not None:
            raise failure
        delivery_logger.debug("published %d outbox entries, depth %d", len(sent), outbox.depth())

    async def _inbound_loop(
        self, connection: Connection, outbox: Outbox, desired: DesiredApplier
    ) -> None:
        """Dispatch delivered messages; this loop is also what notices a dropped connection."""
        async with contextlib.aclosing(connection.messages()) as messages:
            async for message in messages:
                try:
                    await self._dispatch(message, outbox, desired)
                except Exception:
                    # A supervisor of handlers: a message that breaks one (a retained desired
                    # state, redelivered at every connect) must not take the session down.
                    logger.exception("handling a message on %s failed; dropped", message.topic)

    async def _dispatch(
        self, message: InboundMessage, outbox: Outbox, desired: DesiredApplier
    ) -> None:
        try:
            topic = parse_device_topic(message.topic, prefix=self._identity.topic_prefix)
        except InvalidTopicError as exc:
            logger.warning("dropped a message on an unexpected topic: %s", exc)
            return
        if topic.device_id != self._identity.device_id:
            logger.warning("dropped a message for another device on %s", message.topic)
            return
        if topic.kind is TopicKind.RECEIPTS:
            try:
                receipt = decode(ReceiptMessage, message.payload)
            except MalformedPayloadError as exc:
                delivery_logger.warning("dropped a malformed receipt: %s", exc)
                return
            confirmed = await asyncio.to_thread(outbox.confirm, receipt.message_ids)
            delivery_logger.debug(
                "receipt named %d messages, %d were waiting; depth %d",
                len(receipt.message_ids),
                confirmed,
                outbox.depth(),
            )
        elif topic.kind is TopicKind.COMMANDS:
            await self._commands.put(message.payload)
        elif topic.kind is TopicKind.DESIRED:
            if not message.payload:
                # The service cleared its retained desired state: nothing to converge to.
                logger.debug("desired state cleared; keeping the current config")
                return
            reported = desired.apply(message.payload)
            if reported is not None:
                await self._put(outbox, TopicKind.REPORTED, reported, retain=True)
        else:
            logger.warning("dropped a %s message: devices do not receive those", topic.kind.value)

    # -- the HTTPS fallback ---------------------------------------------------------------------

    async def _https_fallback_loop(self, outbox: Outbox, desired: DesiredApplier) -> None:
        """After ``https_fallback_after_s`` without MQTT, run HTTPS rounds until a session is up.

        Measured from the agent's start or the loss of the last session, so a broker restart
        that the reconnect loop rides out never touches the HTTP API.
        """
        loop = asyncio.get_running_loop()
        settings = self._settings
        broker = f"{self._identity.mqtt_host}:{self._identity.mqtt_port}"
        while True:
            await self._mqtt_down.wait()
            grace = self._mqtt_down_since + settings.https_fallback_after_s - loop.time()
            if await _sleep_unless_set(self._mqtt_up, grace):
                continue  # MQTT came back within the grace period
            logger.warning(
                "no MQTT session with %s for %.0f s (last error: %s); falling back to HTTPS "
                "at %s every %.1f s while reconnecting",
                broker,
                loop.time() - self._mqtt_down_since,
                self._mqtt_down_reason,
                self._identity.service_url,
                settings.https_poll_interval_s,
            )
            async with asyncio.TaskGroup() as group:
                rounds = group.create_task(self._https_rounds(outbox, desired), name="https-rounds")
                await self._mqtt_up.wait()
                # Cancelled mid-request at worst: what was posted but not confirmed goes over MQTT
                # again, and the service stores each message id once.
                rounds.cancel()
            logger.info(
                "MQTT session with %s is up again; HTTPS fallback stopped, everything flows over "
                "MQTT",
                broker,
            )

    async def _https_rounds(self, outbox: Outbox, desired: DesiredApplier) -> None:
        """A round over HTTPS every ``https_poll_interval_s``; a failed one waits for the next."""
        interval = self._settings.https_poll_interval_s
        failing = False
        async with contextlib.AsyncExitStack() as resources:
            transport: HttpsTransport | None = None
            while True:
                try:
                    if transport is None:
                        transport = await resources.enter_async_context(
                            HttpsTransport.open(self._identity, self._state_dir, self._settings)
                        )
                    await self._https_round(transport, outbox, desired)
                except AgentError as exc:
                    # Said once per streak: a device with no network at all would otherwise
                    # fill its outbox with this warning, forwarded as a log every round.
                    if not failing:
                        logger.warning(
                            "HTTPS fallback round failed: %s; trying every %.1f s", exc, interval
                        )
                    else:
                        logger.debug("HTTPS fallback round failed again: %s", exc)
                    failing = True
                else:
                    if failing:
                        logger.info("HTTPS fallback rounds work again")
                    failing = False
                await asyncio.sleep(interval)

    async def _https_round(
        self, transport: HttpsTransport, outbox: Outbox, desired: DesiredApplier
    ) -> None:
        """Post what is due, take new commands and the desired state, post what they produced.

        Posting first lets the acks of commands handled last round reach the service before it
        is asked for pending commands again.
        """
        await self._post_due(transport, outbox)
        for command in await transport.poll_commands():
            if command.id in self._polled_commands:
                continue  # still pending at the service: its first ack is not stored yet
            await self._commands.put(command.to_payload())
            self._polled_commands[command.id] = None
            if len(self._polled_commands) > _POLLED_COMMANDS_MAX:
                self._polled_commands.popitem(last=False)
        state = await transport.fetch_desired()
        reported = desired.apply(state.to_payload())
        if reported is not None:
            await self._put(outbox, TopicKind.REPORTED, reported, retain=True)
        await self._post_due(transport, outbox)

    async def _post_due(self, transport: HttpsTransport, outbox: Outbox) -> None:
        """Post the due entries HTTPS takes, in order and paced like the pump; confirm them.

        The service's answer is the receipt: stored entries are deleted, rejected ones dropped
        (the service will never store them). Kinds HTTPS does not take stay for MQTT; they stay
        due too, so each read asks for that many more entries to get past them.
        """
        settings = self._settings
        skipped = 0
        while True:
            limit = settings.pump_batch + skipped
            entries = await asyncio.to_thread(
                outbox.due, limit, resend_after_s=settings.receipt_timeout_s, now=time.monotonic()
            )
            postable = [entry for entry in entries if entry.kind in POSTABLE_KINDS]
            skipped = len(entries) - len(postable)
            exhausted = len(entries) < limit
            if not postable:
                if exhausted:
                    return
                continue  # a full read of kinds HTTPS does not take: read further past them
            started = time.monotonic()
            receipt = await transport.send(postable)
            for message_id, reason in receipt.rejected.items():
                delivery_logger.error(
                    "dropping outbox entry message_id=%s: the service rejected it: %s",
                    message_id,
                    reason,
                )
            done = receipt.stored | receipt.rejected.keys()
            # Not named in the answer (a service that lost them): due again after
            # receipt_timeout_s, exactly like an MQTT entry whose receipt never came.
            unconfirmed = [entry.seq for entry in postable if entry.message_id not in done]
            if unconfirmed:
                await asyncio.to_thread(outbox.mark_sent, unconfirmed, time.monotonic())
            confirmed = await asyncio.to_thread(outbox.confirm, done)
            delivery_logger.debug(
                "posted %d outbox entries over HTTPS, %d confirmed; depth %d",
                len(postable),
                confirmed,
                outbox.depth(),
            )
            if exhausted:
                return
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, len(postable) / settings.drain_rate_per_s - elapsed))

    # -- helpers --------------------------------------------------------------------------------

    def _mark_mqtt_up(self) -> None:
        self._mqtt_down.clear()
        self._mqtt_up.set()

    def _mark_mqtt_down(self, reason: str) -> None:
        """Record why MQTT is unavailable; the time counts from the first failure in a row."""
        self._mqtt_down_reason = reason
        if self._mqtt_down.is_set():
            return
        self._mqtt_down_since = asyncio.get_running_loop().time()
        self._mqtt_up.clear()
        self._mqtt_down.set()

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


async def _sleep_unless_set(event: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``event`` is set, whichever comes first; whether set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, delay)):
            await event.wait()
    return event.is_set()


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    """Set ``target`` once ``source`` is set."""
    await source.wait()
    target.set()


def _next_tick(tick: float, interval: float, now: float) -> float:
    """The first time of the schedule ``tick + k * interval`` (k >= 1) that is after ``now``."""
    return tick + max(1, math.floor((now - tick) / interval) + 1) * interval
