"""Inference on the device: GGUF, ONNX and TFLite models, each in its own worker process.

spec.py          ModelSpec (an installed release), ModelInfo/TensorSpec (what it takes)
inputs.py        TextInput, ChatInput, TensorInput, EmbeddingInput; parse_command_input
outputs.py       InferenceOutput
runtime.py       the LoadedModel interface, RuntimeOptions, available_runtimes()
runtime_gguf.py  llama-cpp-python      (imported only inside a worker)
runtime_onnx.py  onnxruntime           (imported only inside a worker)
runtime_tflite.py  ai-edge-litert / tflite-runtime (imported only inside a worker)
tensors.py       fitting request tensors to a model's inputs
postprocess.py   labels file, softmax, label/confidence/top-10 scores
worker.py        the worker process and the agent's handle on it
pool.py          ModelPool: load/swap, bounded queues, timeouts, restarts
results.py       ResultMessage with provenance; ResultSink
inbox.py         PushInbox for ``http`` schedules
errors.py        the error tree
"""

from __future__ import annotations

from device_agent.inference.errors import (
    HealthCheckError,
    InboxFullError,
    InferenceError,
    InferenceFailure,
    InferenceTimeoutError,
    InvalidInputError,
    ModelLoadError,
    ModelNotLoadedError,
    QueueFullError,
    RuntimeUnavailableError,
    WorkerCrashedError,
)
from device_agent.inference.inbox import PushedInput, PushInbox
from device_agent.inference.inputs import (
    ChatInput,
    ChatMessage,
    EmbeddingInput,
    InferenceInput,
    TensorInput,
    TextInput,
    parse_command_input,
)
from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.pool import ModelPool
from device_agent.inference.results import ResultSink, failed_result, result_message
from device_agent.inference.runtime import available_runtimes
from device_agent.inference.spec import ModelInfo, ModelSpec, TensorSpec

__all__ = [
    "ChatInput",
    "ChatMessage",
    "EmbeddingInput",
    "HealthCheckError",
    "InboxFullError",
    "InferenceError",
    "InferenceFailure",
    "InferenceInput",
    "InferenceOutput",
    "InferenceTimeoutError",
    "InvalidInputError",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotLoadedError",
    "ModelPool",
    "ModelSpec",
    "PushInbox",
    "PushedInput",
    "QueueFullError",
    "ResultSink",
    "RuntimeUnavailableError",
    "TensorInput",
    "TensorSpec",
    "TextInput",
    "WorkerCrashedError",
    "available_runtimes",
    "failed_result",
    "parse_command_input",
    "result_message",
]
