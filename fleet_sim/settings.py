"""The simulator's own settings: one frozen object built in ``main()`` and passed down.

What a simulated device does on the wire (keepalive, session expiry, reconnect backoff, receipt
timeout, drain rate) is not here: it comes from the agent's own ``AgentSettings`` and its
``EDGEFLEET_AGENT_*`` variables, so a simulated device paces itself exactly as a real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["SimSettings"]


class SimSettings(BaseModel):
    """How many devices to simulate, how chatty they are, and where their identities live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # One device is one mTLS MQTT connection (one file descriptor here and one in the broker):
    # the process's open-file limit is the practical ceiling, checked at start.
    devices: Annotated[int, Field(ge=1, le=100_000)]

    # The join token of `edgefleet keys create`; needed only while some device is not enrolled.
    join_token: SecretStr | None = None

    # Identities live in ``<state_dir>/devices/<index>/``, each a normal agent state dir, so a
    # second run with the same directory reuses them instead of enrolling again.
    state_dir: Path

    # The agent's default: each device samples every 30 s, starting at a random phase so the
    # fleet's telemetry is spread evenly over the interval rather than arriving in one burst.
    telemetry_interval_s: Annotated[float, Field(gt=0)] = 30.0

    # Mean seconds between two inference results of one device (exponentially distributed, so
    # results arrive as a Poisson stream); 0 sends none. Five minutes is a camera that reports
    # a detection now and then.
    results_interval_s: Annotated[float, Field(ge=0)] = 300.0

    # Enrollments in flight at once. Each one makes an EC key, two HTTPS connections and a
    # certificate signature on the service; 8 keeps a 2-core service responsive meanwhile.
    enroll_concurrency: Annotated[int, Field(ge=1, le=256)] = 8

    # Stop after this many seconds (each device announces offline); 0 runs until Ctrl-C.
    duration_s: Annotated[float, Field(ge=0)] = 0.0

    # The rich live display; off, a summary line is logged every progress_log_interval_s.
    progress: bool = True
    progress_log_interval_s: Annotated[float, Field(gt=0)] = 10.0

    # Where a JSON snapshot of the counters is written every second (for scripts, such as
    # bench/scale.py); None writes nothing.
    stats_file: Path | None = None

    # Receipt lags (telemetry timestamp to the service's receipt) are kept this long for the
    # p50/p99 shown: two default telemetry intervals, so every device contributes.
    lag_window_s: Annotated[float, Field(gt=0)] = 60.0

    # Messages a device keeps while unreceipted or offline; past this the oldest telemetry goes
    # first, as the agent's outbox drops (its disk outbox holds far more; memory is the bound
    # here, with ten thousand devices in one process).
    outbox_max_messages: Annotated[int, Field(ge=1)] = 1000

    # Threads for the blocking parts: loading identities and paho's TCP + TLS connect, which
    # aiomqtt runs in the loop's default executor. The TLS handshake releases the GIL, so a few
    # threads per core keep a reconnect storm from queueing behind one slow handshake.
    connect_threads: Annotated[int, Field(ge=1, le=256)] = 16
