"""The control plane's one typed settings object, built in ``main()`` and passed down."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleet_protocol import DEFAULT_PREFIX

__all__ = ["ServiceSettings"]

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
    ingest_batch_interval_s: Seconds = 0.25
    # Messages waiting for the writer; past this the MQTT reader waits (backpressure to the broker)
    ingest_queue_max: Annotated[int, Field(ge=1)] = 20_000
    mqtt_reconnect_max_s: Seconds = 30.0
    # MQTT v5 shared-subscription group: replicas with the same group split the device stream.
    # None subscribes plainly (one replica). Each replica needs its own client certificate.
    ingest_shared_group: str | None = None
    # How often stored commands are published and overdue ones expired, when nothing wakes it.
    dispatch_interval_s: Seconds = 1.0
    # A comment line on idle event streams, so proxies and browsers do not close them.
    sse_keepalive_s: Seconds = 15.0
    # Where the built dashboard lives; None uses ``dashboard/dist`` next to the package.
    dashboard_dir: Path | None = None
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check_database_url(self) -> ServiceSettings:
        if self.database_url and self.database_url.startswith("postgres://"):
            raise ValueError("database_url: use the postgresql:// scheme")
        return self

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


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
