"""Sample this machine's health with psutil into a ``TelemetryMessage`` (blocking: use a thread)."""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import psutil

from device_agent import __version__
from fleet_protocol import TelemetryMessage

__all__ = ["sample"]

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


def sample(prev: TelemetryMessage | None, *, disk_path: Path) -> TelemetryMessage:
    """Measure the machine now; ``prev`` is this process's previous sample, None for the first.

    ``disk_path`` picks the filesystem whose usage is reported: the agent passes its state dir,
    which is where models and the outbox live too. Blocks (briefly longer for the first sample):
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
