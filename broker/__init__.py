"""The fleet's MQTT broker: Mosquitto configuration rendering and local process supervision."""

from broker.config import (
    DEFAULT_LOG_TYPES,
    BrokerConfig,
    RenderedBroker,
    render_broker_files,
    write_broker_files,
)
from broker.supervisor import (
    BrokerError,
    BrokerStartError,
    MosquittoSupervisor,
    log_tail,
)

__all__ = [
    "DEFAULT_LOG_TYPES",
    "BrokerConfig",
    "BrokerError",
    "BrokerStartError",
    "MosquittoSupervisor",
    "RenderedBroker",
    "log_tail",
    "render_broker_files",
    "write_broker_files",
]
