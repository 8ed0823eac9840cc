"""A test seam: end the agent process abruptly at a named step of installing a model.

Setting ``EDGEFLEET_AGENT_FAILPOINT=<step>`` in an agent's environment makes the process call
``os._exit(FAILPOINT_EXIT_CODE)`` the first time the install reaches ``<step>``: no ``finally``
block, no flush, no clean MQTT disconnect, as close to a power cut as a test can get without one.
The tests kill an agent at every step and check that it restarts with a loadable model, wholly
the old release or wholly the new one.

The steps, in the order an install passes them (device_agent/reconcile.py)::

    downloading      the first chunk of a file is on disk, the rest is not
    downloaded       every file is downloaded and its sha256 verified
    staging          part of a file is decrypted (or moved) into the staging directory
    staged           the staging directory is complete and fsynced, not yet renamed
    installed        the release directory is in place; the active pointer is unchanged
    loaded           the new release is loaded in the worker pool, not health-checked yet
    healthy          the new release passed its health check; the pointer is still the old one
    pointer-written  the new pointer's temporary file is fsynced, not yet renamed over the old
    activated        the active pointer names the new release; the floor is not raised yet
    floor-raised     the accepted-release floor is raised; older releases are not pruned yet

Nothing is armed unless the variable is set, and an unknown step name is refused at start, so
a typo in a test cannot silently test nothing.
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum

__all__ = ["FAILPOINT_ENV", "FAILPOINT_EXIT_CODE", "Step", "armed", "hit"]

logger = logging.getLogger(__name__)

FAILPOINT_ENV = "EDGEFLEET_AGENT_FAILPOINT"
# Distinct from the agent's own exit codes (0 ok, 1 failure, 2 usage), so a test can tell that
# the process ended at the failpoint rather than by crashing on its own.
FAILPOINT_EXIT_CODE = 86


class Step(StrEnum):
    """The named steps of a model install; see the module docstring."""

    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    STAGING = "staging"
    STAGED = "staged"
    INSTALLED = "installed"
    LOADED = "loaded"
    HEALTHY = "healthy"
    POINTER_WRITTEN = "pointer-written"
    ACTIVATED = "activated"
    FLOOR_RAISED = "floor-raised"


def armed() -> Step | None:
    """The step named by the environment, or None; ValueError for a name that is no step."""
    value = os.environ.get(FAILPOINT_ENV)
    if not value:
        return None
    try:
        return Step(value)
    except ValueError:
        steps = ", ".join(step.value for step in Step)
        raise ValueError(
            f"{FAILPOINT_ENV}={value!r} names no install step; use one of: {steps}"
        ) from None


def hit(step: Step) -> None:
    """End the process now if ``step`` is the armed failpoint; otherwise do nothing."""
    if os.environ.get(FAILPOINT_ENV) != step.value:
        return
    logger.critical("failpoint %s reached: exiting abruptly", step.value)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(FAILPOINT_EXIT_CODE)
