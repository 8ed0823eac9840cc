"""Render the Mosquitto 2.0 configuration and ACL of the fleet broker from typed settings."""

from __future__ import annotations

import getpass
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

__all__ = [
    "DEFAULT_LOG_TYPES",
    "BrokerConfig",
    "ReadGrant",
    "RenderedBroker",
    "render_acl",
    "render_broker_files",
    "write_acl",
    "write_broker_files",
]

logger = logging.getLogger(__name__)

# What an operator needs to follow connections and failures; `debug` and `subscribe` would log
# every packet of every device.
DEFAULT_LOG_TYPES = ("error", "warning", "notice", "information")

_LOG_TYPES = frozenset(
    {"debug", "error", "warning", "notice", "information", "subscribe", "unsubscribe",
     "websockets", "none", "all"}
)  # fmt: skip
# Mosquitto's config parser splits on whitespace and has no quoting: a value with a space, a
# newline or a `#` would be cut short or, worse, inject another directive.
_UNSAFE = re.compile(r"[\s#]")
_EXPIRATION = re.compile(r"^[1-9][0-9]*[hdwmy]$")
_TOPIC_PREFIX = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")

# Device topics a read-only identity (a monitoring tap, an integration) may read: everything a
# device publishes, and no topic addressed to a device.
_READABLE_LEAVES = ("status", "telemetry", "logs", "acks", "reported", "results/+")
# An ACL topic filter: levels without whitespace (which would end the line or inject another
# directive); `+` and `#` are wildcards there, and `#` after a space is not a comment.
_ACL_TOPIC = re.compile(r"^[^\s\x00]+$")


def _safe(name: str, value: str) -> str:
    if not value or _UNSAFE.search(value):
        raise ValueError(
            f"broker setting {name}={value!r} is empty or contains whitespace or '#', which "
            "mosquitto.conf cannot express; choose a path or name without them"
        )
    return value


@dataclass(frozen=True)
class ReadGrant:
    """Topics one client identity (a certificate CN) may read: an integration, a site bridge.

    An integration only reads (``topics``). A site bridge also writes, on behalf of its
    site's devices, the topics those devices may write (``write_topics``). The control plane
    computes these from its database (fleet_service/broker_policy.py); a grant with no topics
    still names the identity, so everything it tries is denied.
    """

    identity: str
    topics: tuple[str, ...] = ()
    write_topics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _safe("identity", self.identity)
        if any(c in self.identity for c in "+/"):
            raise ValueError(f"identity {self.identity!r} must not hold '+' or '/'")
        for topic in (*self.topics, *self.write_topics):
            if not _ACL_TOPIC.fullmatch(topic) or "#" in topic.rstrip("#") or "//" in topic:
                raise ValueError(
                    f"read grant {topic!r} for {self.identity}: an ACL topic is '/'-separated "
                    "levels without whitespace, with '#' only as the last level"
                )


