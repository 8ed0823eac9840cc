"""Process-wide tuning shared by the console scripts (``edgefleet``, ``edgefleet-agent``,
``edgefleet-sim``)."""

from __future__ import annotations

import atexit
import gc

__all__ = ["skip_exit_collection"]


def skip_exit_collection() -> None:
    """Leave the final garbage collection out of interpreter shutdown.

    At exit CPython collects every object the imports made (FastAPI, SQLAlchemy and pydantic
    classes), only to free memory the OS takes back anyway: about 0.6 s for ``edgefleet up`` and
    0.3 s for a CLI command, measured on a 2-core machine. Freezing the heap at exit skips that
    collection. Files, sockets and database connections are closed before then by the code that
    opened them, and log handlers by logging's own exit hook.
    """
    atexit.register(gc.freeze)
