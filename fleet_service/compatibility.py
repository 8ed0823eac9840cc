"""Whether a device can take a model release, judged before anything is sent to it.

A release's manifest names the architectures it runs on, the RAM and disk it needs and its
runtime; a device's latest telemetry says what it has. Each mismatch becomes a sentence an
operator can act on, so a deployment skips the device instead of letting it fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleet_protocol import Encryption, ModelManifest, ModelRuntime
from fleet_protocol.manifest import normalise_architecture

__all__ = ["NO_TELEMETRY", "incompatibilities"]

NO_TELEMETRY = "no telemetry yet: start the agent and wait one telemetry interval"

_GIB = 1024**3
# The package extra that brings each runtime to a device.
_EXTRA = {ModelRuntime.GGUF: "llm", ModelRuntime.TFLITE: "tflite", ModelRuntime.ONNX: "onnx"}


def _gib(count: int) -> str:
    return f"{count / _GIB:.1f} GiB"


def _int(telemetry: Mapping[str, Any], key: str) -> int | None:
    value = telemetry.get(key)
    return int(value) if isinstance(value, int | float) else None


def incompatibilities(manifest: ModelManifest, telemetry: Mapping[str, Any] | None) -> list[str]:
    """Why a device whose latest telemetry is ``telemetry`` cannot take ``manifest``; empty
    when it can."""
    if not telemetry:
        return [NO_TELEMETRY]
    reasons: list[str] = []
    constraints = manifest.constraints
    architecture = str(telemetry.get("architecture") or "unknown")
    allowed = [normalise_architecture(a) for a in constraints.architectures]
    if allowed and normalise_architecture(architecture) not in allowed:
        listed = ", ".join(constraints.architectures)
        reasons.append(f"architecture {architecture} is not in [{listed}]")
    runtimes = [str(r) for r in telemetry.get("runtimes") or []]
    if manifest.runtime.value not in runtimes:
        installed = ", ".join(runtimes) or "none"
        reasons.append(
            f"runtime {manifest.runtime.value} is not installed (the agent reports: "
            f"{installed}); install edgefleet[{_EXTRA[manifest.runtime]}] on the device"
        )
    available = _int(telemetry, "memory_available_bytes")
    if available is None:
        total, used = _int(telemetry, "memory_total_bytes"), _int(telemetry, "memory_used_bytes")
        available = max(0, total - used) if total is not None and used is not None else None
    if (
        constraints.min_ram_bytes
        and available is not None
        and available < constraints.min_ram_bytes
    ):
        reasons.append(f"needs {_gib(constraints.min_ram_bytes)} RAM, {_gib(available)} available")
    # The installed files must fit, and a sealed release is downloaded before it is decrypted.
    disk_needed = max(
        constraints.min_disk_bytes,
        manifest.installed_bytes
        + (manifest.stored_bytes if manifest.encryption is not Encryption.NONE else 0),
    )
    total_disk, used_disk = _int(telemetry, "disk_total_bytes"), _int(telemetry, "disk_used_bytes")
    if total_disk is not None and used_disk is not None:
        free = max(0, total_disk - used_disk)
        if free < disk_needed:
            reasons.append(f"needs {_gib(disk_needed)} free disk, {_gib(free)} free")
    return reasons
