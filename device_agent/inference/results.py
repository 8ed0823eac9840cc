"""Inference outcomes as ``results/{model}`` messages, with the model's provenance."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.spec import ModelSpec
from fleet_protocol import ResultMessage, ResultSource

__all__ = ["ResultSink", "failed_result", "result_message"]

# Where results go: the agent puts them into its outbox for ``devices/{id}/results/{model}``.
ResultSink = Callable[[ResultMessage], Awaitable[None]]

# ResultMessage's field limits (fleet_protocol/messages.py): longer values are cut, marked.
_MAX_TEXT = 8000
_MAX_INPUT_REF = 500
_MAX_ERROR = 2000
_ELLIPSIS = "…"


def _cut(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - len(_ELLIPSIS)] + _ELLIPSIS


def result_message(
    spec: ModelSpec,
    output: InferenceOutput,
    *,
    source: ResultSource,
    input_ref: str | None,
) -> ResultMessage:
    """The result of a successful inference. Raw input never goes in: ``input_ref`` names it."""
    return ResultMessage(
        model=spec.name,
        version=spec.version,
        release=spec.release,
        sha256=spec.sha256,
        runtime=spec.runtime,
        source=source,
        input_ref=_cut(input_ref, _MAX_INPUT_REF),
        latency_ms=max(0.0, output.latency_ms),
        label=output.label,
        confidence=output.confidence,
        scores=dict(output.scores) if output.scores is not None else None,
        text=_cut(output.text, _MAX_TEXT),
        tokens=output.tokens,
        tokens_per_s=max(0.0, output.tokens_per_s) if output.tokens_per_s is not None else None,
    )


def failed_result(
    spec: ModelSpec,
    error: str,
    *,
    source: ResultSource,
    input_ref: str | None,
    latency_ms: float,
) -> ResultMessage:
    """The result of a failed inference: counted in the model's error rate."""
    return ResultMessage(
        model=spec.name,
        version=spec.version,
        release=spec.release,
        sha256=spec.sha256,
        runtime=spec.runtime,
        source=source,
        input_ref=_cut(input_ref, _MAX_INPUT_REF),
        latency_ms=max(0.0, latency_ms),
        error=_cut(error, _MAX_ERROR) or "inference failed",
    )
