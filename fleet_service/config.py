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

    # Operators re-login after this; short enough that a leaked token does not live for days.
    access_token_ttl_s: Annotated[int, Field(ge=60, le=86_400)] = 8 * 3600
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
    log_level: str = "INFO"

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

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        self._check_s3()
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
        return f"https://{_url_host(self.advertise_host)}:{self.http_port}"


def _is_loopback(endpoint: str) -> bool:
    host = urlsplit(f"//{endpoint}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
