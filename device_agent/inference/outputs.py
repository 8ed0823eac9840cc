"""What an inference gives back, whatever the runtime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["InferenceOutput"]


@dataclass(frozen=True)
class InferenceOutput:
    """One inference's outcome. Fields a runtime does not produce stay None (or empty).

    Classifiers fill ``label``/``confidence``/``scores`` (top 10, probabilities); GGUF models
    fill ``text``/``tokens``/``tokens_per_s`` (or ``embeddings``); tensor models also return
    every output in ``tensors`` (output name -> numpy array) for KServe v2.
    """

    label: str | None = None
    confidence: float | None = None
    scores: Mapping[str, float] | None = None
    text: str | None = None
    tokens: int | None = None  # generated tokens (GGUF), or prompt tokens for embeddings
    tokens_per_s: float | None = None
    latency_ms: float = 0.0  # the worker round trip, queueing excluded
    tensors: Mapping[str, Any] = field(default_factory=dict)  # name -> numpy.ndarray
    embeddings: tuple[tuple[float, ...], ...] = ()
    prompt_tokens: int | None = None
    finish_reason: str | None = None  # "stop" or "length" (GGUF)
