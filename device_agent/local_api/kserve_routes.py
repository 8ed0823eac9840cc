"""Open Inference Protocol (KServe v2) routes for ONNX and TFLite: health, metadata, infer.

Infer takes and gives tensors as JSON lists, or as raw bytes with the binary tensor data
extension (Triton's, adopted by KServe): the body is a JSON header of the length that
``Inference-Header-Content-Length`` gives, then each binary tensor's little-endian, row-major
bytes in the order of the header's tensors, each sized by its ``parameters.binary_data_size``.
An output comes back as bytes when the request's output asks ``"binary_data": true`` or the
request's ``parameters`` say ``"binary_data_output": true``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt
from pydantic_core import PydanticCustomError
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
    OrjsonResponse,
    Stopwatch,
    dump_json,
    error_from_failure,
    new_request_id,
    parse_body,
    parse_json,
    read_body,
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

# The binary tensor data extension's header: the length of the JSON part of the body.
_HEADER_LENGTH = "Inference-Header-Content-Length"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _list_or_none(value: Any) -> Any:
    if value is not None and not isinstance(value, list):
        raise PydanticCustomError("list_type", "Input should be a valid list")
    return value


class _InputParameters(_Frozen):
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = None


class _InputTensor(_Frozen):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=16)]
    datatype: str
    # Not list[Any]: pydantic would walk and copy every element of a 100k-number tensor. Only
    # its type is checked here; numpy converts it once, in _to_array. None: sent as bytes.
    data: Annotated[Any, AfterValidator(_list_or_none)] = None
    parameters: _InputParameters | None = None


class _OutputParameters(_Frozen):
    binary_data: StrictBool | None = None


class _RequestedOutput(_Frozen):
    name: str
    parameters: _OutputParameters | None = None


class _RequestParameters(_Frozen):
    binary_data_output: StrictBool = False


class _InferRequest(_Frozen):
    id: Annotated[str, Field(max_length=200)] | None = None
    inputs: Annotated[list[_InputTensor], Field(min_length=1, max_length=64)]
    outputs: list[_RequestedOutput] | None = None
    parameters: _RequestParameters | None = None


def _tensor_metadata(tensor: TensorSpec) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "datatype": _DTYPE_TO_DATATYPE.get(tensor.dtype, tensor.dtype.upper()),
        "shape": list(tensor.shape),
    }


def _split_body(body: bytes, declared: str | None) -> tuple[memoryview, memoryview | None]:
    """The body's JSON header and the binary tensor bytes after it (None: JSON only)."""
    view = memoryview(body)
    if declared is None:
        return view, None
    if not (declared.isascii() and declared.isdigit()):
        raise ApiError(400, f"{_HEADER_LENGTH} must be a number of bytes, not {declared!r}")
    length = int(declared)
    if length > len(body):
        raise ApiError(
            400,
            f"{_HEADER_LENGTH} is {length} but the body has only {len(body)} bytes; it must be "
            "the length of the JSON header that starts the body",
        )
    return view[:length], view[length:]


def _binary_inputs(request: _InferRequest, binary: memoryview | None) -> list[memoryview | None]:
    """Each input's bytes, cut in input order from ``binary`` (None: the input is JSON)."""
    sizes = [t.parameters.binary_data_size if t.parameters else None for t in request.inputs]
    if binary is None:
        for tensor, size in zip(request.inputs, sizes, strict=True):
            if size is not None:
                raise ApiError(
                    400,
                    f"input {tensor.name!r} has parameters.binary_data_size but the request has "
                    f"no {_HEADER_LENGTH} header: send the JSON header's length in it, or the "
                    "tensor as JSON 'data'",
                )
        return [None] * len(sizes)
    total = sum(size for size in sizes if size is not None)
    if total != len(binary):
        raise ApiError(
            400,
            f"the inputs' parameters.binary_data_size add up to {total} bytes, but "
            f"{len(binary)} bytes follow the JSON header ({_HEADER_LENGTH})",
        )
    chunks: list[memoryview | None] = []
    offset = 0
    for size in sizes:
        chunks.append(None if size is None else binary[offset : offset + size])
        offset += size or 0
    return chunks


def _to_array(
    tensor: _InputTensor,
    index: int,
    chunk: memoryview | None,
    expected: TensorSpec | None,
    model: str,
) -> np.ndarray:
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
    if chunk is not None:
        if tensor.data is not None:
            raise ApiError(
                400,
                f"input {tensor.name!r} has both 'data' and parameters.binary_data_size; "
                "send the tensor one way",
            )
        return _from_bytes(tensor, chunk, np.dtype(dtype), count)
    if tensor.data is None:
        raise ApiError(
            400,
            f"inputs.{index}.data: Field required (or, with the binary tensor data extension, "
            "parameters.binary_data_size and the bytes after the JSON)",
            param=f"inputs.{index}.data",
        )
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


