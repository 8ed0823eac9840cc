"""Classifier post-processing: labels file, probabilities, the winning label and the top 10."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from device_agent.inference.errors import InferenceError, ModelLoadError
from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.spec import DYNAMIC, ModelInfo, ModelSpec, TensorSpec

__all__ = [
    "TOP_SCORES",
    "Classification",
    "check_labels",
    "classify",
    "load_labels",
    "tensor_output",
    "to_probabilities",
]

# Scores reported per result: enough to see the runner-up classes, small enough for MQTT and
# the results table (ResultMessage allows 100).
TOP_SCORES = 10

# ResultMessage.label allows 200 characters; a longer "label" is a wrong file, not a label.
_MAX_LABEL_CHARS = 200
# A vector within this of summing to 1, with every entry in [0, 1], is taken as probabilities
# already (a Softmax output); float32 rounding over a thousand classes stays well inside it.
_PROBABILITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Classification:
    """The winning class, its probability, and the best ``TOP_SCORES`` classes by name."""

    label: str
    confidence: float
    scores: dict[str, float]


def load_labels(path: Path) -> tuple[str, ...]:
    """Read a labels file: line ``i`` names class ``i``; trailing blank lines are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the labels file {path}: {exc}") from exc
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ModelLoadError(f"the labels file {path} names no class")
    too_long = next((label for label in labels if len(label) > _MAX_LABEL_CHARS), None)
    if too_long is not None:
        raise ModelLoadError(
            f"the labels file {path} has a label of {len(too_long)} characters (at most "
            f"{_MAX_LABEL_CHARS}); is it really one label per line?"
        )
    return tuple(labels)


def to_probabilities(scores: NDArray[np.float64]) -> NDArray[np.float64]:
    """``scores`` if they already are probabilities, else their softmax."""
    total = float(scores.sum())
    if scores.min() >= 0 and scores.max() <= 1 and abs(total - 1) <= _PROBABILITY_TOLERANCE:
        return scores
    shifted = np.exp(scores - scores.max())
    return np.asarray(shifted / shifted.sum(), dtype=np.float64)


def classify(output: NDArray[np.generic], labels: Sequence[str]) -> Classification | None:
    """The classification of one output tensor, or None if it is not a class-score vector.

    A vector ``[K]`` or a batch of one ``[1, K]`` with K >= 2 is one; a batch of several, or
    anything else, is not (its tensors are still returned as they are). Without labels the class
    index is the label.
    """
    vector = output[0] if output.ndim == 2 and output.shape[0] == 1 else output
    if vector.ndim != 1 or vector.shape[0] < 2 or vector.dtype.kind not in "fiu":
        return None
    values = vector.astype(np.float64)
    if not np.isfinite(values).all():
        raise InferenceError("the model produced non-finite scores (NaN or infinity)")
    probabilities = to_probabilities(values)
    names = [labels[i] if i < len(labels) else str(i) for i in range(values.shape[0])]
    order = np.argsort(-probabilities, kind="stable")
    best = int(order[0])
    scores = {names[int(i)]: float(probabilities[int(i)]) for i in order[:TOP_SCORES]}
    confidence = min(1.0, max(0.0, float(probabilities[best])))
    return Classification(label=names[best], confidence=confidence, scores=scores)


def check_labels(spec: ModelSpec, outputs: Sequence[TensorSpec]) -> tuple[str, ...]:
    """The release's labels, refused (ModelLoadError) if they cannot name the model's classes."""
    if spec.labels is None:
        return ()
    labels = load_labels(spec.labels)
    classes = outputs[0].shape[-1] if outputs and outputs[0].shape else DYNAMIC
    if classes != DYNAMIC and classes != len(labels):
        raise ModelLoadError(
            f"model {spec.name!r}: its labels file {spec.labels.name} names {len(labels)} "
            f"classes but its output {outputs[0].name!r} has {classes}; ship the labels file "
            "that was made with these weights"
        )
    return labels


def tensor_output(
    tensors: Mapping[str, NDArray[Any]],
    info: ModelInfo,
    *,
    scores: NDArray[Any] | None = None,
) -> InferenceOutput:
    """The output of a tensor model: every tensor, and a classification of the first one.

    ``scores`` replaces the first output for classifying (a dequantized copy, for TFLite).
    """
    first = scores if scores is not None else next(iter(tensors.values()), None)
    found = classify(first, info.labels) if first is not None else None
    if found is None:
        return InferenceOutput(tensors=dict(tensors))
    return InferenceOutput(
        label=found.label, confidence=found.confidence, scores=found.scores, tensors=dict(tensors)
    )
