"""The runtime interface every model kind implements, and which runtimes this device has.

A runtime module (``runtime_gguf``, ``runtime_onnx``, ``runtime_tflite``) is imported only
inside a worker process that loads such a model, so a device without llama-cpp-python (say)
still runs its ONNX models, and the agent process never holds a runtime's memory.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from device_agent.inference.errors import RuntimeUnavailableError
from device_agent.inference.inputs import InferenceInput, ProbeInput
from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.spec import ModelInfo, ModelSpec
from fleet_protocol import ModelRuntime

__all__ = [
    "RUNTIME_MODULES",
    "LoadedModel",
    "RuntimeOptions",
    "available_runtimes",
    "load_model",
]

# The Python modules each runtime needs; any one of a tuple is enough (TFLite: the successor
# ai-edge-litert first, then the older tflite-runtime).
RUNTIME_MODULES: dict[ModelRuntime, tuple[str, ...]] = {
    ModelRuntime.GGUF: ("llama_cpp",),
    ModelRuntime.ONNX: ("onnxruntime",),
    ModelRuntime.TFLITE: ("ai_edge_litert", "tflite_runtime"),
}


@dataclass(frozen=True)
class RuntimeOptions:
    """The settings a worker process needs (picklable: it crosses into the worker)."""

    threads: int
    gguf_context_tokens: int
    default_max_tokens: int


class LoadedModel(Protocol):
    """A model loaded in a worker process. Calls block; only the worker makes them."""

    @property
    def info(self) -> ModelInfo:
        """Inputs, outputs and labels, as loaded."""
        ...

    def run(self, request: InferenceInput | ProbeInput) -> InferenceOutput:
        """One inference; raises InferenceError (InvalidInputError for a bad input)."""
        ...

    def stream(self, request: InferenceInput) -> Iterator[str | InferenceOutput]:
        """Text chunks as they are generated, then the final output (GGUF only)."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


@functools.cache
def available_runtimes() -> list[ModelRuntime]:
    """The runtimes whose modules are installed here, for telemetry and constraint checks.

    Found with ``importlib.util.find_spec`` rather than imported: importing onnxruntime or
    llama.cpp into the agent process would cost it tens of MB it never uses. A runtime that is
    installed but broken still fails its load with a ModelLoadError.
    """
    return [
        runtime
        for runtime, modules in RUNTIME_MODULES.items()
        if any(importlib.util.find_spec(module) is not None for module in modules)
    ]


def load_model(spec: ModelSpec, options: RuntimeOptions) -> LoadedModel:
    """Load ``spec`` with its runtime (blocking; in the worker process). ModelLoadError."""
    if spec.runtime is ModelRuntime.GGUF:
        from device_agent.inference.runtime_gguf import GgufModel

        return GgufModel(spec, options)
    if spec.runtime is ModelRuntime.ONNX:
        from device_agent.inference.runtime_onnx import OnnxModel

        return OnnxModel(spec, options)
    if spec.runtime is ModelRuntime.TFLITE:
        from device_agent.inference.runtime_tflite import TfliteModel

        return TfliteModel(spec, options)
    raise RuntimeUnavailableError(f"model {spec.name!r} needs runtime {spec.runtime!r}, unknown")