def _from_bytes(tensor: _InputTensor, chunk: memoryview, dtype: np.dtype, count: int) -> np.ndarray:
    wire = dtype.newbyteorder("<")
    if len(chunk) != count * wire.itemsize:
        raise ApiError(
            400,
            f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} is "
            f"{count * wire.itemsize} bytes, parameters.binary_data_size says {len(chunk)}",
        )
    if wire.kind == "b" and bytes(chunk).translate(None, b"\x00\x01"):
        raise ApiError(400, f"input {tensor.name!r}: a BOOL element must be the byte 0 or 1")
    # No copy: the array reads the request body's bytes.
    return np.frombuffer(chunk, dtype=wire).reshape(tensor.shape)


def _decode(
    raw: bytes, declared: str | None, info: ModelInfo, model: str
) -> tuple[_InferRequest, dict[str, np.ndarray]]:
    """The request's envelope and its input arrays; 400 naming what is wrong."""
    header, binary = _split_body(raw, declared)
    request = parse_body(_InferRequest, parse_json(header))
    chunks = _binary_inputs(request, binary)
    expected = {t.name: t for t in info.inputs}
    single = len(request.inputs) == 1 and len(info.inputs) == 1
    arrays: dict[str, np.ndarray] = {}
    for index, (tensor, chunk) in enumerate(zip(request.inputs, chunks, strict=True)):
        spec_of = info.inputs[0] if single else expected.get(tensor.name)
        arrays[tensor.name] = _to_array(tensor, index, chunk, spec_of, model)
    known = {t.name for t in info.outputs}
    unknown = [o.name for o in request.outputs or () if o.name not in known]
    if unknown:
        raise ApiError(
            400, f"model {model!r} has no output {unknown[0]!r}; it has {', '.join(sorted(known))}"
        )
    return request, arrays


def _outputs_to_send(request: _InferRequest, produced: Mapping[str, Any]) -> dict[str, bool]:
    """Output name -> whether it goes back as bytes, for each output asked for (default: all)."""
    default = request.parameters is not None and request.parameters.binary_data_output
    if not request.outputs:
        return dict.fromkeys(produced, default)
    return {
        output.name: default
        if output.parameters is None or output.parameters.binary_data is None
        else output.parameters.binary_data
        for output in request.outputs
    }


def _answer(
    answer: dict[str, Any], tensors: Mapping[str, np.ndarray], binary: Mapping[str, bool]
) -> Response:
    """The response: JSON, or a JSON header and the binary outputs' bytes after it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in tensors.items():
        if name not in binary:
            continue
        flat = np.ascontiguousarray(array).reshape(-1)
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": _DTYPE_TO_DATATYPE.get(flat.dtype.name, flat.dtype.name.upper()),
            "shape": list(array.shape),
        }
        # orjson writes a numeric array straight to JSON; anything else goes through tolist()
        # and as JSON even when asked as bytes (BYTES, strings, is not served as binary).
        numeric = flat.dtype.isnative and flat.dtype.name in _DTYPE_TO_DATATYPE
        if binary[name] and numeric:
            blob = flat.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = flat if numeric else flat.tolist()
        outputs.append(tensor)
    answer["outputs"] = outputs
    if not blobs:
        return OrjsonResponse(answer)
    header = dump_json(answer)
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={_HEADER_LENGTH: str(len(header))},
    )


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
        # Triton's name for the extension, as its clients look for it.
        extensions = ["binary_tensor_data"]
        return JSONResponse(
            {"name": "edgefleet-agent", "version": __version__, "extensions": extensions}
        )

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
        raw = await read_body(request, self._context.settings.max_body_bytes)
        body, arrays = _decode(raw, request.headers.get(_HEADER_LENGTH), info, spec.name)
        request_id = body.id or new_request_id("infer")
        watch = Stopwatch()
        try:
            output = await self._context.pool.infer(spec.name, TensorInput(inputs=arrays))
        except InferenceFailure as exc:
            await report_failure(self._context, spec, exc, request_id, watch.ms)
            raise error_from_failure(exc) from exc
        await report_result(self._context, spec, output, request_id)
        answer: dict[str, Any] = {
            "model_name": spec.name,
            "model_version": spec.version,
            "id": request_id,
        }
        if output.label is not None:
            # Not in the protocol's required fields; its ``parameters`` extension point.
            answer["parameters"] = {"label": output.label, "confidence": output.confidence}
        return _answer(answer, output.tensors, _outputs_to_send(body, output.tensors))


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
