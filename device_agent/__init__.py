"""The edgefleet device runtime: enrollment, a persistent mTLS MQTT session and telemetry."""

__all__ = ["__version__"]

__version__ = "0.1.0"
