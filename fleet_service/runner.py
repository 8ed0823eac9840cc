"""``edgefleet up``: migrate, supervise Mosquitto, serve the HTTPS API, stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import uvicorn

from broker import BrokerConfig, MosquittoSupervisor
from fleet_service.app import create_app
from fleet_service.authority import CertificateAuthority
from fleet_service.broker_policy import BrokerPolicy, PolicySettings
from fleet_service.config import SERVICE_IDENTITY, ServiceSettings
from fleet_service.db import create_db_engine, migrate
from fleet_service.hardening import require_safe_startup
from fleet_service.home import FleetHome
from fleet_service.revocation import BrokerTarget

__all__ = ["run_fleet"]

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`run_fleet` owns shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def broker_config(settings: ServiceSettings, home: FleetHome) -> BrokerConfig:
    """The Mosquitto settings for this fleet home."""
    return BrokerConfig(
        bind_host=settings.mqtt_bind_host,
        port=settings.mqtt_port,
        ca_file=home.ca_cert,
        cert_file=home.server_cert,
        key_file=home.server_key,
        data_dir=home.broker_dir,
        topic_prefix=settings.topic_prefix,
        service_identity=SERVICE_IDENTITY,
        extra_service_identities=settings.replica_identities,
        reader_identities=settings.broker_readers,
        # Always configured, and always present before mosquitto starts (BrokerPolicy.prepare).
        crl_file=home.broker_dir / "crl.pem",
    )


def broker_policy(
    settings: ServiceSettings, home: FleetHome, supervisor: MosquittoSupervisor
) -> BrokerPolicy:
    """The loop that keeps the supervised broker's ACL and CRL in step with the database."""
    # The service reaches its own broker on loopback when it listens on every address.
    host = "127.0.0.1" if settings.mqtt_bind_host in ("0.0.0.0", "::") else settings.mqtt_bind_host  # noqa: S104
    return BrokerPolicy(
        supervisor,
        CertificateAuthority.load(home),
        BrokerTarget(host=host, port=settings.mqtt_port, ca_file=home.ca_cert),
        PolicySettings(
            topic_prefix=settings.topic_prefix,
            crl_lifetime=timedelta(days=settings.crl_lifetime_days),
            poll_s=settings.broker_policy_poll_s,
        ),
    )


def _prepare_policy(policy: BrokerPolicy, database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        policy.prepare(engine)
    finally:
        engine.dispose()


def _tls_options(settings: ServiceSettings, home: FleetHome) -> dict[str, Any]:
    """uvicorn's TLS and proxy options: HTTPS itself, or plain HTTP behind a loopback proxy."""
    if settings.http_tls:
        # Nobody stands between clients and us: X-Forwarded-For from anyone is a lie.
        return {
            "ssl_certfile": str(home.server_cert),
            "ssl_keyfile": str(home.server_key),
            "proxy_headers": False,
        }
    # The TLS proxy runs on this host (config.py allows http_tls false on loopback only); its
    # X-Forwarded-For names the real client, which rate limits and the audit log key on.
    return {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1,::1"}


async def run_fleet(settings: ServiceSettings) -> None:
    """Run broker, ingestion and API until SIGINT/SIGTERM; then stop them in reverse order.

    A replica (``settings.replica``) runs ingestion and the API only, against the primary's
    broker and database.
    """
    home = FleetHome(settings.home)
    home.require_initialised()
    require_safe_startup(settings, home)  # keys 0600 and ours, no default secrets
    await asyncio.to_thread(migrate, settings.resolved_database_url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with contextlib.AsyncExitStack() as stack:
        policy = None
        if settings.replica is None:
            supervisor = MosquittoSupervisor(broker_config(settings, home))
            policy = broker_policy(settings, home, supervisor)
            # The CRL and the integrations' ACL exist before mosquitto reads them.
            await asyncio.to_thread(_prepare_policy, policy, settings.resolved_database_url)
            broker = await stack.enter_async_context(supervisor)
            logger.info(
                "broker up on mqtts://%s:%d (pid %s)",
                settings.mqtt_bind_host,
                settings.mqtt_port,
                broker.pid,
            )
        server = _Server(
            uvicorn.Config(
                create_app(settings, broker_policy=policy),
                host=settings.http_host,
                port=settings.http_port,
                **_tls_options(settings, home),
                server_header=False,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        if not settings.http_tls:
            logger.warning(
                "API on plain http://%s:%d for a TLS-terminating proxy (http_tls false); "
                "devices are told %s",
                settings.http_host,
                settings.http_port,
                settings.service_url,
            )
        serving = asyncio.create_task(server.serve(), name="https-api")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await serving
        stopping.cancel()
        if serving in done and not stop.is_set():
            raise RuntimeError("the HTTPS API stopped on its own; see the log above")
    logger.info("edgefleet stopped")
