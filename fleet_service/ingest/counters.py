"""Counters of what ingestion received, stored and rejected, for the API and the logs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from fleet_service.ingest.writer import BatchResult
from fleet_service.schemas import IngestStats

__all__ = ["IngestCounters"]


@dataclass
class IngestCounters:
    """Mutated only on the event loop, so plain integers are enough."""

    connected: bool = False
    database_ok: bool = True  # False while batches fail to commit
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    batches: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def reject(self, reason: str) -> None:
        """Count one dropped message under ``reason`` (json, schema, size, topic, ...)."""
        self.rejected[reason] += 1

    def record(self, result: BatchResult) -> None:
        """Book a committed batch, whichever transport brought it."""
        self.database_ok = True
        self.batches += 1
        self.stored += result.stored
        self.duplicates += result.duplicates
        if result.unknown_devices:
            self.rejected["unknown-device"] += result.unknown_devices
        if result.unknown_commands:
            self.rejected["unknown-command"] += result.unknown_commands

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
