"""The edgefleet control plane: enrollment, ingestion, registry, REST API and dashboard."""

__version__ = "0.1.0"
