"""Build the FastAPI application; its lifespan owns the database, the CA and MQTT ingestion."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI

from fleet_service import __version__
from fleet_service.api.audit_trail import AuditTrail
from fleet_service.api.middleware import install_edges
from fleet_service.api.problems import install_problem_handlers
from fleet_service.api.request_ids import RequestIdMiddleware, bind_route_ids
from fleet_service.api.routes import (
    agent,
    artifacts,
    audit,
    auth,
    commands,
    deployments,
    device_identity,
    devices,
    enroll,
    events,
    fleet,
    integrations,
    keys,
    models,
    results,
    security,
    system,
    tokens,
    users,
    webhooks,
)
from fleet_service.artifacts import ReleaseSigner, UrlSigner, open_store
from fleet_service.auth import TokenIssuer
from fleet_service.authority import CertificateAuthority
from fleet_service.broker_policy import BrokerPolicy
from fleet_service.config import ServiceSettings
from fleet_service.context import ServiceContext
from fleet_service.db import create_db_engine
from fleet_service.dispatch import Dispatcher
from fleet_service.events import EventHub
from fleet_service.fleet_history import FleetHistory
from fleet_service.home import FleetHome
from fleet_service.ingest import IngestCounters, MqttIngestor, MqttIngestSettings
from fleet_service.metrics import HttpMetricsMiddleware, ServiceMetrics
from fleet_service.ratelimit import RateLimiter
from fleet_service.renewal import CertificateRenewer
from fleet_service.retention import RetentionPolicy, RetentionWorker
from fleet_service.rollout import RolloutEngine
from fleet_service.security_audit import AuditPolicy, SecurityAuditor
from fleet_service.web import default_dashboard_dir, mount_dashboard
from fleet_service.webhook_delivery import SenderSettings, WebhookSender

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


def create_app(
    settings: ServiceSettings, *, ingest: bool = True, broker_policy: BrokerPolicy | None = None
) -> FastAPI:
    """The control plane app; ``ingest=False`` leaves MQTT out (for API-only use).

    ``broker_policy`` is given by the process that runs the broker (fleet_service.runner): its
    loop keeps the broker's ACL and CRL in step with the database.
    """
    home = FleetHome(settings.home)
    home.require_initialised()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(settings.resolved_database_url)
        hub, counters = EventHub(), IngestCounters(metrics.registry)
        async with AsyncExitStack() as stack:
            stack.callback(engine.dispose)
            metrics.watch_fleet(engine)
            stack.callback(metrics.unwatch_fleet)
            dispatcher = None
            link: MqttIngestor | None = None
            if ingest:
                # Device certificate renewal over MQTT (fleet_service/renewal.py, issue 6).
                renewer = CertificateRenewer(
                    engine,
                    CertificateAuthority.load(home),
                    ttl_s=settings.device_cert_ttl_s,
                    topic_prefix=settings.topic_prefix,
                )
                link = MqttIngestor(
                    _ingest_settings(settings, home), engine, hub, counters, renewer=renewer
                )
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
            # Posts queued result deliveries to webhooks (fleet_service.webhook_delivery).
            sender = WebhookSender(engine, hub, SenderSettings.of(settings))
            await stack.enter_async_context(sender.running())
            # Audits the fleet's security now and every interval (fleet_service.security_audit).
            auditor = SecurityAuditor(
                engine,
                AuditPolicy.from_settings(settings, home),
                hub,
                interval_s=settings.security_audit_interval_s,
            )
            await stack.enter_async_context(auditor.running())
            # Rolls up and deletes old telemetry, results and logs (fleet_service/retention.py).
            retention = RetentionWorker(
                engine,
                RetentionPolicy.from_settings(settings),
                interval_s=settings.retention_interval_s,
            )
            await stack.enter_async_context(retention.running())
            # Samples this process's own metrics for the dashboard's fleet page
            # (fleet_service/fleet_history.py): after the fleet-state collector is registered.
            history = FleetHistory(metrics.registry, interval_s=settings.fleet_history_interval_s)
            await stack.enter_async_context(history.running())
            if broker_policy is not None:
                # After the link: decommissioning clears retained topics through it.
                await stack.enter_async_context(broker_policy.running(engine, link))
            app.state.context = ServiceContext(
                settings=settings,
                home=home,
                engine=engine,
                authority=CertificateAuthority.load(home),
                tokens=TokenIssuer.from_settings(settings, home.read_jwt_secret()),
                hub=hub,
                counters=counters,
                metrics=metrics,
                # S3 checks its bucket over the network: off the event loop.
                store=await asyncio.to_thread(open_store, settings, home),
                signer=signer,
                artifact_urls=UrlSigner.load(
                    home, ttl_s=settings.artifact_url_ttl_s, base_url=settings.service_url
                ),
                limits=RateLimiter(
                    {
                        "login-user": settings.login_rate_per_user,
                        "login-address": settings.login_rate_per_address,
                        "enroll-address": settings.enroll_rate_per_address,
                    }
                ),
                history=history,
                dispatcher=dispatcher,
                rollouts=rollouts,
                broker_policy=broker_policy,
            )
            yield

    app = FastAPI(
        title="edgefleet",
        version=__version__,
        summary="Control plane of an MQTT fleet for AI at the edge",
        lifespan=lifespan,
        docs_url="/docs" if settings.api_docs else None,
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
    )
    install_problem_handlers(app)
    install_edges(app, settings)  # headers, CSP, CORS, body limits (api/middleware.py)
    # Refused and failed writes go to the audit log (fleet_service/api/audit_trail.py).
    app.add_middleware(AuditTrail)
    # Outermost: times every request, refusals by the edges included (fleet_service/metrics.py).
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # X-Request-ID, and on every log line of the request
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(bind_route_ids)])
    for module in (system, auth, keys, enroll, devices, commands, events, agent):
        api.include_router(module.router)
    for module in (models, artifacts):
        api.include_router(module.router)
    for module in (deployments, results):
        api.include_router(module.router)
    api.include_router(fleet.router)  # the dashboard's fleet page
    api.include_router(webhooks.router)
    api.include_router(security.router)
    api.include_router(device_identity.router)
    api.include_router(integrations.router)
    for module in (users, tokens, audit):  # access management (fleet_service/api/routes)
        api.include_router(module.router)
    app.include_router(api)
    mount_dashboard(app, settings.dashboard_dir or default_dashboard_dir())
    return app
