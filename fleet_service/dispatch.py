"""The downstream loop: publish stored commands, expire the silent ones, republish desired state.

Commands are stored by the API and handed to the broker here, so a command created while the
service has no broker connection simply waits. On every (re)connect the retained desired state
of every device is published again, in case the broker lost it (its persistence is a snapshot).
Desired state changed by another process (the CLI, a rollout on another replica) is noticed by
its ``desired_updated_at`` and published too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, update
from sqlmodel import col, select

from fleet_protocol import DesiredState, RuntimeConfig, TopicKind, device_topic
from fleet_service.background import background_task
from fleet_service.commands import (
    command_message,
    command_public,
    due_for_publishing,
    expire_overdue,
)
from fleet_service.config import CommandLimits
from fleet_service.db import session_scope
from fleet_service.desired import desired_assignments
from fleet_service.events import EventHub
from fleet_service.ingest import MqttIngestor
from fleet_service.registry import device_public
from fleet_service.tables import Command, Device

__all__ = ["Dispatcher", "desired_message"]

logger = logging.getLogger(__name__)

# Commands handed to the broker per pass; the next pass follows at once when there were more.
PUBLISH_BATCH = 200
# How far back each pass looks for desired state changed elsewhere: longer than any transaction
# that changes it takes to commit, so a change stamped before a pass but committed after it is
# still seen by the next one. Each generation is published once per process all the same.
DESIRED_LOOKBACK = timedelta(seconds=60)


def desired_message(device: Device) -> DesiredState:
    """The retained desired state of ``device``: its runtime config and model assignments."""
    return DesiredState(
        generation=device.desired_generation,
        config=RuntimeConfig.model_validate(device.desired_config or {}),
        models=desired_assignments(device),
    )


class Dispatcher:
    """Owns the ``command-dispatcher`` loop; ``wake()`` after storing a command."""

    def __init__(
        self,
        engine: Engine,
        link: MqttIngestor,
        hub: EventHub,
        *,
        topic_prefix: str,
        interval_s: float,
        limits: CommandLimits,
    ) -> None:
        self._engine = engine
        self._link = link
        self._hub = hub
        self._prefix = topic_prefix
        self._interval_s = interval_s
        self._limits = limits
        self._wakeup = asyncio.Event()
        self._desired_changed: set[str] = set()
        # Generation last published per device by this process.
        self._published: dict[str, int] = {}

    def wake(self) -> None:
        """Run a pass now rather than at the next interval."""
        self._wakeup.set()

    def desired_changed(self, device_id: str) -> None:
        """Publish this device's desired state on the next pass."""
        self._desired_changed.add(device_id)
        self._wakeup.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Dispatcher]:
        """Run the loop until the context exits."""
        async with background_task("command-dispatcher", self._run):
            yield self

    async def _run(self) -> None:
        announced = False
        while True:
            try:
                if self._link.connected.is_set() and not announced:
                    announced = await self._republish_desired()
                elif not self._link.connected.is_set():
                    announced = False
                more = await self._pass()
            except Exception:  # supervisor loop: log and keep dispatching
                logger.exception("command dispatcher pass failed; retrying")
                more = False
            if more:
                continue
            self._wakeup.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._interval_s)

    async def _pass(self) -> bool:
        if self._link.connected.is_set():
            await self._publish_changed_desired()
        now = datetime.now(UTC)
        expired, due = await asyncio.to_thread(self._load, now)
        for command in expired:
            self._hub.publish("command", command_public(command))
        if not due or not self._link.connected.is_set():
            return False
        # Claim before publishing, so two service replicas never both send one command.
        claimed = await asyncio.to_thread(self._claim, [c.id for c in due], datetime.now(UTC))
        failed = []
        for command in due:
            if command.id not in claimed:
                continue
            topic = device_topic(command.device_id, TopicKind.COMMANDS, prefix=self._prefix)
            if not await self._link.publish(topic, command_message(command).to_payload()):
                failed.append(command.id)
        if failed:
            await asyncio.to_thread(self._unclaim, failed)
        return len(due) == PUBLISH_BATCH and not failed

    def _load(self, now: datetime) -> tuple[list[Command], list[Command]]:
        with session_scope(self._engine) as session:
            expired_ids = expire_overdue(session, now)
            session.flush()
            expired = (
                list(session.exec(select(Command).where(col(Command.id).in_(expired_ids))))
                if expired_ids
                else []
            )
            due = due_for_publishing(session, now, PUBLISH_BATCH, self._limits)
            return expired, due

    def _claim(self, ids: list[str], now: datetime) -> set[str]:
        claimed = set()
        with session_scope(self._engine) as session:
            for command_id in ids:
                result = session.execute(
                    update(Command)
                    .where(col(Command.id) == command_id, col(Command.published_at).is_(None))
                    .values(published_at=now)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]  # CursorResult
                    claimed.add(command_id)
        return claimed

    def _unclaim(self, ids: list[str]) -> None:
        with session_scope(self._engine) as session:
            session.execute(
                update(Command).where(col(Command.id).in_(ids)).values(published_at=None)
            )

    async def _republish_desired(self) -> bool:
        devices = await asyncio.to_thread(self._desired_devices)
        for device in devices:
            topic = device_topic(device.id, TopicKind.DESIRED, prefix=self._prefix)
            if not await self._link.publish(
                topic, desired_message(device).to_payload(), retain=True
            ):
                return False
            self._published[device.id] = device.desired_generation
        logger.info("republished desired state of %d devices", len(devices))
        return True

    async def _publish_changed_desired(self) -> None:
        ids, self._desired_changed = self._desired_changed, set()
        since = datetime.now(UTC) - DESIRED_LOOKBACK
        devices = await asyncio.to_thread(self._desired_devices, ids, since)
        for device in devices:
            if self._published.get(device.id) == device.desired_generation:
                # Already out, retained: a generation's contents never change, so sending it
                # again would only wake the device for nothing.
                continue
            topic = device_topic(device.id, TopicKind.DESIRED, prefix=self._prefix)
            payload = desired_message(device).to_payload()
            if not await self._link.publish(topic, payload, retain=True):
                self._desired_changed.add(device.id)  # try again on the next pass
                continue
            self._published[device.id] = device.desired_generation
            self._hub.publish("device", device_public(device))

    def _desired_devices(
        self, only: set[str] | None = None, changed_since: datetime | None = None
    ) -> list[Device]:
        """Devices with a desired state: all, or those in ``only`` or changed since then.

        Revoked devices are left out: a decommissioned device's retained desired state was
        cleared on purpose and must not come back when the service reconnects.
        """
        with session_scope(self._engine) as session:
            query = select(Device).where(
                col(Device.desired_generation) > 0, col(Device.revoked_at).is_(None)
            )
            if changed_since is not None:
                recent = col(Device.desired_updated_at) >= changed_since
                query = query.where(recent | col(Device.id).in_(only or set()))
            elif only is not None:
                query = query.where(col(Device.id).in_(only))
            return list(session.exec(query))