@dataclass(frozen=True)
class BrokerConfig:
    """Everything the rendered broker configuration depends on; every knob says why it exists."""

    # The one mTLS listener. Binding beyond loopback is safe: there is no plaintext listener.
    bind_host: str
    port: int
    # The fleet CA that signs every client certificate, and the broker's own server identity.
    ca_file: Path
    cert_file: Path
    key_file: Path
    # Rendered conf and ACL, the persistence database and the log live here.
    data_dir: Path
    # Must match fleet_protocol's prefix on both sides; the ACL confines devices beneath it.
    topic_prefix: str = "fleet/v1"
    # CN of the control plane's client certificate: the only identity that reads all devices.
    service_identity: str = "edgefleet-service"
    # More control-plane identities with the same grants (service replicas, one cert each,
    # since one identity holds one connection).
    extra_service_identities: tuple[str, ...] = ()
    # CNs of fleet-CA client certificates that may read (never write) every device topic: a
    # monitoring tap, the ingest benchmark's baseline subscriber. Integrations get narrower,
    # per-topic grants (read_grants).
    reader_identities: tuple[str, ...] = ()
    # Largest payload the broker forwards (message_size_limit). Over it the message is dropped
    # and the connection stays up (see the template). 4x fleet_protocol.MAX_PAYLOAD_BYTES, so
    # anything the service could accept passes and its own check names an oversized payload.
    max_payload_bytes: int = 262_144
    # Largest whole MQTT packet (max_packet_size); a client sending more is disconnected. An outer
    # bound against memory exhaustion, above max_payload_bytes plus topic and properties.
    max_packet_bytes: int = 1_048_576
    # QoS 1 messages queued per client beyond those in flight; past it mosquitto DROPS new ones.
    # Mosquitto 2.0 has one value for every client, and the one that needs it is the service: its
    # session buffers the whole fleet's stream while a batch commits or the service restarts.
    # bench/ingest.py lost a fifth of a 20-device burst at 1000. About 1 KiB per telemetry
    # message, so the worst case is ~100 MiB held for a service that is down for a while.
    max_queued_messages: int = 100_000
    # Unacknowledged QoS 1 messages in flight per client; mosquitto's default, enough to keep a
    # LAN link busy without flooding a Raspberry Pi agent.
    max_inflight_messages: int = 20
    # Seconds between persistence snapshots: a crash loses at most this much broker state, and
    # the agents' outbox replays what the service has not receipted.
    autosave_interval_s: int = 60
    # A persistent session unused this long is dropped (decommissioned devices must not grow the
    # broker forever); a device back after it simply re-subscribes and gets the retained desired.
    persistent_client_expiration: str = "7d"
    # The fleet CA's CRL (fleet_service/broker_policy.py keeps it current). Once set, the file
    # must always exist and be unexpired: mosquitto 2.0.11 refuses every client when the CRL's
    # nextUpdate has passed, and a reload that finds the file missing silently stops checking.
    crl_file: Path | None = None
    # Read-only grants of integrations, rendered into the ACL; they change at run time, so the
    # policy loop rewrites the ACL with write_acl() and reloads the broker (SIGHUP).
    read_grants: tuple[ReadGrant, ...] = ()
    # Mosquitto started as root drops to this user; it must be able to read key_file (0600).
    run_as_user: str = field(default_factory=getpass.getuser)
    log_types: tuple[str, ...] = DEFAULT_LOG_TYPES

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"broker port {self.port} is not in 1-65535")
        _safe("bind_host", self.bind_host)
        _safe("run_as_user", self.run_as_user)
        _safe("service_identity", self.service_identity)
        identities = (self.service_identity, *self.extra_service_identities)
        for identity in (*identities, *self.reader_identities):
            _safe("identity", identity)
            if any(c in identity for c in "+/"):
                raise ValueError(f"identity {identity!r} must not hold '+' or '/'")
        named = [*identities, *self.reader_identities, *(g.identity for g in self.read_grants)]
        if len(set(named)) != len(named):
            raise ValueError(
                f"broker identities {sorted(named)} repeat a name; each certificate CN may have "
                "one set of grants in the ACL"
            )
        if not _TOPIC_PREFIX.fullmatch(self.topic_prefix):
            raise ValueError(
                f"topic_prefix {self.topic_prefix!r} must be '/'-separated levels of "
                "letters, digits, '_', '.', '-' (no wildcards), e.g. 'fleet/v1'"
            )
        if not 0 < self.max_payload_bytes < self.max_packet_bytes:
            raise ValueError(
                f"max_payload_bytes ({self.max_payload_bytes}) must be positive and below "
                f"max_packet_bytes ({self.max_packet_bytes}), or oversized messages would "
                "disconnect their sender instead of being dropped"
            )
        for name in ("max_queued_messages", "max_inflight_messages", "autosave_interval_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"broker setting {name} must be at least 1")
        if not _EXPIRATION.fullmatch(self.persistent_client_expiration):
            raise ValueError(
                f"persistent_client_expiration {self.persistent_client_expiration!r} must be a "
                "number followed by h, d, w, m or y, e.g. '7d'"
            )
        unknown = set(self.log_types) - _LOG_TYPES
        if unknown or not self.log_types:
            raise ValueError(f"log_types {self.log_types!r}: choose from {sorted(_LOG_TYPES)}")

    @property
    def conf_path(self) -> Path:
        """The rendered ``mosquitto.conf``."""
        return self.data_dir / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        """The rendered ACL file."""
        return self.data_dir / "acl"

    @property
    def persistence_dir(self) -> Path:
        """Where mosquitto keeps ``mosquitto.db``."""
        return self.data_dir / "persistence"

    @property
    def log_path(self) -> Path:
        """Where the supervisor appends mosquitto's log (it logs to stderr)."""
        return self.data_dir / "mosquitto.log"


@dataclass(frozen=True)
class RenderedBroker:
    """The text of the two files mosquitto reads."""

    conf_text: str
    acl_text: str


def _template(name: str) -> Template:
    return Template(resources.files("broker").joinpath("templates", name).read_text("utf-8"))


def _path(name: str, path: Path) -> str:
    # Absolute, so the files mean the same whatever directory mosquitto is started from.
    return _safe(name, str(Path(path).resolve()))


def render_broker_files(config: BrokerConfig) -> RenderedBroker:
    """The ``mosquitto.conf`` and ACL text for ``config``; pure, touches no files."""
    crl_line = (
        f"crlfile {_path('crl_file', config.crl_file)}"
        if config.crl_file is not None
        else "# no crlfile: revocation is not checked (`edgefleet up` always configures one)"
    )
    conf = _template("mosquitto.conf.tmpl").substitute(
        acl_file=_path("acl_file", config.acl_path),
        run_as_user=config.run_as_user,
        port=config.port,
        bind_host=config.bind_host,
        ca_file=_path("ca_file", config.ca_file),
        cert_file=_path("cert_file", config.cert_file),
        key_file=_path("key_file", config.key_file),
        crl_line=crl_line,
        persistence_dir=_path("persistence_dir", config.persistence_dir),
        autosave_interval_s=config.autosave_interval_s,
        persistent_client_expiration=config.persistent_client_expiration,
        max_queued_messages=config.max_queued_messages,
        max_inflight_messages=config.max_inflight_messages,
        max_payload_bytes=config.max_payload_bytes,
        max_packet_bytes=config.max_packet_bytes,
        log_file=_path("log_file", config.log_path),
        log_type_lines="\n".join(f"log_type {t}" for t in config.log_types),
    )
    return RenderedBroker(conf_text=conf, acl_text=render_acl(config))


def render_acl(config: BrokerConfig) -> str:
    """The ACL text for ``config``, integration grants included; pure, touches no files."""
    replicas = "".join(
        f"user {name}\ntopic readwrite {config.topic_prefix}/#\n\n"
        for name in config.extra_service_identities
    )
    # Readers see what devices send, never what they are sent: a desired state carries the keys
    # of encrypted model releases, and commands carry an operator's parameters.
    reader_grants = "".join(
        f"topic read {config.topic_prefix}/devices/+/{leaf}\n" for leaf in _READABLE_LEAVES
    )
    readers = "".join(f"user {name}\n{reader_grants}\n" for name in config.reader_identities)
    # `topic read` only: mosquitto refuses these identities every publish and every topic not
    # listed, and checks read grants when it delivers each message (re-read on SIGHUP, so a
    # revoked grant stops deliveries to a subscription made before).
    grants = "".join(
        f"user {grant.identity}\n"
        + "".join(f"topic read {t}\n" for t in grant.topics)
        + "".join(f"topic write {t}\n" for t in grant.write_topics)
        + "\n"
        for grant in config.read_grants
    )
    return _template("acl.tmpl").substitute(
        service_identity=config.service_identity,
        prefix=config.topic_prefix,
        readers=readers,
        replicas=replicas,
        grants=grants,
    )


def write_broker_files(config: BrokerConfig) -> Path:
    """Write ``mosquitto.conf`` and ``acl`` into ``config.data_dir``; return the conf's path."""
    rendered = render_broker_files(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # Only mosquitto (running as run_as_user) writes here; the persistence db holds retained
    # messages and queued commands, which other local users have no business reading.
    config.persistence_dir.mkdir(mode=0o700, exist_ok=True)
    _replace(config.acl_path, rendered.acl_text)
    _replace(config.conf_path, rendered.conf_text)
    logger.debug("wrote broker config %s", config.conf_path)
    return config.conf_path


def write_acl(config: BrokerConfig) -> bool:
    """Rewrite the ACL when its text differs from what is on disk; True when it did.

    The caller reloads the broker after a change (MosquittoSupervisor.reload_confirmed).
    """
    text = render_acl(config)
    try:
        if config.acl_path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    config.data_dir.mkdir(parents=True, exist_ok=True)
    _replace(config.acl_path, text)
    logger.info("wrote broker ACL %s (%d read grants)", config.acl_path, len(config.read_grants))
    return True


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    # Atomic: a SIGHUP reload never reads a half-written file.
    tmp.replace(path)
