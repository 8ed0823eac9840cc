"""The agent's remotely changeable settings, shared by commands, desired state and the loops."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from device_agent.config import AgentSettings
    from fleet_protocol import RuntimeConfig
    from fleet_protocol.messages import JsonScalar

__all__ = ["RuntimeState"]

logger = logging.getLogger(__name__)

# Settings objects without log_forward_level get WARNING: it forwards what an operator must see
# without shipping every INFO line over a metered link.
_DEFAULT_FORWARD_LEVEL = "WARNING"


@dataclass(slots=True)
class RuntimeState:
    """The agent's remotely changeable settings; mutated on the event loop only.

    Two ways to change them: :meth:`apply` overrides only the fields a config sets (the
    ``set-config`` command), :meth:`replace` makes the state exactly what a config says, with
    the agent's own settings where it says nothing (desired state, which must converge to the
    same result whatever came before it).
    """

    telemetry_interval_s: float
    log_level: str
    log_forward_level: str
    # Set whenever a value changes; the telemetry loop waits on it to re-read its interval and
    # clears it once it has.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The values this state started with: the agent's own settings, which replace() falls back to.
    _defaults: tuple[float, str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._defaults = (self.telemetry_interval_s, self.log_level, self.log_forward_level)

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> RuntimeState:
        """The starting values: the agent's own settings, before any remote change."""
        forward = getattr(settings, "log_forward_level", _DEFAULT_FORWARD_LEVEL)
        return cls(
            telemetry_interval_s=settings.telemetry_interval_s,
            log_level=str(settings.log_level),
            log_forward_level=str(forward),
        )

    def apply(self, config: RuntimeConfig) -> dict[str, JsonScalar]:
        """Apply the fields ``config`` sets, keep the others; return the effective config.

        ``log_level`` also sets the root logger's level, so the change takes effect at once.
        """
        return self._set(
            config.telemetry_interval_s,
            None if config.log_level is None else str(config.log_level),
            None if config.log_forward_level is None else str(config.log_forward_level),
        )

    def replace(self, config: RuntimeConfig) -> dict[str, JsonScalar]:
        """Make the state what ``config`` says, the agent's own settings where it says None."""
        interval, level, forward = self._defaults
        return self._set(
            interval if config.telemetry_interval_s is None else config.telemetry_interval_s,
            level if config.log_level is None else str(config.log_level),
            forward if config.log_forward_level is None else str(config.log_forward_level),
        )

    def effective(self) -> dict[str, JsonScalar]:
        """The values in force now, as reported in acks and on ``reported``."""
        return {
            "telemetry_interval_s": self.telemetry_interval_s,
            "log_level": self.log_level,
            "log_forward_level": self.log_forward_level,
        }

    def _set(
        self, interval: float | None, level: str | None, forward: str | None
    ) -> dict[str, JsonScalar]:
        before = self.effective()
        if interval is not None:
            self.telemetry_interval_s = float(interval)
        if level is not None and level != self.log_level:
            self.log_level = level
            logging.getLogger().setLevel(level)
        if forward is not None:
            self.log_forward_level = forward
        after = self.effective()
        if after != before:
            logger.info("runtime config changed from %s to %s", before, after)
            self.changed.set()
        return after
