"""Counters of what ingestion received, stored and rejected, for the API, /metrics and the logs."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from fleet_service.ingest.writer import BatchResult
from fleet_service.schemas import IngestStats

__all__ = ["UNKNOWN_KIND", "IngestCounters"]

# The kind label of a message whose topic could not be parsed.
UNKNOWN_KIND = "unknown"
_BATCH_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_COMMIT_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class IngestCounters:
    """Mutated only on the event loop, so plain integers are enough for the API's snapshot; the
    same events feed the Prometheus series in ``registry`` (the app's own, fleet_service.metrics).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.connected = False
        self.database_ok = True  # False while batches fail to commit
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.batches = 0
        self.rejected: Counter[str] = Counter()
        Gauge(
            "edgefleet_ingest_connected",
            "1 while the service's MQTT session to the broker is up",
            registry=registry,
        ).set_function(lambda: float(self.connected))
        self._received = PromCounter(
            "edgefleet_ingest_received",
            "Device messages received (MQTT or HTTPS), by topic kind",
            ["kind"],
            registry=registry,
        )
        self._rejected = PromCounter(
            "edgefleet_ingest_rejected",
            "Device messages dropped, by topic kind and reason (json, schema, size, topic, "
            "unknown-device, unknown-command)",
            ["kind", "reason"],
            registry=registry,
        )
        self._stored = PromCounter(
            "edgefleet_ingest_stored", "Rows inserted and state changes applied", registry=registry
        )
        self._duplicates = PromCounter(
            "edgefleet_ingest_duplicates",
            "Messages already stored (redelivered), acknowledged again",
            registry=registry,
        )
        self._batch_size = Histogram(
            "edgefleet_ingest_batch_size",
            "Messages per committed batch",
            buckets=_BATCH_SIZES,
            registry=registry,
        )
        self._commit_seconds = Histogram(
            "edgefleet_ingest_commit_seconds",
            "Time to commit one batch to the database",
            buckets=_COMMIT_SECONDS,
            registry=registry,
        )

    def receive(self, kind: str) -> None:
        """Count one message as it arrives, before it is checked."""
        self.received += 1
        self._received.labels(kind).inc()

    def reject(self, reason: str, kind: str = UNKNOWN_KIND) -> None:
        """Count one dropped message under ``reason`` (json, schema, size, topic, ...)."""
        self.rejected[reason] += 1
        self._rejected.labels(kind, reason).inc()

    def record(self, result: BatchResult, *, size: int, seconds: float) -> None:
        """Book a committed batch of ``size`` messages, whichever transport brought it."""
        self.database_ok = True
        self.batches += 1
        self.stored += result.stored
        self.duplicates += result.duplicates
        self._stored.inc(result.stored)
        self._duplicates.inc(result.duplicates)
        self._batch_size.observe(size)
        self._commit_seconds.observe(seconds)
        for reason, count in (
            ("unknown-device", result.unknown_devices),
            ("unknown-command", result.unknown_commands),
        ):
            if count:
                self.rejected[reason] += count
                self._rejected.labels(UNKNOWN_KIND, reason).inc(count)

    def snapshot(self) -> IngestStats:
        """An immutable copy for the API."""
        return IngestStats(
            connected=self.connected,
            received=self.received,
            stored=self.stored,
            duplicates=self.duplicates,
            rejected=dict(self.rejected),
            batches=self.batches,
        )
