"""The agent's settings: one frozen object built in ``main()`` and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from device_agent.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MESSAGES
from fleet_protocol import MAX_PAYLOAD_BYTES, MAX_RECEIPT_IDS

__all__ = ["ENV_PREFIX", "AgentSettings", "LogLevel"]

ENV_PREFIX = "EDGEFLEET_AGENT_"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

# MQTT encodes the session expiry interval in 4 bytes; 0xFFFFFFFF means "never expires".
_MAX_SESSION_EXPIRY_S = 0xFFFF_FFFF

PositiveSeconds = Annotated[float, Field(gt=0)]


class AgentSettings(BaseSettings):
    """Every knob of a running agent; each one read from ``EDGEFLEET_AGENT_<NAME>`` too."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # Where the identity lives (key, certificates, token). Put it on persistent storage, not a
    # tmpfs: losing it means enrolling the device again under a new id.
    state_dir: Path

    # 30 s keeps a Raspberry Pi fleet's telemetry cheap for the broker and the database while
    # still showing a stuck device within a minute; tests shrink it.
    telemetry_interval_s: PositiveSeconds = 30.0

    # Reconnect backoff: the first retry waits up to this long (full jitter) ...
    reconnect_min_s: PositiveSeconds = 1.0
    # ... doubling per failed attempt up to this cap, so a fleet that lost its broker does not
    # reconnect in lock-step and knock the broker over again when it returns.
    reconnect_max_s: PositiveSeconds = 60.0

    # A connection must stay up this long before the backoff starts over from reconnect_min_s.
    # One that drops sooner is a flap (two agents sharing one identity take the session from
    # each other; a broker that accepts and then kicks us), and restarting would make it a storm.
    stable_connection_s: PositiveSeconds = 60.0

    # The broker drops us (and publishes our Last Will) after 1.5x this without traffic, so it
    # bounds how long a dead device looks online; shorter costs more pings on metered links.
    keepalive_s: Annotated[int, Field(ge=2, le=65_535)] = 30

    # How long the broker keeps our session (subscriptions and queued QoS 1 messages such as
    # commands) while the device is away; a week covers a device switched off over a holiday.
    session_expiry_s: Annotated[int, Field(gt=0, le=_MAX_SESSION_EXPIRY_S)] = 7 * 24 * 3600

    # A TCP + TLS + CONNECT round trip that takes longer than this is treated as failed, so a
    # black-holed broker address costs one backoff step rather than hanging the agent.
    connect_timeout_s: PositiveSeconds = 10.0

    # How long a QoS 1 publish may wait for its PUBACK before the connection is presumed dead.
    publish_timeout_s: PositiveSeconds = 10.0

    # Enrollment and other HTTPS calls to the service; generous because devices sit on slow links.
    http_timeout_s: PositiveSeconds = 30.0

    # The agent's own log level; paho/aiomqtt internals stay at WARNING whatever this says.
    log_level: LogLevel = "INFO"

    # Agent log records at or above this level are also sent to the service on ``logs``, so an
    # operator sees a device's problems without logging in to it. WARNING keeps routine INFO
    # lines off metered links; desired state and `set-config` can change it at run time.
    log_forward_level: LogLevel = "WARNING"

    # Outbox bounds: while offline the outbox keeps every message up to these, then drops the
    # least important (telemetry first, acks last; device_agent/outbox.py). 100,000 messages is
    # weeks of telemetry at the default interval; 64 MiB fits next to models on a small SD card.
    outbox_max_messages: Annotated[int, Field(ge=1)] = DEFAULT_MAX_MESSAGES
    # At least one message of the largest size the protocol allows must always fit.
    outbox_max_bytes: Annotated[int, Field(ge=MAX_PAYLOAD_BYTES)] = DEFAULT_MAX_BYTES

    # A message the broker acknowledged but the service has not confirmed within this long is
    # sent again (the service stores each message id once). Well above the service's batch
    # interval, so a healthy fleet never resends; short enough that a message lost by a broker
    # crash (its persistence is a periodic snapshot) arrives within a minute.
    receipt_timeout_s: PositiveSeconds = 30.0

    # The outbox pump publishes at most this many messages per second, so a fleet coming back
    # after a broker outage drains its backlogs without flooding the broker and the service.
    drain_rate_per_s: PositiveSeconds = 200.0

    # Messages read from the outbox and published (pipelined, in order) per pump round; also
    # the most a receipt needs to name to confirm one round.
    pump_batch: Annotated[int, Field(ge=1, le=MAX_RECEIPT_IDS)] = 50

    # With nothing due, the pump looks again after this long: new messages wake it at once, so
    # this only bounds how late a resend after receipt_timeout_s can be.
    pump_idle_s: PositiveSeconds = 1.0

    # With no MQTT session for this long (since the agent started or its session dropped), the
    # agent also talks to the service over HTTPS (device_agent/https_transport.py) while it
    # keeps trying MQTT. A minute rides out a broker restart without bothering the HTTP API, yet
    # a device behind a blocked port is back in touch before its telemetry gap looks alarming.
    https_fallback_after_s: PositiveSeconds = 60.0

    # While falling back, the agent posts its outbox and polls commands and desired state this
    # often: a command waits up to this long. A round is two GETs and one or two POSTs, so a
    # thousand devices on the fallback cost the service a few hundred requests a second.
    https_poll_interval_s: PositiveSeconds = 10.0

    @field_validator("log_level", "log_forward_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        # Accept `--log-level debug` as well as DEBUG; anything else fails the Literal check.
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_backoff_range(self) -> Self:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s}) must not exceed reconnect_max_s "
                f"({self.reconnect_max_s}); raise {ENV_PREFIX}RECONNECT_MAX_S or lower "
                f"{ENV_PREFIX}RECONNECT_MIN_S"
            )
        return self
