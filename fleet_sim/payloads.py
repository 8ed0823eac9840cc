"""Plausible telemetry and inference results for one simulated device, as the real payloads.

Each device draws a hardware profile once (architecture, RAM, disk, a CPU baseline) and then
moves by small random steps around it, so charts look like a machine's: CPU wanders and drives
load and temperature, memory drifts, network counters only grow, uptime advances.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from datetime import datetime

from device_agent import __version__
from fleet_protocol import ModelRuntime, ResultMessage, ResultSource, TelemetryMessage

__all__ = ["DeviceProfile", "ResultModel", "TelemetryModel"]

_GIB = 1024**3

# (architecture, platform, cores, RAM choices in GiB): a Raspberry Pi 4/5, an old 32-bit Pi, a
# small x86 box, as a mixed edge fleet has them.
_HARDWARE = (
    ("aarch64", "Linux-6.6.31+rpt-rpi-v8-aarch64-with-glibc2.36", 4, (2, 4, 8)),
    ("armv7l", "Linux-6.1.21-v7l+-armv7l-with-glibc2.31", 4, (1, 2)),
    ("x86_64", "Linux-6.1.0-21-amd64-x86_64-with-glibc2.36", 4, (8, 16)),
)
_DISKS_GIB = (32, 64, 128, 256)

# What the simulated camera model sees, with how often.
_LABELS = ("person", "car", "bicycle", "dog", "empty")
_LABEL_WEIGHTS = (0.3, 0.25, 0.1, 0.05, 0.3)
# The simulated model release; the hash stands for its weights file.
_MODEL = "sim-detector"
_MODEL_VERSION = "1.4.0"
_MODEL_SHA256 = hashlib.sha256(b"edgefleet-sim detector weights").hexdigest()


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


@dataclass(slots=True)
class DeviceProfile:
    """A device's fixed hardware, drawn once from its own random stream."""

    architecture: str
    platform: str
    cores: int
    memory_total: int
    disk_total: int
    cpu_baseline: float

    @classmethod
    def draw(cls, rng: random.Random) -> DeviceProfile:
        """A random profile from the hardware table."""
        architecture, platform, cores, ram_choices = rng.choice(_HARDWARE)
        return cls(
            architecture=architecture,
            platform=platform,
            cores=cores,
            memory_total=rng.choice(ram_choices) * _GIB,
            disk_total=rng.choice(_DISKS_GIB) * _GIB,
            cpu_baseline=rng.uniform(3.0, 45.0),
        )


class TelemetryModel:
    """A random walk around a profile; :meth:`sample` is the next ``TelemetryMessage``."""

    def __init__(self, rng: random.Random, certificate: tuple[str, datetime] | None = None) -> None:
        self._rng = rng
        self.profile = DeviceProfile.draw(rng)
        self.certificate = certificate
        self._cpu = self.profile.cpu_baseline
        self._load = self._cpu / 100 * self.profile.cores
        self._memory_share = rng.uniform(0.25, 0.7)
        self._disk_used = int(self.profile.disk_total * rng.uniform(0.15, 0.8))
        self._net_sent = rng.randrange(10**6, 10**9)
        self._net_recv = rng.randrange(10**6, 10**10)
        # Devices were booted some time before the simulator started.
        self._booted = time.monotonic() - rng.uniform(60, 30 * 86_400)

    def sample(self) -> TelemetryMessage:
        """The device's state now, one step on from the previous sample."""
        rng, profile = self._rng, self.profile
        # Mean-reverting walk with the odd spike: a busy minute, then back to normal.
        spike = rng.uniform(20, 50) if rng.random() < 0.03 else 0.0
        self._cpu = _clamp(
            self._cpu + 0.3 * (profile.cpu_baseline - self._cpu) + rng.gauss(0, 4) + spike,
            0.5,
            100.0,
        )
        # Load averages follow CPU with their 1/5/15-minute inertia.
        busy = self._cpu / 100 * profile.cores
        self._load = 0.6 * self._load + 0.4 * busy
        self._memory_share = _clamp(self._memory_share + rng.gauss(0, 0.01), 0.1, 0.95)
        memory_used = int(profile.memory_total * self._memory_share)
        self._disk_used = min(profile.disk_total, self._disk_used + rng.randrange(0, 2_000_000))
        self._net_sent += rng.randrange(2_000, 400_000)
        self._net_recv += rng.randrange(5_000, 2_000_000)
        temperature = 38.0 + 0.35 * self._cpu + rng.gauss(0, 1.0)
        return TelemetryMessage(
            cpu_percent=round(self._cpu, 1),
            load_1=round(self._load, 2),
            load_5=round(0.8 * self._load + 0.2 * busy, 2),
            load_15=round(0.9 * self._load + 0.1 * busy, 2),
            memory_percent=round(100 * self._memory_share, 1),
            memory_used_bytes=memory_used,
            memory_total_bytes=profile.memory_total,
            memory_available_bytes=profile.memory_total - memory_used,
            disk_percent=round(100 * self._disk_used / profile.disk_total, 1),
            disk_used_bytes=self._disk_used,
            disk_total_bytes=profile.disk_total,
            net_bytes_sent=self._net_sent,
            net_bytes_recv=self._net_recv,
            temperature_c=round(_clamp(temperature, -80.0, 200.0), 1),
            uptime_s=round(time.monotonic() - self._booted, 1),
            agent_version=__version__,
            architecture=profile.architecture,
            platform=profile.platform,
            runtimes=[ModelRuntime.ONNX],
            cert_serial=self.certificate[0] if self.certificate else None,
            cert_not_after=self.certificate[1] if self.certificate else None,
        )


class ResultModel:
    """Detections of a simulated camera model, as scheduled inference reports them."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._frame = rng.randrange(0, 100_000)
        # Each device's model runs at its own speed (a Pi 4 is slower than an x86 box).
        self._latency_ms = rng.uniform(15.0, 120.0)

    def sample(self) -> ResultMessage:
        """One inference result with a label, its confidence and per-label scores."""
        rng = self._rng
        self._frame += rng.randrange(1, 300)
        label = rng.choices(_LABELS, weights=_LABEL_WEIGHTS)[0]
        confidence = rng.uniform(0.55, 0.99)
        rest = (1 - confidence) / (len(_LABELS) - 1)
        scores = {name: round(confidence if name == label else rest, 4) for name in _LABELS}
        return ResultMessage(
            model=_MODEL,
            version=_MODEL_VERSION,
            release=1,
            sha256=_MODEL_SHA256,
            runtime=ModelRuntime.ONNX,
            source=ResultSource.SCHEDULE,
            input_ref=f"camera-0/frame-{self._frame:06d}.jpg",
            latency_ms=round(max(1.0, rng.gauss(self._latency_ms, self._latency_ms / 8)), 2),
            label=label,
            confidence=round(confidence, 4),
            scores=scores,
        )
