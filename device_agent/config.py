"""The agent's settings: one frozen object built in ``main()`` and passed down."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from device_agent.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MESSAGES
from fleet_protocol import MAX_PAYLOAD_BYTES, MAX_RECEIPT_IDS
from fleet_protocol.logs import LogFormat

__all__ = [
    "ENV_PREFIX",
    "AgentSettings",
    "InferenceSettings",
    "LocalApiSettings",
    "LogLevel",
    "is_loopback_host",
]

ENV_PREFIX = "EDGEFLEET_AGENT_"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

# MQTT encodes the session expiry interval in 4 bytes; 0xFFFFFFFF means "never expires", which
# the agent refuses: a vanished device's session must not sit on the broker for ever.
_NEVER_EXPIRES = 0xFFFF_FFFF

PositiveSeconds = Annotated[float, Field(gt=0)]


class InferenceSettings(BaseModel):
    """How the agent runs models (device_agent/inference/); env ``..._INFERENCE__<NAME>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # CPU threads each model's runtime uses (llama.cpp n_threads, onnxruntime intra-op threads,
    # the TFLite interpreter's num_threads). None means every core: one busy model should use
    # the whole device; lower it when several models must answer at the same time.
    threads: Annotated[int, Field(ge=1, le=256)] | None = None

    # Requests that may wait behind the one a model is running; past this the caller gets
    # QueueFullError (HTTP 429) at once instead of a timeout much later, and the agent's memory
    # stays bounded whatever a client floods it with.
    queue_depth: Annotated[int, Field(ge=0, le=10_000)] = 16

    # The longest one inference may take, queueing included. A request still running in the
    # worker then is failed and the worker restarted, since a model that hangs would hold up
    # every request behind it. Two minutes lets a small LLM on a Pi write a few hundred tokens.
    request_timeout_s: PositiveSeconds = 120.0

    # The longest a worker may take to start and load its model: a few GB of GGUF from an SD
    # card reads at ~20 MB/s, so minutes, yet a wedged load must not stall reconciling forever.
    load_timeout_s: PositiveSeconds = 300.0

    # A worker asked to stop gets this long to finish its request and exit before SIGKILL.
    stop_timeout_s: PositiveSeconds = 5.0

    # A crashed worker is restarted after a delay drawn up to this (full jitter) ...
    restart_min_s: PositiveSeconds = 0.5
    # ... doubling per crash in a row up to this cap, so a model that dies at once after every
    # start (out of memory) does not spin the CPU, yet comes back within a minute once it can.
    restart_max_s: PositiveSeconds = 60.0

    # llama.cpp context (prompt + answer tokens) for GGUF models. Its KV cache takes memory in
    # proportion (about 45 MB at 2048 for a 135M model, far more for 7B), so it is a budget.
    gguf_context_tokens: Annotated[int, Field(ge=64, le=131_072)] = 2048

    # Tokens generated when a request does not say (an infer command, a completion without
    # max_tokens); a cap, so a prompt that never stops cannot hold a worker for minutes.
    default_max_tokens: Annotated[int, Field(ge=1, le=32_768)] = 256

    # Inputs pushed to the local API for an `http` schedule that may wait per model until the
    # schedule's next run; past it a push gets 429, so a chatty client cannot fill memory.
    push_inbox_depth: Annotated[int, Field(ge=1, le=100_000)] = 256

    @model_validator(mode="after")
    def _check_restart_range(self) -> Self:
        if self.restart_min_s > self.restart_max_s:
            raise ValueError(
                f"inference restart_min_s ({self.restart_min_s}) must not exceed restart_max_s "
                f"({self.restart_max_s})"
            )
        return self


# A local API key shorter than this is refused: it guards model access from the whole network.
_MIN_API_KEY_LENGTH = 16


