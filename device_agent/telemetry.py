"""Sample this machine's health with psutil into a ``TelemetryMessage``; the ``telemetry`` loop.

:func:`sample` blocks (use a thread); :class:`Sampler` runs it on the agent's schedule.
"""

from __future__ import annotations

import asyncio
import logging
import math
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path

import psutil

from device_agent import __version__
from device_agent.backoff import sleep_unless_set
from device_agent.outbox import OutboxError
from device_agent.runtime import RuntimeState
from fleet_protocol import ModelRuntime, TelemetryMessage, TopicKind

__all__ = ["Sampler", "sample"]

logger = logging.getLogger(__name__)

# Taken at import, i.e. when the agent process starts. Monotonic, because a Raspberry Pi has no
# real-time clock: its wall clock jumps by years when NTP first syncs after boot.
_STARTED = time.monotonic()

# psutil measures CPU use between two calls and its very first call has no baseline (it returns a
# meaningless 0.0). So the first sample measures this short window itself; every later sample is
# non-blocking and covers the whole interval since the previous one.
_FIRST_CPU_WINDOW_S = 0.1

# Sensor chips that report the CPU/SoC die: Raspberry Pi, Intel, AMD. Otherwise the first one.
_PREFERRED_SENSORS = ("cpu_thermal", "coretemp", "k10temp")

# The bounds TelemetryMessage accepts; a sensor outside them is broken, so report no temperature.
_MIN_TEMP_C = -80.0
_MAX_TEMP_C = 200.0


def sample(
    prev: TelemetryMessage | None,
    *,
    disk_path: Path,
    runtimes: Sequence[ModelRuntime] = (),
    certificate: tuple[str, datetime] | None = None,
) -> TelemetryMessage:
    """Measure the machine now; ``prev`` is this process's previous sample, None for the first.

    ``disk_path`` picks the filesystem whose usage is reported: the agent passes its state dir,
    which is where models and the outbox live too. ``runtimes`` are the model runtimes that
    import here (``device_agent.inference.available_runtimes()``, found once at start): with
    ``memory_available_bytes`` they are what a deployment checks a model's constraints against.
    ``certificate`` is the serial and expiry of the device certificate held now.
    Blocks (briefly longer for the first sample):
    call it with ``asyncio.to_thread``.
    """
    cpu_window = _FIRST_CPU_WINDOW_S if prev is None else None
    cpu = psutil.cpu_percent(interval=cpu_window)
    load_1, load_5, load_15 = psutil.getloadavg()
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(disk_path))
    net = psutil.net_io_counters()
    return TelemetryMessage(
        cpu_percent=min(cpu, 100.0),
        load_1=load_1,
        load_5=load_5,
        load_15=load_15,
        memory_percent=memory.percent,
        memory_used_bytes=memory.used,
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        disk_percent=disk.percent,
        disk_used_bytes=disk.used,
        disk_total_bytes=disk.total,
        # A machine with no network interface at all gets None from psutil.
        net_bytes_sent=net.bytes_sent if net is not None else 0,
        net_bytes_recv=net.bytes_recv if net is not None else 0,
        temperature_c=_temperature_c(),
        uptime_s=time.monotonic() - _STARTED,
        agent_version=__version__,
        architecture=platform.machine()[:32],
        platform=platform.platform()[:200],
        runtimes=list(runtimes),
        cert_serial=certificate[0] if certificate else None,
        cert_not_after=certificate[1] if certificate else None,
    )


def _temperature_c() -> float | None:
    """The CPU temperature where the hardware has a sensor psutil can read, else None."""
    # Only Linux and FreeBSD have sensors_temperatures; macOS and Windows lack the attribute.
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except OSError as exc:  # an unreadable hwmon file must not cost the whole sample
        logger.debug("cannot read temperature sensors: %s", exc)
        return None
    chips = [name for name in _PREFERRED_SENSORS if sensors.get(name)]
    chips += [name for name, entries in sensors.items() if entries and name not in chips]
    if not chips:
        return None
    current = float(sensors[chips[0]][0].current)
    return current if _MIN_TEMP_C <= current <= _MAX_TEMP_C else None


class Sampler:
    """The ``telemetry`` loop: a sample into the outbox now, then every telemetry interval."""

    def __init__(self, runtime: RuntimeState, disk_path: Path) -> None:
        self._runtime = runtime
        self._disk_path = disk_path
        self._last: TelemetryMessage | None = None
        # The model runtimes that import here; set once the agent has found out, at start.
        self.runtimes: list[ModelRuntime] = []
        # Serial and expiry of the device certificate; set at start and after each renewal.
        self.certificate: tuple[str, datetime] | None = None

    async def run(self, put: Callable[[TopicKind, TelemetryMessage], Awaitable[None]]) -> None:
        """Sample into ``put`` now, then every ``telemetry_interval_s`` on a fixed schedule.

        The interval is re-read whenever the runtime config changes, measured from the last
        sample, so a shorter interval takes effect without waiting out the old one.
        """
        loop = asyncio.get_running_loop()
        changed = self._runtime.changed
        tick = loop.time()
        while True:
            message = await asyncio.to_thread(
                sample,
                self._last,
                disk_path=self._disk_path,
                runtimes=self.runtimes,
                certificate=self.certificate,
            )
            self._last = message
            try:
                await put(TopicKind.TELEMETRY, message)
            except OutboxError as exc:
                # This sample is lost; the next one may find the disk writable again.
                logger.warning("telemetry sample not stored: %s", exc)
            else:
                logger.debug("telemetry stored message_id=%s", message.message_id)
            while True:
                # A fixed schedule does not drift; ticks missed on a slow device are skipped
                # rather than sampled in a burst.
                tick = _next_tick(tick, self._runtime.telemetry_interval_s, loop.time())
                if not await sleep_unless_set(changed, tick - loop.time()):
                    break
                changed.clear()


def _next_tick(tick: float, interval: float, now: float) -> float:
    """The first time of the schedule ``tick + k * interval`` (k >= 1) that is after ``now``."""
    return tick + max(1, math.floor((now - tick) / interval) + 1) * interval
