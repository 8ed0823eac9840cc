"""``edgefleet up``: migrate, supervise Mosquitto, serve the HTTPS API, stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from broker import BrokerConfig, MosquittoSupervisor
from fleet_service.app import create_app
from fleet_service.config import SERVICE_IDENTITY, ServiceSettings
from fleet_service.db import migrate
from fleet_service.home import FleetHome

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
    )


async def run_fleet(settings: ServiceSettings) -> None:
    """Run broker, ingestion and API until SIGINT/SIGTERM; then stop them in reverse order.

    A replica (``settings.replica``) runs ingestion and the API only, against the primary's
    broker and database.
    """
    home = FleetHome(settings.home)
    home.require_initialised()
    home.require_private_secrets()
    await asyncio.to_thread(migrate, settings.resolved_database_url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async with contextlib.AsyncExitStack() as stack:
        if settings.replica is None:
            broker = await stack.enter_async_context(
                MosquittoSupervisor(broker_config(settings, home))
            )
            logger.info(
                "broker up on mqtts://%s:%d (pid %s)",
                settings.mqtt_bind_host,
                settings.mqtt_port,
                broker.pid,
            )
        server = _Server(
            uvicorn.Config(
                create_app(settings),
                host=settings.http_host,
                port=settings.http_port,
                ssl_certfile=str(home.server_cert),
                ssl_keyfile=str(home.server_key),
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=5,
            )
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
