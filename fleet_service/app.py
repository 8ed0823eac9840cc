"""Build the FastAPI application; its lifespan owns the database, the CA and MQTT ingestion."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import APIRouter, FastAPI

from fleet_service import __version__
from fleet_service.api.problems import install_problem_handlers
from fleet_service.api.routes import (
    agent,
    artifacts,
    auth,
    commands,
    deployments,
    devices,
    enroll,
    events,
    keys,
    models,
    results,
    system,
)
from fleet_service.artifacts import ReleaseSigner, UrlSigner, open_store
from fleet_service.auth import TokenIssuer
from fleet_service.authority import CertificateAuthority
from fleet_service.config import ServiceSettings
from fleet_service.context import ServiceContext
from fleet_service.db import create_db_engine
from fleet_service.dispatch import Dispatcher
from fleet_service.events import EventHub
from fleet_service.home import FleetHome
from fleet_service.ingest import IngestCounters, MqttIngestor, MqttIngestSettings
from fleet_service.rollout import RolloutEngine
from fleet_service.web import default_dashboard_dir, mount_dashboard

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def _ingest_settings(settings: ServiceSettings, home: FleetHome) -> MqttIngestSettings:
    # The service reaches its own broker on loopback when it listens on every address.
    host = "127.0.0.1" if settings.mqtt_bind_host in ("0.0.0.0", "::") else settings.mqtt_bind_host  # noqa: S104
    return MqttIngestSettings(
        host=host,
        port=settings.mqtt_port,
        ca_file=home.ca_cert,
        cert_file=home.service_files(settings.service_identity)[0],
        key_file=home.service_files(settings.service_identity)[1],
        identity=settings.service_identity,
        topic_prefix=settings.topic_prefix,
        batch_max=settings.ingest_batch_max,
        batch_interval_s=settings.ingest_batch_interval_s,
        queue_max=settings.ingest_queue_max,
        reconnect_max_s=settings.mqtt_reconnect_max_s,
        shared_group=settings.ingest_shared_group if settings.uses_shared_subscriptions else None,
    )


def create_app(settings: ServiceSettings, *, ingest: bool = True) -> FastAPI:
    """The control plane app; ``ingest=False`` leaves MQTT out (for API-only use)."""
    home = FleetHome(settings.home)
    home.require_initialised()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(settings.resolved_database_url)
        hub, counters = EventHub(), IngestCounters()
        async with AsyncExitStack() as stack:
            stack.callback(engine.dispose)
            dispatcher = None
            if ingest:
                link = MqttIngestor(_ingest_settings(settings, home), engine, hub, counters)
                await stack.enter_async_context(link.running())
                dispatcher = Dispatcher(
                    engine,
                    link,
                    hub,
                    topic_prefix=settings.topic_prefix,
                    interval_s=settings.dispatch_interval_s,
                    limits=settings.command_limits,
                )
                await stack.enter_async_context(dispatcher.running())
            signer = await asyncio.to_thread(ReleaseSigner.open, home)
            rollouts = None
            if dispatcher is not None:
                rollouts = RolloutEngine(
                    engine,
                    signer,
                    hub,
                    tick_s=settings.rollout_tick_s,
                    desired_changed=dispatcher.desired_changed,
                )
                await stack.enter_async_context(rollouts.running())
            app.state.context = ServiceContext(
                settings=settings,
                home=home,
                engine=engine,
                authority=CertificateAuthority.load(home),
                tokens=TokenIssuer(home.read_jwt_secret(), settings.access_token_ttl_s),
                hub=hub,
                counters=counters,
                # S3 checks its bucket over the network: off the event loop.
                store=await asyncio.to_thread(open_store, settings, home),
                signer=signer,
                artifact_urls=UrlSigner.load(
                    home, ttl_s=settings.artifact_url_ttl_s, base_url=settings.service_url
                ),
                dispatcher=dispatcher,
                rollouts=rollouts,
            )
            yield

    app = FastAPI(
        title="edgefleet",
        version=__version__,
        summary="Control plane of an MQTT fleet for AI at the edge",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/api/v1/openapi.json",
    )
    install_problem_handlers(app)
    api = APIRouter(prefix="/api/v1")
    for module in (system, auth, keys, enroll, devices, commands, events, agent):
        api.include_router(module.router)
    for module in (models, artifacts):
        api.include_router(module.router)
    for module in (deployments, results):
        api.include_router(module.router)
    app.include_router(api)
    mount_dashboard(app, settings.dashboard_dir or default_dashboard_dir())
    return app
