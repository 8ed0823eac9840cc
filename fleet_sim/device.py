"""One simulated device: a real mTLS session kept up with backoff, its loops, commands, desired.

The wire behaviour is the agent's, reused rather than copied: ``device_agent.connection.connect``
makes the session (client id = device id, persistent session, retained Last Will ``offline``,
QoS 1 subscriptions to ``commands``, ``receipts``, ``desired`` and ``certificate``),
``device_agent.commands.CommandProcessor`` turns commands into the agent's acks (replays refused
through the device's own ``commands.db``), ``device_agent.desired.DesiredApplier`` applies
desired state and makes the ``reported`` answer, and ``device_agent.backoff.Backoff`` paces
reconnects. Loops of one device:

    produce     telemetry every interval from a random phase, results as a Poisson stream,
                both into the in-memory outbox whether or not a session is up
    connection  keeps a session up; per session: birth ``online``, then ``pump`` (publish what
                the outbox says is due, paced at the agent's drain rate) and ``inbound``
                (receipts, commands, desired state) until stop, restart or a lost connection
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from device_agent.agent import STOPPED_REASON
from device_agent.backoff import Backoff, sleep_unless_set
from device_agent.commands import CommandProcessor
from device_agent.config import AgentSettings
from device_agent.connection import Connection, InboundMessage, connect
from device_agent.desired import DesiredApplier
from device_agent.errors import AgentError, ConnectionLostError, PayloadTooLargeError
from device_agent.runtime import RuntimeState
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import (
    DeviceState,
    InvalidTopicError,
    MalformedPayloadError,
    ReceiptMessage,
    TopicKind,
    decode,
    parse_device_topic,
)
from fleet_sim.outbox import MemoryOutbox, OutboxEntry
from fleet_sim.payloads import ResultModel, TelemetryModel
from fleet_sim.settings import SimSettings
from fleet_sim.stats import SimStats

__all__ = ["DeviceFiles", "SimDevice"]

logger = logging.getLogger(__name__)

# Lines a device keeps for the collect-logs command, like the agent's recent-log ring.
_RECENT_LOG_LINES = 50


@dataclass(frozen=True, slots=True)
class DeviceFiles:
    """What a device reads from its state dir before it starts (blocking: load in a thread)."""

    identity: DeviceIdentity
    state: StateDir
    certificate: tuple[str, datetime]

    @classmethod
    def load(cls, state: StateDir) -> DeviceFiles:
        """Read and check the identity and certificate; raises the agent's StateDirError."""
        identity = state.load_identity()
        cert = x509.load_pem_x509_certificate(state.cert_path.read_bytes())
        return cls(identity, state, (format(cert.serial_number, "x"), cert.not_valid_after_utc))


