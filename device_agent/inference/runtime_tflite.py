"""TFLite models through ai-edge-litert (or the older tflite-runtime): tensors in and out.

Imported only in a worker process. Quantized outputs are dequantized for the classification;
the raw tensors are returned as the model produced them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from device_agent.inference.errors import (
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    RuntimeUnavailableError,
)
from device_agent.inference.inputs import InferenceInput, ProbeInput
from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.postprocess import check_labels, tensor_output
from device_agent.inference.runtime import RuntimeOptions
from device_agent.inference.spec import DYNAMIC, ModelInfo, ModelSpec, TensorSpec
from device_agent.inference.tensors import request_feeds
from fleet_protocol import ModelRuntime

__all__ = ["TfliteModel", "import_interpreter"]


def import_interpreter() -> Any:
    """The ``Interpreter`` class of ai-edge-litert, else of tflite-runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-untyped]
    except ImportError:
        try:
            from tflite_runtime.interpreter import (  # type: ignore[import-not-found,unused-ignore]
                Interpreter,
            )
        except ImportError as exc:
            raise RuntimeUnavailableError(
                "neither ai-edge-litert nor tflite-runtime imports on this device "
                f"({exc}); install edgefleet[tflite]"
            ) from exc
    return Interpreter


class TfliteModel:
    """A TFLite interpreter; a dynamic batch is resized to each request's."""

    def __init__(self, spec: ModelSpec, options: RuntimeOptions) -> None:
        interpreter_class = import_interpreter()
        self._spec = spec
        try:
            self._interpreter = interpreter_class(
                model_path=str(spec.weights), num_threads=options.threads
            )
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"the TFLite interpreter cannot load model {spec.name!r} from {spec.weights}: {exc}"
            ) from exc
        self._input_details: list[dict[str, Any]] = self._interpreter.get_input_details()
        self._output_details: list[dict[str, Any]] = self._interpreter.get_output_details()
        inputs = tuple(_tensor_spec(detail) for detail in self._input_details)
        outputs = tuple(_tensor_spec(detail) for detail in self._output_details)
        self._info = ModelInfo(
            runtime=ModelRuntime.TFLITE,
            inputs=inputs,
            outputs=outputs,
            labels=check_labels(spec, outputs),
        )

    @property
    def info(self) -> ModelInfo:
        """Inputs, outputs and labels."""
        return self._info

    def run(self, request: InferenceInput | ProbeInput) -> InferenceOutput:
        """Set the inputs (resizing a dynamic batch), invoke, read every output."""
        feeds = request_feeds(self._spec.name, "a TFLite", self._info.inputs, request)
        try:
            self._set_inputs(feeds)
            self._interpreter.invoke()
            tensors = {
                detail["name"]: np.array(self._interpreter.get_tensor(detail["index"]))
                for detail in self._output_details
            }
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(
                f"the TFLite interpreter failed on model {self._spec.name!r}: {exc}"
            ) from exc
        first = self._output_details[0]
        scores = _dequantize(tensors[first["name"]], first)
        return tensor_output(tensors, self._info, scores=scores)

    def _set_inputs(self, feeds: dict[str, NDArray[Any]]) -> None:
        resized = False
        for detail in self._input_details:
            array = feeds[detail["name"]]
            if tuple(detail["shape"]) != array.shape:
                self._interpreter.resize_tensor_input(detail["index"], list(array.shape))
                resized = True
        if resized:
            self._interpreter.allocate_tensors()
            self._input_details = self._interpreter.get_input_details()
            self._output_details = self._interpreter.get_output_details()
        for detail in self._input_details:
            self._interpreter.set_tensor(detail["index"], feeds[detail["name"]])

    def stream(self, request: InferenceInput) -> Iterator[str | InferenceOutput]:
        """Tensor models do not stream."""
        raise InvalidInputError(f"model {self._spec.name!r} is a tensor model; it cannot stream")

    def close(self) -> None:
        """Drop the interpreter."""
        del self._interpreter


def _tensor_spec(detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(
        name=str(detail["name"]),
        dtype=np.dtype(detail["dtype"]).name,
        shape=tuple(DYNAMIC if int(d) < 0 else int(d) for d in shape),
    )


def _dequantize(tensor: NDArray[Any], detail: dict[str, Any]) -> NDArray[Any]:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if tensor.dtype.kind in "iu" and scale:
        return np.asarray((tensor.astype(np.float64) - zero_point) * scale)
    return tensor
