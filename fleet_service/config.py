"""The control plane's one typed settings object, built in ``main()`` and passed down."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet_protocol import DEFAULT_PREFIX
from fleet_protocol.logs import LogFormat

# The CN of the control plane's own MQTT client certificate; replicas add "-<name>". Device ids
# are issued by the service and always start with ``dev-``, so no device can hold these names.
SERVICE_IDENTITY = "edgefleet-service"
_REPLICA_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")

__all__ = ["SERVICE_IDENTITY", "CommandLimits", "ServiceSettings"]


@dataclass(frozen=True)
class CommandLimits:
    """Per-device bounds (ServiceSettings.command_queue_max / command_in_flight_max)."""

    # Stored but unanswered commands. Past it new ones are dropped at once, counted and
    # marked, rather than silently lost by a broker queue.
    queue_max: int = 500
    # Handed to the broker but unanswered. Far below the broker's per-client queue, so the
    # broker never has to drop one; the rest wait in the database.
    in_flight_max: int = 50


Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class ServiceSettings(BaseSettings):
    """Settings of ``edgefleet``; every field can be set as ``EDGEFLEET_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", frozen=True, extra="forbid")

    home: Path = Path(".edgefleet")
    # None means SQLite in the home directory; PostgreSQL is ``postgresql+psycopg://...``.
    database_url: str | None = None

    http_host: str = "127.0.0.1"
    http_port: Port = 8443
    mqtt_bind_host: str = "127.0.0.1"
    mqtt_port: Port = 8883
    # The address devices are told to use, in join tokens and enrollment answers. It must be in
    # the server certificate's SANs (``edgefleet init --san``).
    advertise_host: str = "127.0.0.1"
    topic_prefix: str = DEFAULT_PREFIX
    # Client-certificate CNs (issued by the fleet CA) allowed to read every device topic on the
    # broker, e.g. a monitoring tap; as JSON in the environment: '["tap"]'.
    broker_readers: tuple[str, ...] = ()

    # An access token lives this long; the dashboard renews it with its refresh token, so it can
    # be short: a leaked one is soon useless (logout and disabling also stop it at once).
    access_token_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = 900
    # Writes are batched: one transaction per batch keeps SQLite's fsyncs from capping ingestion.
    ingest_batch_max: Annotated[int, Field(ge=1, le=50_000)] = 1000
    # Extra wait to gather a batch. 0: commit whatever has queued as soon as the previous
    # commit is done, which batches by itself under load without adding latency when idle
    # (bench/commands.py: 0.05 s cost 50 ms per command round trip).
    ingest_batch_interval_s: Annotated[float, Field(ge=0)] = 0.0
    # Messages waiting for the writer; past this the MQTT reader waits (backpressure to the broker)
    ingest_queue_max: Annotated[int, Field(ge=1)] = 20_000
    mqtt_reconnect_max_s: Seconds = 30.0
    # Names of extra service replicas (`edgefleet replicas add NAME`); each has its own MQTT
    # identity `edgefleet-service-NAME`, which the broker's ACL grants like the primary.
    replicas: tuple[str, ...] = ()
    # Which identity this process uses: None for the primary, or one of ``replicas``.
    replica: str | None = None
    # MQTT v5 shared-subscription group the replicas split the device stream in; used whenever
    # replicas exist (a plain subscription would give every replica every message).
    ingest_shared_group: str = "ingest"
    # Unanswered commands stored per device before new ones are dropped (and marked so).
    command_queue_max: Annotated[int, Field(ge=1)] = 500
    # Unanswered commands handed to the broker per device; the rest wait in the database, so
    # the broker's own per-client queue never overflows.
    command_in_flight_max: Annotated[int, Field(ge=1)] = 50
    # How often stored commands are published and overdue ones expired, when nothing wakes it.
    dispatch_interval_s: Seconds = 1.0
    # How often the rollout engine re-reads device reports and moves deployments on, when
    # nothing wakes it: the delay between a batch resolving and the next being sent.
    rollout_tick_s: Seconds = 1.0
    # A comment line on idle event streams, so proxies and browsers do not close them.
    sse_keepalive_s: Seconds = 15.0
    # Where the built dashboard lives; None uses ``dashboard/dist`` next to the package.
    dashboard_dir: Path | None = None
    # Retention (fleet_service/retention.py): raw rows older than these are deleted, after
    # being folded into hourly rollups (min/mean/max per device and hour), which charts read
    # for long ranges and which are kept for rollup_retention_days.
    telemetry_retention_days: Annotated[float, Field(gt=0)] = 30
    results_retention_days: Annotated[float, Field(gt=0)] = 90
    logs_retention_days: Annotated[float, Field(gt=0)] = 30
    rollup_retention_days: Annotated[float, Field(gt=0)] = 730
    retention_interval_s: Annotated[float, Field(gt=0)] = 300
    # Rows per transaction: small enough that SQLite's one writer is free again within ~0.1 s.
    retention_chunk_rows: Annotated[int, Field(ge=100, le=100_000)] = 2000
    # Rows are folded once received this long ago: longer than any ingest transaction stays
    # open, so a replica's late commit never lands behind the fold's cursor.
    retention_settle_s: Annotated[float, Field(ge=0)] = 60
    # The dashboard's fleet page (fleet_service/fleet_history.py): how often the service samples
    # its own metrics into the in-memory history of the last 24 h. 15 s matches a usual
    # Prometheus scrape; shorter collects (and queries the fleet state) more often, and below
    # 10 s the capped ring holds less than 24 h.
    fleet_history_interval_s: Annotated[float, Field(ge=0.1, le=3600)] = 15.0
    log_level: str = "INFO"
    # JSON lines, or key=value text; "auto" is text on a terminal and JSON anywhere else.
    log_format: LogFormat = "auto"

    # Model artifacts (fleet_service.artifacts). "fs" keeps blobs under the home and serves them
    # itself; "s3" puts them in MinIO or any S3 API and hands devices presigned URLs.
    artifact_store: Literal["fs", "s3"] = "fs"
    # How long a download URL given to a device stays valid: long enough to start (and resume
    # after a short cut) a large download, short enough that a leaked URL soon goes stale.
    artifact_url_ttl_s: Annotated[int, Field(ge=30, le=86_400)] = 900
    # The largest upload of one release (all its files); past it the upload gets 413. 16 GiB
    # fits a 7B-parameter GGUF at 8 bits with room to spare, and bounds the spool on disk.
    max_artifact_bytes: Annotated[int, Field(ge=1)] = 16 * 1024**3
    # S3/MinIO, used when artifact_store is "s3": host:port, the bucket (created if missing),
    # credentials, and TLS (required off loopback).
    s3_endpoint: str | None = None
    # The host:port devices reach, when it differs from s3_endpoint (e.g. inside compose).
    s3_public_endpoint: str | None = None
    s3_bucket: str = "edgefleet-artifacts"
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = True
    # Given so that presigning a URL needs no round trip to ask the bucket's region.
    s3_region: str = "us-east-1"

    # --- access control: logins, tokens, OIDC (issue 6) ---
    # Attempts per minute before a 429: per username (guessing one password) and per address
    # (spraying many users); enrollment per address (guessing registration keys). `limits`
    # notation, e.g. "10/minute".
    login_rate_per_user: str = "10/minute"
    login_rate_per_address: str = "30/minute"
    enroll_rate_per_address: str = "20/minute"
    # A login session (its refresh token) ends this long after login, however active: a stolen
    # refresh token cannot be kept alive for ever by rotating it.
    refresh_token_ttl_s: Annotated[int, Field(ge=300, le=30 * 86_400)] = 12 * 3600
    # API tokens must expire; an admin may ask for up to this lifetime (default 90 days).
    api_token_max_ttl_s: Annotated[int, Field(ge=3600, le=5 * 365 * 86_400)] = 365 * 86_400
    # An owner's own identity provider (optional): bearer tokens whose `iss` is this URL are
    # checked against its JWKS (from /.well-known/openid-configuration) and must carry this
    # audience. https, or http on loopback only (a token check over plaintext is no check).
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    # The claim holding the caller's groups or roles (a string or a list of strings), and how its
    # values map to edgefleet roles, as JSON: '{"fleet-admins": "admin", "ops": "operator"}'.
    # Without a map, the values "admin", "operator" and "viewer" are taken as they are.
    oidc_role_claim: str = "roles"
    oidc_role_map: dict[str, Literal["admin", "operator", "viewer"]] = Field(default_factory=dict)
    # How long the issuer's signing keys are cached before they are fetched again.
    oidc_jwks_cache_s: Annotated[int, Field(ge=10, le=86_400)] = 300
    # A token naming a key id the cache does not hold makes the keys be fetched again, but not
    # more often than this: tokens with made-up key ids cannot turn into a flood of fetches. A
    # rotated key is picked up within this long.
    oidc_jwks_cooldown_s: Annotated[float, Field(ge=0, le=3600)] = 30.0

    # --- device identity, revocation and broker policy (issue 6) ---
    # Lifetime of a device client certificate, at enrollment and at each renewal (agents renew
    # over MQTT once a third of it remains). Short, so a key copied off a device stops working
    # on its own; 30 days leaves ten days of retries for a device that is away when it is due.
    # The floor of 60 s exists for tests; a real fleet wants hours at least.
    device_cert_ttl_s: Annotated[int, Field(ge=60, le=3650 * 86_400)] = 30 * 86_400
    # The primary (the process running the broker) re-reads revocations and integration grants
    # this often, to apply changes made by a replica or the CLI; its own changes apply at once.
    broker_policy_poll_s: Seconds = 5.0
    # A revocation request answers once the broker has reloaded the CRL and the session is
    # dropped, or after this long (then the primary's poll finishes the job).
    revocation_apply_timeout_s: Seconds = 10.0
    # The CRL's nextUpdate is this far ahead; it is signed again when half of it is left.
    # Mosquitto refuses every client once the CRL has expired, so keep it well above any
    # downtime of the service (the CRL is also signed again on every start).
    crl_lifetime_days: Annotated[int, Field(ge=1, le=365)] = 30

    # --- integrations and webhooks (issue 6) ---
    # Lifetime of an integration's client certificate; a new one means creating the
    # integration again (under a new name) and handing the third party the new bundle.
    integration_cert_days: Annotated[int, Field(ge=1, le=3650)] = 365
    # Webhooks (fleet_service.webhook_delivery): a failed delivery is retried after
    # webhook_retry_base_s, doubling each time up to webhook_retry_max_s, each wait jittered so
    # a receiver coming back is not hit by every queued retry at once; after
    # webhook_max_attempts it is marked failed and stays in the log. The defaults ride out
    # about an hour of receiver downtime.
    webhook_retry_base_s: Seconds = 5.0
    webhook_retry_max_s: Seconds = 600.0
    webhook_max_attempts: Annotated[int, Field(ge=1, le=100)] = 12
    # One POST gets this long; a receiver that hangs counts as a failed attempt, so it cannot
    # hold the sender up.
    webhook_timeout_s: Seconds = 10.0
    # How often the sender looks for due deliveries when no stored result wakes it (retries,
    # results stored by another replica).
    webhook_poll_s: Seconds = 2.0
    # Results are readable to anyone on the path of a plain http:// URL; allow one only to a
    # loopback address (e.g. a local relay) unless this is turned off.
    webhook_require_https: bool = True

    # --- hardened edges: headers, CORS, body limits, startup checks (issue 6) ---
    # False serves plain HTTP, for a TLS-terminating reverse proxy in front; allowed only with
    # http_host on loopback, so bearer tokens never cross a network in the clear.
    http_tls: bool = True
    # The HTTPS URL devices and join tokens use when that proxy answers elsewhere (its host and
    # port); None: https://advertise_host:http_port. The proxy must present the fleet's server
    # certificate, since agents pin the fleet CA.
    public_url: str | None = None
    # Browser origins (scheme://host[:port]) that may call the API from another site, e.g. an
    # owner's own portal; as JSON in the environment. Empty keeps CORS closed (the dashboard is
    # same-origin and needs none). "*" is refused: every route but enrollment carries a bearer
    # token, and any web page could then use one a browser holds.
    cors_origins: tuple[str, ...] = ()
    # The largest request body of every route but the model upload (which streams to disk and
    # has max_artifact_bytes): past it, 413. The biggest legitimate bodies are agent message
    # batches (1 MiB of payloads, device_agent/https_transport.MAX_POST_BYTES, plus framing).
    max_request_bytes: Annotated[int, Field(ge=1024)] = 2 * 1024**2
    # Swagger UI at /docs. It loads its scripts from a CDN, which an offline fleet cannot reach
    # and the dashboard's Content-Security-Policy does not allow, so it is off unless asked
    # for (it then gets its own, looser policy). The OpenAPI document is always at
    # /api/v1/openapi.json.
    api_docs: bool = False
    # Fleet security audit (fleet_service.security_audit). How often the service runs it and
    # logs its findings; `edgefleet audit` and GET /security/findings run it on demand.
    security_audit_interval_s: Seconds = 3600.0
    # A device, integration or service certificate this close to expiry was not renewed in
    # time: flagged medium, and high once expired. Agents renew once a third of
    # device_cert_ttl_s is left, so a device is flagged at a quarter left if that comes first.
    security_cert_warn_days: Annotated[float, Field(gt=0)] = 7
    # A device not heard from for this long still holds a valid certificate and token.
    security_silent_days: Annotated[float, Field(gt=0)] = 7
    # A usable registration key valid for longer than this, or with more uses left than this,
    # lets whoever finds it enroll devices.
    security_key_max_days: Annotated[float, Field(gt=0)] = 7
    security_key_max_uses_left: Annotated[int, Field(ge=0)] = 10
    # A user who has not logged in for this long keeps access nobody uses.
    security_login_stale_days: Annotated[float, Field(gt=0)] = 90
    # API tokens valid for longer than this, or unused for this long, are flagged.
    security_token_max_days: Annotated[float, Field(gt=0)] = 365
    security_token_unused_days: Annotated[float, Field(gt=0)] = 90
    # More enabled admins than this is flagged (low): each can hand out access.
    security_max_admins: Annotated[int, Field(ge=1)] = 3
    # This many session takeovers of one identity within the window mean two machines hold one
    # key; a single takeover is a device reconnecting before the broker noticed it had gone.
    security_takeover_window_s: Seconds = 3600.0
    security_takeover_threshold: Annotated[int, Field(ge=2)] = 3
    # The Mosquitto log the audit reads for connections; None: the local broker's log in the
    # home (broker/mosquitto.log). Set it where the broker runs elsewhere and logs to a file.
    security_broker_log: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        self._check_s3()
        self._check_oidc()
        self._check_edges()
        if self.database_url and self.database_url.startswith("postgres://"):
            raise ValueError("database_url: use the postgresql:// scheme")
        for name in (*self.replicas, self.replica or "r"):
            if not _REPLICA_NAME.fullmatch(name):
                raise ValueError(f"replica name {name!r}: use 1-32 of a-z, 0-9 and '-'")
        return self

    def _check_s3(self) -> None:
        if self.artifact_store != "s3":
            return
        missing = [
            f"s3_{name}"
            for name in ("endpoint", "access_key", "secret_key")
            if not getattr(self, f"s3_{name}")
        ]
        if missing:
            raise ValueError(f"artifact_store s3 needs {', '.join(missing)}")
        for endpoint in (self.s3_endpoint, self.s3_public_endpoint):
            if endpoint and not self.s3_secure and not _is_loopback(endpoint):
                raise ValueError(
                    f"s3 endpoint {endpoint} without TLS: set s3_secure true (plaintext S3 is "
                    "allowed on loopback only)"
                )

    def _check_oidc(self) -> None:
        if self.oidc_issuer is None:
            return
        url = urlsplit(self.oidc_issuer)
        plain_on_loopback = url.scheme == "http" and _is_loopback(url.netloc)
        if url.scheme != "https" and not plain_on_loopback:
            raise ValueError(
                f"oidc_issuer {self.oidc_issuer}: use an https:// URL (plain http is allowed on "
                "loopback only)"
            )
        if not self.oidc_audience:
            raise ValueError(
                "oidc_issuer is set but oidc_audience is not: set it to the client id (audience) "
                "your identity provider puts in tokens meant for edgefleet"
            )

    def _check_edges(self) -> None:
        if not self.http_tls and not _is_loopback(_url_host(self.http_host)):
            raise ValueError(
                f"http_tls is false but http_host is {self.http_host}: plain HTTP would leave "
                "this machine. Run the TLS proxy on this host and bind the API to loopback "
                "(EDGEFLEET_HTTP_HOST=127.0.0.1), or set EDGEFLEET_HTTP_TLS=true"
            )
        if self.public_url is not None:
            url = urlsplit(self.public_url)
            if url.scheme != "https" or not url.hostname or url.path not in ("", "/"):
                raise ValueError(
                    f"public_url {self.public_url}: give the https://host[:port] devices reach "
                    "(no path); agents only speak HTTPS to the service"
                )
        for origin in self.cors_origins:
            _check_origin(origin)

    @property
    def command_limits(self) -> CommandLimits:
        """The per-device command bounds."""
        return CommandLimits(self.command_queue_max, self.command_in_flight_max)

    @property
    def service_identity(self) -> str:
        """The MQTT identity (certificate CN) this process uses."""
        return f"{SERVICE_IDENTITY}-{self.replica}" if self.replica else SERVICE_IDENTITY

    @property
    def replica_identities(self) -> tuple[str, ...]:
        """Identities of every extra replica, for the broker ACL."""
        return tuple(f"{SERVICE_IDENTITY}-{name}" for name in self.replicas)

    @property
    def uses_shared_subscriptions(self) -> bool:
        """Whether ingestion must split the stream with other replicas."""
        return bool(self.replicas) or self.replica is not None

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL, defaulting to SQLite in the home directory."""
        if self.database_url:
            url = self.database_url
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
            return url
        return f"sqlite:///{(self.home / 'edgefleet.db').resolve()}"

    @property
    def service_url(self) -> str:
        """The HTTPS URL devices and join tokens use."""
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"https://{_url_host(self.advertise_host)}:{self.http_port}"


def _is_loopback(endpoint: str) -> bool:
    host = urlsplit(f"//{endpoint}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_origin(origin: str) -> None:
    """Refuse a CORS origin that is a wildcard, not an origin, or plain http off loopback."""
    if "*" in origin:
        raise ValueError(
            f"cors_origins {origin!r}: a wildcard would let every web site call the API with "
            "the token a browser holds; list the exact origins, e.g. "
            '["https://portal.example.com"]'
        )
    url = urlsplit(origin)
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or origin != f"{url.scheme}://{url.netloc}"
    ):
        raise ValueError(
            f"cors_origins {origin!r} is not an origin: write scheme://host[:port] with no "
            "path or trailing slash, e.g. https://portal.example.com"
        )
    if url.scheme == "http" and not _is_loopback(url.netloc):
        raise ValueError(
            f"cors_origins {origin!r}: a page served over plain http can be altered on the way; "
            "use its https:// origin (http is allowed on loopback only)"
        )


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