class SimDevice:
    """One simulated device; :meth:`run` until ``stop`` is set, then it announces offline."""

    def __init__(
        self,
        files: DeviceFiles,
        desired: DesiredApplier,
        runtime: RuntimeState,
        *,
        agent: AgentSettings,
        sim: SimSettings,
        stats: SimStats,
        rng: random.Random,
    ) -> None:
        self.identity = files.identity
        self._state = files.state
        self._desired = desired
        self._runtime = runtime
        self._agent = agent
        self._sim = sim
        self._stats = stats
        self._rng = rng
        self._telemetry = TelemetryModel(rng, files.certificate)
        self._results = ResultModel(rng)
        self._outbox = MemoryOutbox(sim.outbox_max_messages)
        self._backoff = Backoff(agent.reconnect_min_s, agent.reconnect_max_s, rng=rng)
        self._ready = asyncio.Event()  # something was put into the outbox
        self._restart = asyncio.Event()  # a restart-agent command asked for a new session
        self._online_since: float | None = None
        self._recent: deque[str] = deque(maxlen=_RECENT_LOG_LINES)

    @classmethod
    def open(
        cls,
        state: StateDir,
        *,
        agent: AgentSettings,
        sim: SimSettings,
        stats: SimStats,
        rng: random.Random,
    ) -> SimDevice:
        """Load the device from its state dir (blocking: call it in a thread)."""
        files = DeviceFiles.load(state)
        runtime = RuntimeState(
            telemetry_interval_s=sim.telemetry_interval_s,
            log_level=agent.log_level,
            log_forward_level=agent.log_forward_level,
        )
        desired = DesiredApplier(state.root, runtime)
        return cls(files, desired, runtime, agent=agent, sim=sim, stats=stats, rng=rng)

    async def run(self, stop: asyncio.Event) -> None:
        """Produce messages and keep a session up until ``stop``; then announce offline."""
        producer = asyncio.create_task(self._produce(), name=f"produce-{self.identity.device_id}")
        try:
            await self._connection_loop(stop)
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    # -- producing ------------------------------------------------------------------------------

    async def _produce(self) -> None:
        """Telemetry on a fixed schedule from a random phase; results as a Poisson stream."""
        loop = asyncio.get_running_loop()
        rng, runtime = self._rng, self._runtime
        now = loop.time()
        next_telemetry = now + rng.uniform(0, runtime.telemetry_interval_s)
        next_result = self._next_result(now)
        while True:
            wake = min(next_telemetry, next_result)
            if await sleep_unless_set(runtime.changed, wake - loop.time()):
                # set-config or desired state changed the interval: take effect from now.
                runtime.changed.clear()
                next_telemetry = min(next_telemetry, loop.time() + runtime.telemetry_interval_s)
                continue
            now = loop.time()
            if now >= next_telemetry:
                self._put(OutboxEntry(TopicKind.TELEMETRY, self._telemetry.sample()))
                next_telemetry = _next_tick(next_telemetry, runtime.telemetry_interval_s, now)
            if now >= next_result:
                result = self._results.sample()
                self._put(OutboxEntry(TopicKind.RESULTS, result, model=result.model))
                next_result = self._next_result(now)

    def _next_result(self, now: float) -> float:
        mean = self._sim.results_interval_s
        return now + self._rng.expovariate(1 / mean) if mean > 0 else math.inf

    def _put(self, entry: OutboxEntry) -> None:
        self._stats.dropped += self._outbox.put(entry)
        self._ready.set()

    # -- the session ----------------------------------------------------------------------------

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        """Keep a session up until ``stop``; reconnect with the agent's jittered backoff."""
        while not stop.is_set():
            try:
                await self._session(stop)
            except ConnectionLostError as exc:
                self._note(f"MQTT session ended: {exc}")
                logger.debug("device_id=%s session ended: %s", self.identity.device_id, exc)
            except Exception as exc:
                # The one catch-all: whatever broke, the device must come back on its own.
                logger.exception(
                    "device_id=%s session crashed; reconnecting", self.identity.device_id
                )
                self._note(f"session crashed: {exc!r}")
            else:
                if stop.is_set():
                    return
                continue  # a restart-agent command: a new session at once, as a restart makes
            if stop.is_set():
                return
            if self._was_stable():
                self._backoff.reset()
            await sleep_unless_set(stop, self._backoff.next_delay())

    async def _session(self, stop: asyncio.Event) -> None:
        """One connection: birth, then pump and inbound until stop or restart (return) or a
        lost connection (ConnectionLostError)."""
        self._online_since = None
        stats = self._stats
        connected = False
        try:
            async with connect(self.identity, self._state, self._agent) as connection:
                connected = True
                await connection.publish_status(DeviceState.ONLINE)
                stats.published["status"] += 1
                self._online_since = time.monotonic()
                stats.connected_once(self.identity.device_id)
                self._note("connected")
                try:
                    await self._run_loops(connection, stop)
                finally:
                    stats.connected -= 1
                await self._announce_stop(connection)
        except ConnectionLostError:
            if connected:
                stats.connection_losses += 1
            else:
                stats.connect_failures += 1
            raise

    async def _run_loops(self, connection: Connection, stop: asyncio.Event) -> None:
        self._restart.clear()
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                loops = [
                    group.create_task(self._pump(connection)),
                    group.create_task(self._inbound(connection)),
                ]
                await _either(stop, self._restart)
                for task in loops:
                    task.cancel()
        except ExceptionGroup as errors:
            failure = _primary_error(errors)
        if failure is not None:
            raise failure

    async def _announce_stop(self, connection: Connection) -> None:
        """The clean stop's retained ``offline`` (a restart says so too, as the agent does)."""
        try:
            await connection.publish_status(DeviceState.OFFLINE, reason=STOPPED_REASON)
        except ConnectionLostError as exc:
            logger.debug(
                "device_id=%s could not announce its stop: %s", self.identity.device_id, exc
            )
        else:
            self._stats.published["status"] += 1

    async def _pump(self, connection: Connection) -> None:
        """Publish due outbox entries in order, pipelined, at most ``drain_rate_per_s``."""
        agent, outbox, ready, stats = self._agent, self._outbox, self._ready, self._stats
        resend_after = agent.receipt_timeout_s
        while True:
            ready.clear()
            entries = outbox.due(
                agent.pump_batch, now=time.monotonic(), resend_after_s=resend_after
            )
            if not entries:
                # Sleeps until something is put or the earliest unreceipted message is due
                # again; no polling, since ten thousand devices polling once a second is work.
                due_at = outbox.next_due_at(resend_after)
                if due_at is None:
                    await ready.wait()
                else:
                    await sleep_unless_set(ready, due_at - time.monotonic())
                continue
            started = time.monotonic()
            results = await asyncio.gather(
                *(
                    connection.publish(e.kind, e.message, retain=e.retain, model=e.model)
                    for e in entries
                ),
                return_exceptions=True,
            )
            now = time.monotonic()
            failure: BaseException | None = None
            for entry, result in zip(entries, results, strict=True):
                if result is None:
                    entry.sent_at = now
                    stats.published[entry.kind.value] += 1
                elif isinstance(result, PayloadTooLargeError):
                    outbox.confirm([entry.message.message_id])
                    stats.dropped += 1
                else:
                    stats.publish_failures += 1
                    failure = failure or result
            if failure is not None:
                raise failure
            await asyncio.sleep(max(0.0, len(entries) / agent.drain_rate_per_s - (now - started)))

    async def _inbound(self, connection: Connection) -> None:
        """Dispatch what the broker delivers; also what notices a dropped connection."""
        async with contextlib.aclosing(connection.messages()) as messages:
            async for message in messages:
                try:
                    await self._dispatch(message)
                except (AgentError, OSError) as exc:
                    # A command's commands.db or desired.json could not be written.
                    logger.warning(
                        "device_id=%s could not handle %s: %s",
                        self.identity.device_id,
                        message.topic,
                        exc,
                    )

    async def _dispatch(self, message: InboundMessage) -> None:
        try:
            topic = parse_device_topic(message.topic, prefix=self.identity.topic_prefix)
        except InvalidTopicError as exc:
            logger.warning("dropped a message on an unexpected topic: %s", exc)
            return
        if topic.kind is TopicKind.RECEIPTS:
            self._receipt(message.payload)
        elif topic.kind is TopicKind.COMMANDS:
            await self._command(message.payload)
        elif topic.kind is TopicKind.DESIRED and message.payload:
            reported = await asyncio.to_thread(self._desired.apply, message.payload)
            if reported is not None:
                self._put(OutboxEntry(TopicKind.REPORTED, reported, retain=True))
        # ``certificate`` answers a renewal, which simulated devices never ask for.

    def _receipt(self, payload: bytes) -> None:
        try:
            receipt = decode(ReceiptMessage, payload)
        except MalformedPayloadError as exc:
            logger.warning("dropped a malformed receipt: %s", exc)
            return
        stats = self._stats
        stats.receipts += 1
        now = datetime.now(UTC)
        for entry in self._outbox.confirm(receipt.message_ids):
            stats.confirmed += 1
            if entry.kind is TopicKind.TELEMETRY:
                stats.receipt_lag((now - entry.message.timestamp).total_seconds())

    async def _command(self, payload: bytes) -> None:
        """Answer a command with the agent's own processor and acks."""
        self._stats.commands += 1
        # Opened per command: ten thousand open SQLite files would cost more than commands do.
        processor = await asyncio.to_thread(
            CommandProcessor,
            self._state.root,
            self._runtime,
            request_restart=self._restart.set,
            recent_logs=lambda: list(self._recent),
        )
        try:
            async for ack in processor.handle(payload):
                self._put(OutboxEntry(TopicKind.ACKS, ack))
                self._note(f"command {ack.command_id} {ack.status.value}")
        finally:
            await asyncio.to_thread(processor.close)

    # -- helpers --------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        self._recent.append(f"{datetime.now(UTC).isoformat(timespec='seconds')} {text}")

    def _was_stable(self) -> bool:
        if self._online_since is None:
            return False
        return time.monotonic() - self._online_since >= self._agent.stable_connection_s


def _next_tick(tick: float, interval: float, now: float) -> float:
    """The first time of the schedule ``tick + k * interval`` (k >= 1) after ``now``."""
    return tick + max(1, math.floor((now - tick) / interval) + 1) * interval


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _primary_error(errors: BaseExceptionGroup[BaseException]) -> BaseException:
    """A lost connection explains everything that failed with it; report that one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [errors]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    for leaf in leaves:
        if isinstance(leaf, ConnectionLostError):
            return leaf
    return leaves[0] if len(leaves) == 1 else errors
