"""The HTTPS fallback: while MQTT stays down, deliver the outbox and poll over the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from device_agent.backoff import sleep_unless_set
from device_agent.config import AgentSettings
from device_agent.desired import DesiredApplier
from device_agent.errors import AgentError
from device_agent.https_transport import POSTABLE_KINDS, HttpsTransport
from device_agent.logforward import DELIVERY_LOGGER_NAME
from device_agent.outbox import Outbox
from device_agent.state import DeviceIdentity, StateDir
from fleet_protocol import ReportedState

__all__ = ["HttpsFallback", "MqttLink"]

logger = logging.getLogger(__name__)
# Records about moving messages: never forwarded, see logforward.py.
delivery_logger = logging.getLogger(DELIVERY_LOGGER_NAME)

# Ids of commands the HTTPS fallback handed to the commands loop. The service returns a command
# on every poll until its first ack is stored, and the processor would answer a second copy with
# a "replayed" rejection; far more than the service's per-device in-flight limit.
_POLLED_COMMANDS_MAX = 1024


class MqttLink:
    """Whether an MQTT session is up; since when it has been down, and why.

    Kept as a pair of events so the fallback can wait for either; the time and reason are for
    the fallback's grace period and its warning.
    """

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.down = asyncio.Event()
        self.down_since = 0.0  # loop time of the first failure in a row
        self.down_reason = "not connected yet"

    def mark_up(self) -> None:
        """A session is up."""
        self.down.clear()
        self.up.set()

    def mark_down(self, reason: str) -> None:
        """Record why MQTT is unavailable; the time counts from the first failure in a row."""
        self.down_reason = reason
        if self.down.is_set():
            return
        self.down_since = asyncio.get_running_loop().time()
        self.up.clear()
        self.down.set()


class HttpsFallback:
    """The ``https-fallback`` loop: HTTPS rounds after ``https_fallback_after_s`` without MQTT.

    Every ``https_poll_interval_s`` a round posts the due outbox entries (the answer confirms
    them, as a receipt would), polls commands and desired state; the rounds stop as soon as a
    session is up again, while the connection loop keeps trying MQTT with its backoff all along.
    """

    def __init__(
        self,
        settings: AgentSettings,
        identity: DeviceIdentity,
        state_dir: StateDir,
        *,
        outbox: Outbox,
        commands: asyncio.Queue[bytes],
        desired: DesiredApplier,
        report: Callable[[ReportedState], Awaitable[None]],
        link: MqttLink,
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._state_dir = state_dir
        self._outbox = outbox
        self._commands = commands
        self._desired = desired
        self._report = report
        self._link = link
        self._polled_commands: OrderedDict[str, None] = OrderedDict()

    async def run(self) -> None:
        """After ``https_fallback_after_s`` without MQTT, run HTTPS rounds until a session is up.

        Measured from the agent's start or the loss of the last session, so a broker restart
        that the reconnect loop rides out never touches the HTTP API.
        """
        loop = asyncio.get_running_loop()
        settings = self._settings
        link = self._link
        broker = f"{self._identity.mqtt_host}:{self._identity.mqtt_port}"
        while True:
            await link.down.wait()
            grace = link.down_since + settings.https_fallback_after_s - loop.time()
            if await sleep_unless_set(link.up, grace):
                continue  # MQTT came back within the grace period
            logger.warning(
                "no MQTT session with %s for %.0f s (last error: %s); falling back to HTTPS "
                "at %s every %.1f s while reconnecting",
                broker,
                loop.time() - link.down_since,
                link.down_reason,
                self._identity.service_url,
                settings.https_poll_interval_s,
            )
            async with asyncio.TaskGroup() as group:
                rounds = group.create_task(self._rounds(), name="https-rounds")
                await link.up.wait()
                # Cancelled mid-request at worst: what was posted but not confirmed goes over MQTT
                # again, and the service stores each message id once.
                rounds.cancel()
            logger.info(
                "MQTT session with %s is up again; HTTPS fallback stopped, everything flows over "
                "MQTT",
                broker,
            )

    async def _rounds(self) -> None:
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
                    await self._round(transport)
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

    async def _round(self, transport: HttpsTransport) -> None:
        """Post what is due, take new commands and the desired state, post what they produced.

        Posting first lets the acks of commands handled last round reach the service before it
        is asked for pending commands again.
        """
        await self._post_due(transport)
        for command in await transport.poll_commands():
            if command.id in self._polled_commands:
                continue  # still pending at the service: its first ack is not stored yet
            await self._commands.put(command.to_payload())
            self._polled_commands[command.id] = None
            if len(self._polled_commands) > _POLLED_COMMANDS_MAX:
                self._polled_commands.popitem(last=False)
        state = await transport.fetch_desired()
        reported = self._desired.apply(state.to_payload())
        if reported is not None:
            await self._report(reported)
        await self._post_due(transport)

    async def _post_due(self, transport: HttpsTransport) -> None:
        """Post the due entries HTTPS takes, in order and paced like the pump; confirm them.

        The service's answer is the receipt: stored entries are deleted, rejected ones dropped
        (the service will never store them). Kinds HTTPS does not take stay for MQTT; they stay
        due too, so each read asks for that many more entries to get past them.
        """
        settings = self._settings
        outbox = self._outbox
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
