"""What a running service holds: settings, database, CA, tokens, events, counters, artifacts."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from fleet_service.artifacts import ArtifactStore, ReleaseSigner, UrlSigner
from fleet_service.auth import TokenIssuer
from fleet_service.authority import CertificateAuthority
from fleet_service.broker_policy import BrokerPolicy
from fleet_service.config import ServiceSettings
from fleet_service.dispatch import Dispatcher
from fleet_service.enrollment import EnrollmentTarget
from fleet_service.events import EventHub
from fleet_service.fleet_history import FleetHistory
from fleet_service.home import FleetHome
from fleet_service.ingest import IngestCounters
from fleet_service.metrics import ServiceMetrics
from fleet_service.ratelimit import RateLimiter
from fleet_service.rollout import RolloutEngine

__all__ = ["ServiceContext"]


@dataclass(frozen=True)
class ServiceContext:
    """Built once by ``create_app`` and reached by routes through ``api.deps``."""

    settings: ServiceSettings
    home: FleetHome
    engine: Engine
    authority: CertificateAuthority
    tokens: TokenIssuer
    hub: EventHub
    counters: IngestCounters
    metrics: ServiceMetrics  # GET /api/v1/metrics
    # Model artifacts: where release files live, who signs manifests, who signs download URLs.
    store: ArtifactStore
    signer: ReleaseSigner
    artifact_urls: UrlSigner
    limits: RateLimiter  # login and enrollment attempts
    history: FleetHistory  # the fleet page's charts: GET /api/v1/fleet/overview
    dispatcher: Dispatcher | None = None  # None when the app runs without MQTT
    rollouts: RolloutEngine | None = None  # runs next to the dispatcher
    # The primary's broker ACL/CRL loop (fleet_service.broker_policy); None on a replica.
    broker_policy: BrokerPolicy | None = None

    def wake_rollouts(self) -> None:
        """A deployment was created or resumed: tick now."""
        if self.rollouts is not None:
            self.rollouts.wake()

    def wake_dispatcher(self) -> None:
        """A command was stored: publish it now."""
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def desired_changed(self, device_id: str) -> None:
        """A device's desired state changed: publish it now."""
        if self.dispatcher is not None:
            self.dispatcher.desired_changed(device_id)

    def wake_broker_policy(self) -> None:
        """Grants may have changed (a device enrolled): have the primary's loop pass now,
        without waiting for it. Call on the event loop."""
        if self.broker_policy is not None:
            self.broker_policy.wake()

    async def apply_broker_policy(self) -> bool:
        """Revocations or grants were committed: have the broker enforce them now.

        True once it does; False on a replica (the primary polls for the change) or when the
        broker did not manage within ``revocation_apply_timeout_s``.
        """
        if self.broker_policy is None:
            return False
        return await self.broker_policy.apply_now(self.settings.revocation_apply_timeout_s)

    @property
    def enrollment_target(self) -> EnrollmentTarget:
        """Where enrolled devices connect."""
        return EnrollmentTarget(
            mqtt_host=self.settings.advertise_host,
            mqtt_port=self.settings.mqtt_port,
            topic_prefix=self.settings.topic_prefix,
            cert_ttl_s=self.settings.device_cert_ttl_s,
        )
