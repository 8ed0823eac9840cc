"""The simulator's error tree; the agent's errors are translated into it where they arise.

    SimError                    base of every error the simulator raises on purpose
    ├── SimUsageError           what was typed cannot work (no token, unreadable token file)
    └── SimEnrollmentError      a device could not be enrolled and retrying will not help

Messages name the object involved and what to do, because the CLI prints them as they are.
"""

from __future__ import annotations

__all__ = ["SimEnrollmentError", "SimError", "SimUsageError"]


class SimError(Exception):
    """Base of every error the simulator raises on purpose."""


class SimUsageError(SimError):
    """The command line or its files cannot work as given."""


class SimEnrollmentError(SimError):
    """A simulated device could not be enrolled; retrying with the same token will not help."""
