"""The fleet's MQTT broker: Mosquitto configuration rendering and local process supervision."""

from broker.config import (
    DEFAULT_LOG_TYPES,
    BrokerConfig,
    ReadGrant,
    RenderedBroker,
    render_acl,
    render_broker_files,
    write_acl,
    write_broker_files,
)
from broker.site import (
    DEVICE_DOWNLINK_LEAVES,
    DEVICE_UPLINK_LEAVES,
    SITE_FILES,
    SiteBrokerConfig,
    render_site_files,
)
from broker.supervisor import (
    BrokerError,
    BrokerStartError,
    MosquittoSupervisor,
    log_tail,
)

__all__ = [
    "DEFAULT_LOG_TYPES",
    "DEVICE_DOWNLINK_LEAVES",
    "DEVICE_UPLINK_LEAVES",
    "SITE_FILES",
    "BrokerConfig",
    "BrokerError",
    "BrokerStartError",
    "MosquittoSupervisor",
    "ReadGrant",
    "RenderedBroker",
    "SiteBrokerConfig",
    "log_tail",
    "render_acl",
    "render_broker_files",
    "render_site_files",
    "write_acl",
    "write_broker_files",
]
