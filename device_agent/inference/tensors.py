"""Fitting request tensors to a model's inputs: names, dtypes and shapes, checked before running."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from device_agent.inference.errors import InvalidInputError
from device_agent.inference.inputs import InferenceInput, ProbeInput, TensorInput
from device_agent.inference.spec import DYNAMIC, TensorSpec

__all__ = ["coerce_inputs", "probe_inputs", "request_feeds"]


def request_feeds(
    model: str, kind: str, specs: Sequence[TensorSpec], request: InferenceInput | ProbeInput
) -> dict[str, NDArray[Any]]:
    """What a tensor runtime (``kind``: "an ONNX", "a TFLite") feeds its model for ``request``:
    zeros for the health probe, the given tensors coerced, or InvalidInputError for text."""
    if isinstance(request, ProbeInput):
        return probe_inputs(specs)
    if isinstance(request, TensorInput):
        return coerce_inputs(model, specs, request.inputs)
    raise InvalidInputError(f"model {model!r} is {kind} tensor model: it takes tensors, not text")


def coerce_inputs(
    model: str, specs: Sequence[TensorSpec], given: Mapping[str, Any]
) -> dict[str, NDArray[Any]]:
    """``given`` as contiguous arrays of the model's dtypes, keyed by its input names.

    Raises :class:`InvalidInputError` naming the input and what it should be.
    """
    if len(given) == 1 and len(specs) == 1:
        named = {specs[0].name: next(iter(given.values()))}
    else:
        expected = {spec.name for spec in specs}
        unknown = sorted(set(given) - expected)
        missing = sorted(expected - set(given))
        if unknown or missing:
            wanted = ", ".join(spec.describe() for spec in specs)
            problems = [f"unknown input {name!r}" for name in unknown]
            problems += [f"missing input {name!r}" for name in missing]
            raise InvalidInputError(f"model {model!r}: {'; '.join(problems)}; it takes {wanted}")
        named = dict(given)
    return {spec.name: _coerce(model, spec, named[spec.name]) for spec in specs}


def _coerce(model: str, spec: TensorSpec, value: Any) -> NDArray[Any]:
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InvalidInputError(
            f"model {model!r}: input {spec.name!r} is not a rectangular array: {exc}"
        ) from exc
    expected = np.dtype(spec.dtype)
    if array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, expected, "same_kind"):
        raise InvalidInputError(
            f"model {model!r}: input {spec.name!r} must be {spec.dtype}, got {array.dtype} values"
        )
    if array.ndim == len(spec.shape) - 1 and spec.shape and spec.shape[0] in (DYNAMIC, 1):
        array = array[np.newaxis, ...]
    fits = array.ndim == len(spec.shape) and all(
        want in (DYNAMIC, got) for want, got in zip(spec.shape, array.shape, strict=True)
    )
    if not fits or array.size == 0:
        raise InvalidInputError(
            f"model {model!r}: input {spec.name!r} must have shape "
            f"[{', '.join(str(d) for d in spec.shape)}] (-1: any size), got "
            f"[{', '.join(str(d) for d in array.shape)}]"
        )
    return np.ascontiguousarray(array, dtype=expected)


def probe_inputs(specs: Sequence[TensorSpec]) -> dict[str, NDArray[Any]]:
    """Zeros of every input's shape, dynamic dimensions as 1: the health check's input."""
    return {
        spec.name: np.zeros(tuple(1 if d == DYNAMIC else d for d in spec.shape), spec.dtype)
        for spec in specs
    }
