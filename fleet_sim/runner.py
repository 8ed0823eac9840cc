"""The whole simulated fleet: enroll or load each device, run them all, stop them cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from device_agent.config import AgentSettings
from device_agent.errors import StateDirError
from fleet_protocol import JoinToken
from fleet_sim.device import SimDevice
from fleet_sim.enroll import Enroller
from fleet_sim.errors import SimError, SimUsageError
from fleet_sim.progress import Display
from fleet_sim.settings import SimSettings
from fleet_sim.stats import SimStats

__all__ = ["run_fleet"]

logger = logging.getLogger(__name__)

# The stats file is rewritten this often: often enough for a benchmark's sampling.
_STATS_FILE_INTERVAL_S = 1.0


async def run_fleet(
    sim: SimSettings,
    agent: AgentSettings,
    token: JoinToken | None,
    display: Display | None,
    stats: SimStats,
) -> None:
    """Run ``sim.devices`` devices until SIGINT/SIGTERM or ``sim.duration_s``.

    Raises SimError when a device cannot be enrolled or loaded; devices already online then
    announce offline before it is raised.
    """
    loop = asyncio.get_running_loop()
    io_pool = ThreadPoolExecutor(sim.connect_threads, thread_name_prefix="sim-io")
    # aiomqtt runs paho's blocking TCP + TLS connect in the default executor.
    loop.set_default_executor(io_pool)
    enroll_pool = ThreadPoolExecutor(sim.enroll_concurrency, thread_name_prefix="sim-enroll")
    stop = asyncio.Event()
    failures: list[SimError] = []
    enroller = Enroller(
        sim, token, stats, executor=enroll_pool, http_timeout_s=agent.http_timeout_s, stop=stop
    )
    seeds = random.Random()  # noqa: S311  (simulated behaviour, not security)

    async def device(index: int, rng: random.Random) -> None:
        try:
            state = await enroller.ensure(index)
            if state is None or stop.is_set():
                return
            opened = partial(SimDevice.open, state, agent=agent, sim=sim, stats=stats, rng=rng)
            try:
                simulated = await loop.run_in_executor(io_pool, opened)
            except StateDirError as exc:
                raise SimUsageError(f"cannot load simulated device {index}: {exc}") from exc
        except SimError as exc:
            failures.append(exc)
            stop.set()
            return
        await simulated.run(stop)

    installed = _install_signal_handlers(loop, stop)
    try:
        async with asyncio.TaskGroup() as group:
            helpers = []
            if display is not None:
                helpers.append(group.create_task(display.run(stats), name="display"))
            if sim.stats_file is not None:
                helpers.append(group.create_task(_write_stats(stats, sim), name="stats-file"))
            if sim.duration_s > 0:
                helpers.append(group.create_task(_stop_after(stop, sim.duration_s), name="timer"))
            devices = [
                group.create_task(device(i, random.Random(seeds.getrandbits(64))))  # noqa: S311
                for i in range(sim.devices)
            ]
            await asyncio.gather(*devices)
            for helper in helpers:
                helper.cancel()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        enroll_pool.shutdown(wait=False, cancel_futures=True)
        if sim.stats_file is not None:
            with contextlib.suppress(OSError):
                stats.write(sim.stats_file)
    if failures:
        raise failures[0]


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event
) -> list[signal.Signals]:
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:  # Windows: Ctrl+C raises KeyboardInterrupt instead
            continue
        installed.append(signum)
    return installed


async def _stop_after(stop: asyncio.Event, seconds: float) -> None:
    await asyncio.sleep(seconds)
    logger.info("--duration of %.0f s is over; stopping", seconds)
    stop.set()


async def _write_stats(stats: SimStats, sim: SimSettings) -> None:
    assert sim.stats_file is not None
    while True:
        try:
            stats.write(sim.stats_file)
        except OSError as exc:
            logger.warning("cannot write the stats file %s: %s", sim.stats_file, exc)
        await asyncio.sleep(_STATS_FILE_INTERVAL_S)
