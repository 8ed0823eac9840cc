"""Render the Mosquitto configuration of a site broker bridged to the central fleet broker.

A site broker serves the devices of one site on their LAN with the central broker's device
rules (mTLS, CN as username and client id, per-device ``pattern`` ACL), and carries their
traffic to the central broker over a single bridge connection. The files are rendered on the
control plane, where the fleet CA issues the site's certificates, and copied to the site host;
paths in them are where the bundle will live there (``SiteBrokerConfig.install_dir``).
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from broker.config import (
    _EXPIRATION,
    _LOG_TYPES,
    _TOPIC_PREFIX,
    DEFAULT_LOG_TYPES,
    RenderedBroker,
    _safe,
    _template,
)

__all__ = [
    "DEVICE_DOWNLINK_LEAVES",
    "DEVICE_UPLINK_LEAVES",
    "SITE_FILES",
    "SiteBrokerConfig",
    "device_acl_patterns",
    "render_site_files",
]

# The topic levels below ``devices/{id}/`` a device writes (carried up the bridge) and reads
# (carried down). The central ACL template (templates/acl.tmpl) grants devices the same;
# tests/test_site_bridge.py checks the two stay in step.
DEVICE_UPLINK_LEAVES = ("status", "telemetry", "logs", "acks", "reported", "results/+", "csr")
DEVICE_DOWNLINK_LEAVES = ("commands", "receipts", "desired", "certificate")

# The file names of a site bundle, relative to its install_dir.
SITE_FILES = {
    "conf": "mosquitto.conf",
    "acl": "acl",
    "ca": "ca.crt",
    "crl": "crl.pem",
    "server_cert": "server.crt",
    "server_key": "server.key",
    "bridge_cert": "bridge.crt",
    "bridge_key": "bridge.key",
    "persistence": "persistence",
}

_HOST = re.compile(r"^[A-Za-z0-9.:_-]+$")


@dataclass(frozen=True)
class SiteBrokerConfig:
    """Everything a site broker's configuration depends on; every knob says why it exists."""

    # The site's name; also names the bridge connection (`connection site-<name>`).
    site_name: str
    # CN of the bridge's client certificate: the one identity the central broker sees.
    bridge_identity: str
    # Where the central broker listens, as the site reaches it; its server certificate must
    # name central_host.
    central_host: str
    central_port: int
    # Where the bundle lives on the site host: every path in the config is below it. Absolute,
    # so the files mean the same whatever directory mosquitto is started from.
    install_dir: PurePosixPath
    # The devices' mTLS listener. Binding beyond loopback is safe: there is no plaintext one.
    port: int = 8883
    bind_host: str = "0.0.0.0"  # noqa: S104 - devices on the site's LAN connect; mTLS only
    # Must match fleet_protocol's prefix (the central broker's topic_prefix).
    topic_prefix: str = "fleet/v1"
    # Mosquitto started as root drops to this user; it must be able to read the 0600 keys.
    run_as_user: str = field(default_factory=getpass.getuser)
    # MQTT keepalive of the bridge: a dead uplink is noticed within 1.5x this.
    keepalive_s: int = 60
    # Reconnect backoff of the bridge, seconds (mosquitto's restart_timeout base and cap).
    restart_min_s: int = 2
    restart_max_s: int = 60
    # Same meaning and defaults as broker.BrokerConfig. The bridge's local session is the one
    # that needs max_queued_messages: it buffers the whole site while the uplink is down.
    max_payload_bytes: int = 262_144
    max_packet_bytes: int = 1_048_576
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 20
    autosave_interval_s: int = 60
    persistent_client_expiration: str = "7d"
    # Only to say in the rendered files which devices the central broker lets this site carry.
    tag: str = ""
    log_types: tuple[str, ...] = DEFAULT_LOG_TYPES

    def __post_init__(self) -> None:
        for name in ("site_name", "bridge_identity", "run_as_user", "bind_host", "central_host"):
            _safe(name, getattr(self, name))
        if any(c in self.bridge_identity for c in "+/"):
            raise ValueError(f"bridge identity {self.bridge_identity!r} must not hold '+' or '/'")
        for name in ("central_host", "bind_host"):
            if not _HOST.fullmatch(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a host name or address")
        for name in ("port", "central_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ValueError(f"site broker {name} {getattr(self, name)} is not in 1-65535")
        if not self.install_dir.is_absolute():
            raise ValueError(
                f"install_dir {self.install_dir} must be absolute: it is where the bundle will "
                "live on the site host, e.g. /etc/edgefleet-site"
            )
        _safe("install_dir", str(self.install_dir))
        if not _TOPIC_PREFIX.fullmatch(self.topic_prefix):
            raise ValueError(
                f"topic_prefix {self.topic_prefix!r} must be '/'-separated levels of "
                "letters, digits, '_', '.', '-' (no wildcards), e.g. 'fleet/v1'"
            )
        if not 0 < self.max_payload_bytes < self.max_packet_bytes:
            raise ValueError(
                f"max_payload_bytes ({self.max_payload_bytes}) must be positive and below "
                f"max_packet_bytes ({self.max_packet_bytes})"
            )
        for name in (
            "max_queued_messages",
            "max_inflight_messages",
            "autosave_interval_s",
            "keepalive_s",
            "restart_min_s",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"site broker setting {name} must be at least 1")
        if self.restart_max_s < self.restart_min_s:
            raise ValueError(
                f"restart_max_s ({self.restart_max_s}) must not be below restart_min_s "
                f"({self.restart_min_s})"
            )
        if not _EXPIRATION.fullmatch(self.persistent_client_expiration):
            raise ValueError(
                f"persistent_client_expiration {self.persistent_client_expiration!r} must be a "
                "number followed by h, d, w, m or y, e.g. '7d'"
            )
        unknown = set(self.log_types) - _LOG_TYPES
        if unknown or not self.log_types:
            raise ValueError(f"log_types {self.log_types!r}: choose from {sorted(_LOG_TYPES)}")
        if self.tag and any(c.isspace() for c in self.tag):
            raise ValueError(f"tag {self.tag!r} must not contain whitespace")

    def path(self, what: str) -> str:
        """The path on the site host of one bundle file (a key of SITE_FILES)."""
        return str(self.install_dir / SITE_FILES[what])


def device_acl_patterns(prefix: str) -> str:
    """The per-device ``pattern`` lines, one per topic a device writes or reads."""
    lines = [f"pattern write {prefix}/devices/%u/{leaf}" for leaf in DEVICE_UPLINK_LEAVES]
    lines += [f"pattern read {prefix}/devices/%u/{leaf}" for leaf in DEVICE_DOWNLINK_LEAVES]
    return "\n".join(lines)


def render_site_files(config: SiteBrokerConfig) -> RenderedBroker:
    """The site broker's ``mosquitto.conf`` and ACL text for ``config``; pure, touches no files."""
    prefix = config.topic_prefix
    topics = [f"topic {prefix}/devices/+/{leaf} out 1" for leaf in DEVICE_UPLINK_LEAVES]
    topics += [f"topic {prefix}/devices/+/{leaf} in 1" for leaf in DEVICE_DOWNLINK_LEAVES]
    conf = _template("site.conf.tmpl").substitute(
        site_name=config.site_name,
        acl_file=config.path("acl"),
        run_as_user=config.run_as_user,
        port=config.port,
        bind_host=config.bind_host,
        ca_file=config.path("ca"),
        cert_file=config.path("server_cert"),
        key_file=config.path("server_key"),
        crl_file=config.path("crl"),
        persistence_dir=config.path("persistence"),
        autosave_interval_s=config.autosave_interval_s,
        persistent_client_expiration=config.persistent_client_expiration,
        max_queued_messages=config.max_queued_messages,
        max_inflight_messages=config.max_inflight_messages,
        max_payload_bytes=config.max_payload_bytes,
        max_packet_bytes=config.max_packet_bytes,
        log_type_lines="\n".join(f"log_type {t}" for t in config.log_types),
        connection_name=config.bridge_identity,
        central_host=config.central_host,
        central_port=config.central_port,
        bridge_identity=config.bridge_identity,
        # The bridge's session on this broker; distinct from any device's CN (`dev-...`).
        bridge_local_clientid=f"{config.bridge_identity}.local",
        bridge_cert_file=config.path("bridge_cert"),
        bridge_key_file=config.path("bridge_key"),
        keepalive_s=config.keepalive_s,
        restart_min_s=config.restart_min_s,
        restart_max_s=config.restart_max_s,
        tag=config.tag or "(see the control plane)",
        topic_lines="\n".join(topics),
    )
    acl = _template("site-acl.tmpl").substitute(device_patterns=device_acl_patterns(prefix))
    return RenderedBroker(conf_text=conf, acl_text=acl)
