"""MQTT ingestion: validate device messages, write them in batches, announce the changes."""

from fleet_service.ingest.counters import IngestCounters
from fleet_service.ingest.mqtt import MqttIngestor, MqttIngestSettings
from fleet_service.ingest.writer import BatchResult, Incoming, write_batch

__all__ = [
    "BatchResult",
    "Incoming",
    "IngestCounters",
    "MqttIngestSettings",
    "MqttIngestor",
    "write_batch",
]
