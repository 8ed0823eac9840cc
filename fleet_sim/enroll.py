"""Identities for the simulated devices: reuse what the state dir holds, enroll the rest.

Device ``i`` lives in ``<state_dir>/devices/<i>``, a normal agent state dir written by
``device_agent.enrollment.enroll`` (an EC key made here, the fleet CA pinned by the join token,
``POST /api/v1/enroll`` with a CSR), so a second run finds it enrolled and enrolls nothing. Many
enrollments run at once on their own threads; the service's per-address rate limit (HTTP 429)
is waited out with the agents' jittered backoff.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from functools import partial

from device_agent.backoff import Backoff
from device_agent.enrollment import enroll
from device_agent.errors import EnrollmentError, EnrollmentRefusedError, ServiceUnreachableError
from device_agent.state import StateDir
from fleet_protocol import JoinToken
from fleet_sim.errors import SimEnrollmentError, SimUsageError
from fleet_sim.settings import SimSettings
from fleet_sim.stats import SimStats

__all__ = ["DEVICES_DIR", "Enroller", "state_dir_of"]

logger = logging.getLogger(__name__)

DEVICES_DIR = "devices"

# 429 waits: the service's default limit is 20 enrollments a minute per address, so waits of up
# to a minute let the window move on without a storm of refused attempts.
_RATE_LIMIT_MIN_S = 1.0
_RATE_LIMIT_MAX_S = 60.0
_TOO_MANY_REQUESTS = 429

# An unreachable service is tried this many times per device (with backoff) before giving up:
# a service that restarts comes back within that, a wrong URL does not.
_UNREACHABLE_ATTEMPTS = 6


def state_dir_of(sim: SimSettings, index: int) -> StateDir:
    """The state dir of simulated device ``index``."""
    return StateDir(sim.state_dir / DEVICES_DIR / f"{index:05d}")


class Enroller:
    """Hands out an enrolled state dir per device index; see the module docstring."""

    def __init__(
        self,
        sim: SimSettings,
        token: JoinToken | None,
        stats: SimStats,
        *,
        executor: Executor,
        http_timeout_s: float,
        stop: asyncio.Event,
    ) -> None:
        self._sim = sim
        self._token = token
        self._stats = stats
        self._executor = executor
        self._http_timeout_s = http_timeout_s
        self._slots = asyncio.Semaphore(sim.enroll_concurrency)
        self._warned_rate_limit = False
        self._stop = stop

    async def ensure(self, index: int) -> StateDir | None:
        """Device ``index``'s state dir, enrolled now if it was not yet; None once stopping."""
        loop = asyncio.get_running_loop()
        state = state_dir_of(self._sim, index)
        if await loop.run_in_executor(self._executor, state.is_enrolled):
            self._stats.enrolled_reused += 1
            return state
        if self._token is None:
            raise SimUsageError(
                f"simulated device {index} ({state.root}) is not enrolled yet and no join token "
                "was given; pass --join-token or --join-token-file (create one with "
                f"`edgefleet keys create --max-uses {self._sim.devices}`)"
            )
        async with self._slots:
            if self._stop.is_set():
                return None
            await self._enroll(index, state, self._token)
        self._stats.enrolled_new += 1
        return state

    async def _enroll(self, index: int, state: StateDir, token: JoinToken) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(_RATE_LIMIT_MIN_S, _RATE_LIMIT_MAX_S)
        unreachable = 0
        job = partial(enroll, token, state.root, timeout=self._http_timeout_s)
        while True:
            try:
                await loop.run_in_executor(self._executor, job)
            except EnrollmentRefusedError as exc:
                if exc.status != _TOO_MANY_REQUESTS:
                    raise SimEnrollmentError(
                        f"enrolling simulated device {index} into {state.root} failed: {exc}. "
                        "A used-up or expired key needs a new join token with enough uses "
                        f"(`edgefleet keys create --max-uses {self._sim.devices}`)"
                    ) from exc
                self._rate_limited()
            except ServiceUnreachableError as exc:
                unreachable += 1
                if unreachable >= _UNREACHABLE_ATTEMPTS:
                    raise SimEnrollmentError(
                        f"enrolling simulated device {index} failed {unreachable} times in a "
                        f"row: {exc}"
                    ) from exc
            except EnrollmentError as exc:
                raise SimEnrollmentError(
                    f"enrolling simulated device {index} into {state.root} failed: {exc}"
                ) from exc
            else:
                return
            self._stats.enroll_retries += 1
            await asyncio.sleep(backoff.next_delay())

    def _rate_limited(self) -> None:
        if self._warned_rate_limit:
            return
        self._warned_rate_limit = True
        logger.warning(
            "the service limits enrollments per address (HTTP 429); retrying with backoff. "
            "To enroll a large simulated fleet quickly, raise EDGEFLEET_ENROLL_RATE_PER_ADDRESS "
            "(default 20/minute) on the service while it enrolls, e.g. '100000/minute'"
        )
