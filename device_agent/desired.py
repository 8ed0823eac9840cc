"""Desired state: apply each new generation once, remember it, and say what to report.

The service retains the desired state on ``devices/{id}/desired``, so the broker hands it to the
agent on every (re)connect. :class:`DesiredApplier` applies a generation only if it is newer than
the last one it handled, which it keeps in ``<state_dir>/desired.json`` together with the last
config that applied, so a restarted agent comes back with its remote config before it even
connects.

A generation's config replaces the previous one (fields it leaves None fall back to the agent's
own settings): two devices given the same desired state converge to the same config whatever
they were told before.

Its models go to a :class:`ModelDirector` (device_agent/reconcile.py), which converges to them in
the background; config and models share one ``ReportedState``: :meth:`DesiredApplier.current`
builds it from the last generation handled and the director's model reports, whenever either
changes. ``desired.json`` keeps the last good models too (0600: an encrypted release's key is
among them), so a restarted agent serves and converges before it connects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_agent.durable import write_atomically
from device_agent.runtime import RuntimeState
from fleet_protocol import (
    DesiredState,
    MalformedPayloadError,
    ModelAssignment,
    ModelReport,
    ReportedState,
    RuntimeConfig,
    decode,
)

__all__ = ["DESIRED_FILE", "DesiredApplier", "ModelDirector"]

logger = logging.getLogger(__name__)

DESIRED_FILE = "desired.json"

# ReportedState caps its detail; longer validation messages are cut to fit.
_MAX_DETAIL = 2000


class ModelDirector(Protocol):
    """What converges the device's models to the desired ones (device_agent/reconcile.py)."""

    def assign(self, assignments: Sequence[ModelAssignment]) -> None:
        """The models the device should run now; the director converges in the background."""

    def reports(self) -> dict[str, ModelReport]:
        """Each desired model's state, for the reported state."""


class _Handled(BaseModel):
    """The contents of ``desired.json``: the last generation handled and the last good config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: Annotated[int, Field(ge=0)]
    applied: bool
    detail: str | None = None
    # The config of the newest generation that applied; None until one has.
    config: RuntimeConfig | None = None
    # The models of the newest generation that applied; None until one has.
    models: list[ModelAssignment] | None = None


class DesiredApplier:
    """Applies desired-state payloads to the runtime; returns what to publish on ``reported``."""

    def __init__(
        self, state_dir: Path, runtime: RuntimeState, models: ModelDirector | None = None
    ) -> None:
        self._path = state_dir / DESIRED_FILE
        self._runtime = runtime
        self._models = models
        self._handled = self._load()
        # The first desired state after a start is reported even when already handled, so the
        # service hears from a device that restarted (its runtime config may differ now).
        self._reported_since_start = False
        if self._handled is not None and self._handled.config is not None:
            effective = runtime.replace(self._handled.config)
            logger.info(
                "restored desired config generation=%d config=%s",
                self._handled.generation,
                effective,
            )
        if models is not None and self._handled is not None and self._handled.models is not None:
            models.assign(self._handled.models)

    @property
    def generation(self) -> int | None:
        """The last generation handled (applied or not), or None if none ever was."""
        return None if self._handled is None else self._handled.generation

    def close(self) -> None:
        """Nothing stays open between calls; here so the agent treats every helper alike."""

    def current(self) -> ReportedState | None:
        """The report of the last generation handled with the models as they are now.

        None before any desired state was handled: there is no generation to report on.
        """
        handled = self._handled
        if handled is None:
            return None
        return self._report(handled.generation, handled.applied, handled.detail)

    def apply(self, payload: bytes) -> ReportedState | None:
        """Apply a desired-state payload; the ReportedState to publish, or None for nothing."""
        try:
            desired = decode(DesiredState, payload)
        except MalformedPayloadError as exc:
            generation = _readable_generation(payload)
            if generation is None:
                logger.warning("ignored a desired state with no usable generation: %s", exc)
                return None
            if self._already_handled(generation):
                return self._rereport()
            detail = _cut(f"cannot apply generation {generation}: {exc}")
            logger.warning("desired state not applied: %s", detail)
            self._save(_Handled(generation=generation, applied=False, detail=detail, config=None))
            return self._report(generation, False, detail)

        if self._already_handled(desired.generation):
            return self._rereport()
        effective = self._runtime.replace(desired.config)
        self._save(
            _Handled(
                generation=desired.generation,
                applied=True,
                config=desired.config,
                models=desired.models,
            )
        )
        if self._models is not None:
            self._models.assign(desired.models)
        logger.info(
            "applied desired generation=%d config=%s models=%s",
            desired.generation,
            effective,
            [m.name for m in desired.models],
        )
        return self._report(desired.generation, True, None)

    def _report(self, generation: int, applied: bool, detail: str | None) -> ReportedState:
        return ReportedState(
            generation=generation,
            applied=applied,
            detail=detail,
            config=self._runtime.effective(),
            models={} if self._models is None else self._models.reports(),
        )

    def _already_handled(self, generation: int) -> bool:
        if self._handled is None or generation > self._handled.generation:
            return False
        logger.debug(
            "desired generation %d is not newer than %d; already converged",
            generation,
            self._handled.generation,
        )
        return True

    def _rereport(self) -> ReportedState | None:
        """The current generation's report on the first call since start, else None."""
        handled = self._handled
        if self._reported_since_start or handled is None:
            return None
        self._reported_since_start = True
        return self._report(handled.generation, handled.applied, handled.detail)

    def _save(self, handled: _Handled) -> None:
        if handled.config is None and self._handled is not None:
            # A generation that failed keeps the last good config and models for the next restart.
            handled = handled.model_copy(
                update={"config": self._handled.config, "models": self._handled.models}
            )
        write_atomically(self._path, handled.model_dump_json(indent=2).encode() + b"\n")
        self._handled = handled
        self._reported_since_start = True

    def _load(self) -> _Handled | None:
        try:
            return _Handled.model_validate_json(self._path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            # Nothing is lost: the broker retains the desired state and redelivers it on
            # connect, where it applies as new.
            logger.warning(
                "ignoring unreadable %s (%s); the next desired state will be applied as new",
                self._path,
                exc,
            )
            return None


def _readable_generation(payload: bytes) -> int | None:
    """The ``generation`` of a desired state that failed validation, if it is a usable one."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):  # a deeply nested payload overflows the parser
        return None
    if not isinstance(document, dict):
        return None
    generation = document.get("generation")
    # bool is an int in Python, but `"generation": true` is not a generation.
    if isinstance(generation, int) and not isinstance(generation, bool) and generation >= 0:
        return generation
    return None


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."
