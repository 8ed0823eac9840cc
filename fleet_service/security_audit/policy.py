"""The thresholds a security audit flags against, built from the service settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from fleet_service.config import ServiceSettings
from fleet_service.home import FleetHome

__all__ = ["AuditPolicy"]


@dataclass(frozen=True)
class AuditPolicy:
    """The thresholds past which something is flagged (ServiceSettings.security_*)."""

    cert_warn: timedelta = timedelta(days=7)
    # Agents renew once a third of this is left: a quarter left means the renewal is overdue,
    # whatever cert_warn says (a fleet with one-day certificates is not always "expiring").
    device_cert_ttl: timedelta = timedelta(days=30)
    silent_after: timedelta = timedelta(days=7)
    key_max_lifetime: timedelta = timedelta(days=7)
    key_max_uses_left: int = 10
    login_stale_after: timedelta = timedelta(days=90)
    token_max_lifetime: timedelta = timedelta(days=365)
    token_unused_after: timedelta = timedelta(days=90)
    max_admins: int = 3
    takeover_window: timedelta = timedelta(hours=1)
    takeover_threshold: int = 3
    # Mosquitto logs, oldest first; missing files are skipped (no connection checks then).
    broker_logs: tuple[Path, ...] = ()
    # The control plane's own certificates, by name: ("ca", path), ("server", path), ...
    home_certs: tuple[tuple[str, Path], ...] = ()

    @classmethod
    def from_settings(cls, settings: ServiceSettings, home: FleetHome) -> AuditPolicy:
        """The policy a running service or the CLI uses for this fleet home."""
        log = settings.security_broker_log or home.broker_dir / "mosquitto.log"
        day = timedelta(days=1)
        return cls(
            cert_warn=settings.security_cert_warn_days * day,
            device_cert_ttl=timedelta(seconds=settings.device_cert_ttl_s),
            silent_after=settings.security_silent_days * day,
            key_max_lifetime=settings.security_key_max_days * day,
            key_max_uses_left=settings.security_key_max_uses_left,
            login_stale_after=settings.security_login_stale_days * day,
            token_max_lifetime=settings.security_token_max_days * day,
            token_unused_after=settings.security_token_unused_days * day,
            max_admins=settings.security_max_admins,
            takeover_window=timedelta(seconds=settings.security_takeover_window_s),
            takeover_threshold=settings.security_takeover_threshold,
            broker_logs=(log.with_name(log.name + ".1"), log),
            home_certs=(
                ("ca", home.ca_cert),
                ("server", home.server_cert),
                ("service", home.service_cert),
            ),
        )
