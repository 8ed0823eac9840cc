"""The inference error tree; runtime errors (llama.cpp, onnxruntime, TFLite) are translated here.

    AgentError (device_agent/errors.py)
    └── InferenceFailure              an inference or a model load did not happen as asked
        ├── ModelLoadError            the model could not be loaded (file, format, runtime, labels)
        │   └── RuntimeUnavailableError  the model's runtime is not installed on this device
        ├── ModelNotLoadedError       no model of that name is loaded here
        ├── QueueFullError            the model's queue holds ``queue_depth`` requests already
        ├── WorkerCrashedError        the model's worker process died (crash, OOM kill); restarted
        ├── InferenceError            the model ran, or would have, but the request failed
        │   ├── InvalidInputError     the input does not fit the model (shape, dtype, name, size)
        │   ├── InferenceTimeoutError  past ``request_timeout_s``; a running worker is restarted
        │   └── HealthCheckError      the probe inference after a load failed
        └── InboxFullError            the push inbox of a model is full

Every message names the model and what to do about it: the local API and command acks show
them to people as they are.
"""

from __future__ import annotations

from device_agent.errors import AgentError

__all__ = [
    "HealthCheckError",
    "InboxFullError",
    "InferenceError",
    "InferenceFailure",
    "InferenceTimeoutError",
    "InvalidInputError",
    "ModelLoadError",
    "ModelNotLoadedError",
    "QueueFullError",
    "RuntimeUnavailableError",
    "WorkerCrashedError",
]


class InferenceFailure(AgentError):  # noqa: N818 - names the whole family, not one error
    """Base of every inference error."""


class ModelLoadError(InferenceFailure):
    """The model could not be loaded; a model of the same name that was serving still serves."""


class RuntimeUnavailableError(ModelLoadError):
    """The model's runtime (llama-cpp-python, onnxruntime, ai-edge-litert) does not import."""


class ModelNotLoadedError(InferenceFailure):
    """No model of this name is loaded on the device."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no model named {name!r} is loaded on this device")
        self.name = name


class QueueFullError(InferenceFailure):
    """The model's request queue is full; try again later or raise ``queue_depth``."""

    def __init__(self, name: str, depth: int) -> None:
        super().__init__(
            f"model {name!r} already has {depth} requests waiting (inference.queue_depth); "
            "try again later"
        )
        self.name = name
        self.depth = depth


class WorkerCrashedError(InferenceFailure):
    """The worker process running the model died; the agent restarts it."""


class InferenceError(InferenceFailure):
    """The request reached the model but failed there."""


class InvalidInputError(InferenceError):
    """The input does not fit the model: wrong tensor name, shape or dtype, or not parseable."""


class InferenceTimeoutError(InferenceError):
    """The request took longer than ``inference.request_timeout_s``."""


class HealthCheckError(InferenceError):
    """The probe inference run after a load did not succeed."""


class InboxFullError(InferenceFailure):
    """The model's push inbox is full until its ``http`` schedule drains it."""

    def __init__(self, name: str, depth: int) -> None:
        super().__init__(
            f"the push inbox of model {name!r} already holds {depth} inputs "
            "(inference.push_inbox_depth); its http schedule has not drained them yet"
        )
        self.name = name
        self.depth = depth
