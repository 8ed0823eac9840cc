"""edgefleet-sim: many simulated devices in one process, each a real enrolled mTLS MQTT session.

Each simulated device enrolls through the service's REST API with a join token (a key and CSR
made here, by ``device_agent.enrollment``), then behaves like ``edgefleet-agent run`` on the
wire: birth and Last Will on ``status``, telemetry on a fixed schedule, inference results now
and then, acks for commands (``device_agent.commands``), reported state for desired state, and
reconnects with the agents' jittered backoff. Modules:

    settings    the simulator's frozen settings (the agent's own come from AgentSettings)
    errors      the simulator's error tree
    enroll      load a saved identity or enroll a new one, many at a time
    payloads    plausible telemetry and inference results for one device
    outbox      the in-memory outbox: send, resend until receipted, measure receipt lag
    device      one simulated device: its session, loops, commands and desired state
    stats       counters and the receipt-lag window, as a snapshot
    progress    the live display (rich) or periodic log lines
    runner      the whole simulated fleet: enroll, run, stop
"""

from __future__ import annotations

from fleet_sim.errors import SimError
from fleet_sim.settings import SimSettings

__all__ = ["SimError", "SimSettings"]
