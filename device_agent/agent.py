"""The agent's supervisor: connect, announce, run the named loops, reconnect with backoff, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from enum import StrEnum

from device_agent import telemetry
from device_agent.config import AgentSettings
from device_agent.connection import Connection, connect
from device_agent.errors import ConnectionLostError
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import DeviceState, TelemetryMessage

__all__ = ["STOPPED_REASON", "Agent", "Backoff", "State"]

logger = logging.getLogger(__name__)

# The reason on the retained ``offline`` status after a clean shutdown, as opposed to the Last
# Will's "connection lost": operators tell a maintenance stop from a failure by it.
STOPPED_REASON = "agent stopped"


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
    """One device's runtime: keeps an MQTT session up and runs the agent's loops inside it."""

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
        self._state = State.STARTING
        self._waiters: dict[State, list[asyncio.Future[None]]] = {}
        self._last_sample: TelemetryMessage | None = None
        self._online_since: float | None = None  # loop time of the current session's birth

    @property
    def state(self) -> State:
        """The current lifecycle state."""
        return self._state

    async def wait_for_state(self, state: State) -> None:
        """Return when the agent next enters ``state``, or at once if it is in it now."""
        if self._state is state:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(state, []).append(waiter)
        await waiter

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set: then announce ``offline``, disconnect cleanly and return."""
        if self._state is not State.STARTING:
            raise RuntimeError(f"agent for {self._identity.device_id} already ran; make a new one")
        broker = f"{self._identity.mqtt_host}:{self._identity.mqtt_port}"
        try:
            while not stop.is_set():
                self._set_state(State.CONNECTING)
                try:
                    await self._session(stop)
                except ConnectionLostError as exc:
                    logger.warning("MQTT session with %s ended: %s", broker, exc)
                except Exception:
                    # The one catch-all: whatever broke, the device must come back on its own.
                    logger.exception("agent session crashed; restarting it")
                else:
                    return  # _session returns normally only once stop is set
                if stop.is_set():
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
                await _sleep_unless_set(stop, delay)
        finally:
            self._set_state(State.STOPPED)
            logger.info("agent stopped device_id=%s", self._identity.device_id)

    async def _session(self, stop: asyncio.Event) -> None:
        """One connection: birth, loops until stop (return) or loss (ConnectionLostError)."""
        self._online_since = None
        async with connect(self._identity, self._state_dir, self._settings) as connection:
            await connection.publish_status(DeviceState.ONLINE)
            self._online_since = asyncio.get_running_loop().time()
            self._set_state(State.ONLINE)
            await self._run_loops(connection, stop)
            self._set_state(State.STOPPING)
            try:
                await connection.publish_status(DeviceState.OFFLINE, reason=STOPPED_REASON)
            except ConnectionLostError as exc:
                logger.warning(
                    "could not announce the clean stop (%s); the broker's Last Will says "
                    "offline instead",
                    exc,
                )

    async def _run_loops(self, connection: Connection, stop: asyncio.Event) -> None:
        """Run the named loops until ``stop`` is set; raise the error that ended them otherwise."""
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                loops = [
                    group.create_task(self._telemetry_loop(connection), name="telemetry"),
                    group.create_task(self._inbox_loop(connection), name="inbox"),
                ]
                await stop.wait()
                for task in loops:
                    task.cancel()
        except ExceptionGroup as errors:
            failure = _primary_error(errors)
        if failure is not None:
            # Raised outside the except block, so it does not drag the group along as context.
            raise failure

    async def _telemetry_loop(self, connection: Connection) -> None:
        """Sample and publish now, then every ``telemetry_interval_s`` on a fixed schedule."""
        interval = self._settings.telemetry_interval_s
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            message = await asyncio.to_thread(
                telemetry.sample, self._last_sample, disk_path=self._state_dir.root
            )
            self._last_sample = message
            await connection.publish_telemetry(message)
            logger.debug("published telemetry message_id=%s", message.message_id)
            # A fixed schedule does not drift; ticks missed on a slow link are skipped rather
            # than sent in a burst.
            now = loop.time()
            while due <= now:
                due += interval
            await asyncio.sleep(due - now)

    async def _inbox_loop(self, connection: Connection) -> None:
        """Drain delivered messages; this loop is also what notices a dropped connection."""
        async with contextlib.aclosing(connection.messages()) as messages:
            async for message in messages:
                # Commands and desired state get handlers of their own; until then a message
                # left in the persistent session is acknowledged and dropped.
                logger.debug("no handler for message on %s; dropped", message.topic)

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


async def _sleep_unless_set(event: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await event.wait()