class LocalApiSettings(BaseModel):
    """The device's local inference API (device_agent/local_api.py); ``..._LOCAL_API__<NAME>``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Off switch for devices that only run scheduled or commanded inference.
    enabled: bool = True

    # Loopback by default: only programs on the device itself can call its models. Binding any
    # other address needs api_key (the validator refuses it otherwise), since the API is plain
    # HTTP and runs the models on anyone's input.
    host: str = "127.0.0.1"

    # 0 picks a free port (tests; the chosen one is logged and on LocalApi.port).
    port: Annotated[int, Field(ge=0, le=65_535)] = 8471

    # Bearer key every request must carry when set (``Authorization: Bearer <key>``).
    api_key: SecretStr | None = None

    # Request bodies larger than this are refused with 413 before they are read into memory:
    # an image tensor as JSON is a few MB, a prompt far less.
    max_body_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024

    # One input pushed for an ``http`` schedule waits in memory until the schedule's next run,
    # up to push_inbox_depth of them per model: 1 MiB each keeps that bounded on a Pi (and is
    # what a schedule reads of a file or a command's output, schedule_input_max_bytes).
    push_max_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024

    @model_validator(mode="after")
    def _refuse_open_api_without_key(self) -> Self:
        if self.api_key is not None and len(self.api_key.get_secret_value()) < _MIN_API_KEY_LENGTH:
            raise ValueError(
                f"local_api.api_key must be at least {_MIN_API_KEY_LENGTH} characters; "
                "generate one with `openssl rand -hex 24`"
            )
        if self.enabled and not is_loopback_host(self.host) and self.api_key is None:
            raise ValueError(
                f"the local API would listen on {self.host!r}, reachable from the network, "
                f"without an API key: set {ENV_PREFIX}LOCAL_API__API_KEY or bind it to "
                "127.0.0.1"
            )
        return self


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # Any other name could resolve to a public address.
        return False


class AgentSettings(BaseSettings):
    """Every knob of a running agent; each one read from ``EDGEFLEET_AGENT_<NAME>`` too."""

    # "__" reaches into the nested groups: EDGEFLEET_AGENT_LOCAL_API__PORT=0.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_nested_delimiter="__"
    )

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
    session_expiry_s: Annotated[int, Field(gt=0, lt=_NEVER_EXPIRES)] = 7 * 24 * 3600

    # A TCP + TLS + CONNECT round trip that takes longer than this is treated as failed, so a
    # black-holed broker address costs one backoff step rather than hanging the agent.
    connect_timeout_s: PositiveSeconds = 10.0

    # How long a QoS 1 publish may wait for its PUBACK before the connection is presumed dead.
    publish_timeout_s: PositiveSeconds = 10.0

    # Enrollment and other HTTPS calls to the service; generous because devices sit on slow links.
    http_timeout_s: PositiveSeconds = 30.0

    # The broker to connect to instead of the one enrollment named (device.json): a site broker
    # bridged to the central one. Its certificate must name this host.
    mqtt_host: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    mqtt_port: Annotated[int, Field(ge=1, le=65_535)] | None = None

    # The agent's own log level; paho/aiomqtt internals stay at WARNING whatever this says.
    log_level: LogLevel = "INFO"
    # JSON lines, or key=value text; "auto" is text on a terminal and JSON anywhere else
    # (systemd, a container, a file), where a log shipper reads them.
    log_format: LogFormat = "auto"

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

    # --- certificate renewal (device_agent/renewal.py) ---

    # Renew once less than this share of the certificate's lifetime remains. A third of a 30-day
    # certificate leaves ten days of retries for a device that is offline or finds the service
    # down when renewal is due. At most 3/4: the service refuses renewals closer together than a
    # tenth of the lifetime, and a device renewing most of the time gains nothing.
    cert_renew_fraction: Annotated[float, Field(ge=0.05, le=0.75)] = 1 / 3

    # A renewal request (CSR) the service has not answered within this long counts as failed
    # and is retried: the service answers in well under a second, so silence means it is down.
    cert_renew_timeout_s: PositiveSeconds = 30.0

    # After a failed or refused renewal the next try waits up to this long (full jitter) ...
    cert_renew_retry_min_s: PositiveSeconds = 10.0
    # ... doubling per failure in a row up to this cap: an hour keeps a fleet whose service is
    # down from asking in lock-step, with many tries left in a third of a 30-day lifetime.
    cert_renew_retry_max_s: PositiveSeconds = 3600.0

    # --- models (device_agent/reconcile.py, artifacts.py, model_store.py, schedules.py) ---

    # Free disk kept on top of a release's download and installed bytes before its first byte is
    # fetched: the outbox, logs and the OS need room too, and a full SD card bricks a Pi.
    model_disk_margin_bytes: Annotated[int, Field(ge=0)] = 64 * 1024 * 1024

    # A download cut mid-file resumes with HTTP Range this many times in a row before the
    # attempt fails (and the reconciler tries again later, still resuming from the partial file).
    download_retries: Annotated[int, Field(ge=0)] = 5

    # A 403 (signed URL expired, e.g. after a long cut) asks the service for fresh URLs this many
    # times per file; past that the clocks or the service's signing key disagree, so it fails.
    download_url_refreshes: Annotated[int, Field(ge=0)] = 3

    # A release that could not be fetched (network, service down) is tried again after this
    # long, doubling per failure up to model_retry_max_s: an offline device converges when it
    # returns without hammering the service while it cannot.
    model_retry_min_s: PositiveSeconds = 2.0
    model_retry_max_s: PositiveSeconds = 300.0

    # Download progress goes into the retained reported state at most this often, so a 1 GB
    # model on a fast link does not put thousands of reports into the outbox.
    model_progress_interval_s: PositiveSeconds = 1.0

    # How often the agent looks for model workers that were restarted (a crash, an OOM kill) to
    # report them; an in-memory check, so cheap, but reporting sooner changes nothing.
    model_watch_interval_s: PositiveSeconds = 5.0

    # Programs a `command` inference schedule may run (argv[0], matched exactly). Empty by
    # default: desired state comes from the service, and letting it start any program on the
    # device would turn a compromised control plane into remote code execution on every device.
    schedule_commands_allowed: list[str] = Field(default_factory=list)

    # A schedule's command that has not exited after this long is killed and counted as failed.
    schedule_command_timeout_s: PositiveSeconds = 30.0

    # The most a schedule reads from a file or a command's stdout for one inference: inputs are
    # prompts or tensors, and a runaway log file must not be loaded into memory.
    schedule_input_max_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024

    # --- inference (device_agent/inference/, device_agent/local_api.py) ---

    # Model workers, queues and timeouts.
    inference: InferenceSettings = Field(default_factory=InferenceSettings)

    # The local OpenAI-compatible and KServe v2 API.
    local_api: LocalApiSettings = Field(default_factory=LocalApiSettings)

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
        if self.cert_renew_retry_min_s > self.cert_renew_retry_max_s:
            raise ValueError(
                f"cert_renew_retry_min_s ({self.cert_renew_retry_min_s}) must not exceed "
                f"cert_renew_retry_max_s ({self.cert_renew_retry_max_s})"
            )
        return self
