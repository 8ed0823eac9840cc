"""Open Inference Protocol (KServe v2) routes for ONNX and TFLite: health, metadata, infer."""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from device_agent import __version__
from device_agent.inference import (
    InferenceFailure,
    ModelInfo,
    ModelNotLoadedError,
    ModelSpec,
    TensorInput,
    TensorSpec,
)
from device_agent.local_api.common import (
    ApiContext,
    ApiError,
    Stopwatch,
    error_from_failure,
    new_request_id,
    parse_body,
    read_json,
    report_failure,
    report_result,
)
from fleet_protocol import ModelRuntime

__all__ = ["DATATYPES", "kserve_routes"]

# KServe v2 tensor datatypes -> numpy dtype names. BYTES (strings) is not served: the runtimes
# here take numeric tensors only.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_DTYPE_TO_DATATYPE = {dtype: datatype for datatype, dtype in DATATYPES.items()}

# The ``platform`` field of model metadata, as KServe names these runtimes.
_PLATFORMS = {
    ModelRuntime.ONNX: "onnxruntime_onnx",
    ModelRuntime.TFLITE: "tensorflow_lite",
    ModelRuntime.GGUF: "llama_cpp_gguf",
}

# Elements in one request's tensors: 16M floats is a 64 MB tensor, far past any edge model's
# input and a guard against a shape that multiplies to something huge.
_MAX_ELEMENTS = 16 * 1024 * 1024


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _InputTensor(_Frozen):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=16)]
    datatype: str
    data: list[Any]


class _RequestedOutput(_Frozen):
    name: str


class _InferRequest(_Frozen):
    id: Annotated[str, Field(max_length=200)] | None = None
    inputs: Annotated[list[_InputTensor], Field(min_length=1, max_length=64)]
    outputs: list[_RequestedOutput] | None = None


def _tensor_metadata(tensor: TensorSpec) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "datatype": _DTYPE_TO_DATATYPE.get(tensor.dtype, tensor.dtype.upper()),
        "shape": list(tensor.shape),
    }


def _to_array(tensor: _InputTensor, expected: TensorSpec | None, model: str) -> np.ndarray:
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise ApiError(
            400,
            f"input {tensor.name!r}: datatype {tensor.datatype!r} is not served; use one of "
            f"{', '.join(DATATYPES)}",
        )
    if expected is not None and dtype != expected.dtype:
        raise ApiError(
            400,
            f"model {model!r}: input {tensor.name!r} has datatype "
            f"{_DTYPE_TO_DATATYPE.get(expected.dtype, expected.dtype)}, not {tensor.datatype}",
        )
    count = math.prod(tensor.shape)
    if count > _MAX_ELEMENTS:
        raise ApiError(400, f"input {tensor.name!r} has {count} elements, over {_MAX_ELEMENTS}")
    try:
        # Data may come flat (row-major) or nested; either way it must hold the shape's count.
        array = np.asarray(tensor.data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError) as exc:
        raise ApiError(
            400, f"input {tensor.name!r}: data is not a {tensor.datatype} array: {exc}"
        ) from exc
    if array.size != count:
        raise ApiError(
            400,
            f"input {tensor.name!r}: shape {tensor.shape} needs {count} values, data has "
            f"{array.size}",
        )
    return array.reshape(tensor.shape)


class _KserveRoutes:
    def __init__(self, context: ApiContext) -> None:
        self._context = context

    def _model(self, request: Request) -> tuple[ModelSpec, ModelInfo]:
        name = request.path_params["name"]
        spec = self._context.pool.spec(name)
        info = self._context.pool.info(name)
        if spec is None or info is None:
            raise error_from_failure(ModelNotLoadedError(name))
        return spec, info

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "edgefleet-agent", "version": __version__, "extensions": []})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        pool = self._context.pool
        ready = all(pool.is_ready(spec.name) for spec in pool.specs())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        spec, info = self._model(request)
        return JSONResponse(
            {
                "name": spec.name,
                "versions": [spec.version],
                "platform": _PLATFORMS[spec.runtime],
                "inputs": [_tensor_metadata(t) for t in info.inputs],
                "outputs": [_tensor_metadata(t) for t in info.outputs],
            }
        )

    async def model_ready(self, request: Request) -> Response:
        spec, _ = self._model(request)
        ready = self._context.pool.is_ready(spec.name)
        return JSONResponse({"name": spec.name, "ready": ready}, status_code=200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        spec, info = self._model(request)
        if spec.runtime is ModelRuntime.GGUF:
            raise ApiError(
                400,
                f"model {spec.name!r} is a GGUF language model; call the OpenAI-compatible "
                "POST /v1/chat/completions or /v1/completions instead",
            )
        body = parse_body(
            _InferRequest, await read_json(request, self._context.settings.max_body_bytes)
        )
        expected = {t.name: t for t in info.inputs}
        single = len(body.inputs) == 1 and len(info.inputs) == 1
        arrays: dict[str, np.ndarray] = {}
        for tensor in body.inputs:
            spec_of = info.inputs[0] if single else expected.get(tensor.name)
            arrays[tensor.name] = _to_array(tensor, spec_of, spec.name)
        outputs_known = {t.name for t in info.outputs}
        wanted = [o.name for o in body.outputs] if body.outputs else None
        unknown = [name for name in wanted or () if name not in outputs_known]
        if unknown:
            raise ApiError(
                400,
                f"model {spec.name!r} has no output {unknown[0]!r}; it has "
                f"{', '.join(sorted(outputs_known))}",
            )
        request_id = body.id or new_request_id("infer")
        watch = Stopwatch()
        try:
            output = await self._context.pool.infer(spec.name, TensorInput(inputs=arrays))
        except InferenceFailure as exc:
            await report_failure(self._context, spec, exc, request_id, watch.ms)
            raise error_from_failure(exc) from exc
        await report_result(self._context, spec, output, request_id)
        tensors = [
            {
                "name": name,
                "datatype": _DTYPE_TO_DATATYPE.get(array.dtype.name, array.dtype.name.upper()),
                "shape": list(array.shape),
                "data": array.reshape(-1).tolist(),
            }
            for name, array in output.tensors.items()
            if wanted is None or name in wanted
        ]
        answer: dict[str, Any] = {
            "model_name": spec.name,
            "model_version": spec.version,
            "id": request_id,
            "outputs": tensors,
        }
        if output.label is not None:
            # Not in the protocol's required fields; its ``parameters`` extension point.
            answer["parameters"] = {"label": output.label, "confidence": output.confidence}
        return JSONResponse(answer)


def kserve_routes(context: ApiContext) -> list[Route]:
    """The /v2 routes."""
    routes = _KserveRoutes(context)
    return [
        Route("/v2", routes.server_metadata, methods=["GET"]),
        Route("/v2/health/live", routes.live, methods=["GET"]),
        Route("/v2/health/ready", routes.ready, methods=["GET"]),
        Route("/v2/models/{name}", routes.model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", routes.model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", routes.infer, methods=["POST"]),
    ]
