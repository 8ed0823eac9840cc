"""ONNX models through onnxruntime (CPU): named tensors in, named tensors and a label out.

Imported only in a worker process; onnxruntime's exceptions are translated here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

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

__all__ = ["OnnxModel"]

# onnxruntime's tensor element types -> numpy dtype names (strings, sequences and maps are not
# served: KServe v2 and the results have no shape for them).
_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

# onnxruntime's pybind exceptions derive from Exception directly; these are the ones a bad
# model file or a bad input raise.
_ORT_ERROR_NAMES = (
    "Fail",
    "InvalidArgument",
    "NoSuchFile",
    "NoModel",
    "EngineError",
    "RuntimeException",
    "InvalidProtobuf",
    "ModelLoaded",
    "NotImplemented",
    "InvalidGraph",
    "EPFail",
)


class OnnxModel:
    """An onnxruntime session on the CPU execution provider."""

    def __init__(self, spec: ModelSpec, options: RuntimeOptions) -> None:
        try:
            import onnxruntime  # type: ignore[import-untyped]
            from onnxruntime.capi import onnxruntime_pybind11_state as ort_state  # type: ignore[import-untyped]
        except ImportError as exc:
            raise RuntimeUnavailableError(
                f"model {spec.name!r} is ONNX, but onnxruntime does not import on this device "
                f"({exc}); install edgefleet[onnx]"
            ) from exc
        self._errors: tuple[type[Exception], ...] = tuple(
            getattr(ort_state, name) for name in _ORT_ERROR_NAMES if hasattr(ort_state, name)
        )
        self._spec = spec
        session_options = onnxruntime.SessionOptions()
        session_options.intra_op_num_threads = options.threads
        # One request at a time per worker: parallel branches would only fight over the cores.
        session_options.inter_op_num_threads = 1
        session_options.log_severity_level = 3  # errors only; they reach us as exceptions
        try:
            self._session = onnxruntime.InferenceSession(
                str(spec.weights), sess_options=session_options, providers=["CPUExecutionProvider"]
            )
        except self._errors as exc:
            raise ModelLoadError(
                f"onnxruntime cannot load model {spec.name!r} from {spec.weights}: {exc}"
            ) from exc
        inputs = tuple(_tensor_spec(spec.name, node) for node in self._session.get_inputs())
        outputs = tuple(_tensor_spec(spec.name, node) for node in self._session.get_outputs())
        labels = check_labels(spec, outputs)
        self._info = ModelInfo(
            runtime=ModelRuntime.ONNX, inputs=inputs, outputs=outputs, labels=labels
        )

    @property
    def info(self) -> ModelInfo:
        """Inputs, outputs and labels."""
        return self._info

    def run(self, request: InferenceInput | ProbeInput) -> InferenceOutput:
        """Run the session on a TensorInput (or zeros, for the probe)."""
        feeds = request_feeds(self._spec.name, "an ONNX", self._info.inputs, request)
        try:
            results: list[Any] = self._session.run(None, feeds)
        except self._errors as exc:
            raise InferenceError(f"onnxruntime failed on model {self._spec.name!r}: {exc}") from exc
        tensors = {
            spec.name: np.asarray(value)
            for spec, value in zip(self._info.outputs, results, strict=True)
        }
        return tensor_output(tensors, self._info)

    def stream(self, request: InferenceInput) -> Iterator[str | InferenceOutput]:
        """Tensor models do not stream."""
        raise InvalidInputError(f"model {self._spec.name!r} is a tensor model; it cannot stream")

    def close(self) -> None:
        """Drop the session."""
        del self._session


def _tensor_spec(model: str, node: Any) -> TensorSpec:
    dtype = _ONNX_TYPES.get(node.type)
    if dtype is None:
        raise ModelLoadError(
            f"model {model!r}: tensor {node.name!r} has type {node.type}, which the agent does "
            "not serve (numeric and bool tensors only)"
        )
    shape = tuple(d if isinstance(d, int) and d > 0 else DYNAMIC for d in node.shape)
    return TensorSpec(name=node.name, dtype=dtype, shape=shape)
