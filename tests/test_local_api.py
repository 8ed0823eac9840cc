"""The local API over real HTTP: the real ``openai`` client for GGUF, httpx for KServe v2 (JSON
and binary tensors), the API key, and a clear status for every bad request."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime  # type: ignore[import-untyped]
import openai
import pytest
from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-untyped]

from device_agent.config import InferenceSettings, LocalApiSettings
from device_agent.inference import ModelPool, ModelSpec, PushInbox
from device_agent.local_api import LocalApi, LocalApiError
from fleet_protocol import ResultMessage, ResultSource
from tests.fixtures.models import (
    CIFAR10_LABELS,
    build_onnx_classifier,
    build_tflite_classifier,
    model_spec,
    smollm2_path,
    write_labels,
)

pytestmark = pytest.mark.timeout(120)

API_KEY = "test-local-api-key-0123456789"


@dataclass
class Served:
    url: str
    pool: ModelPool
    inbox: PushInbox
    results: list[ResultMessage]
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def openai(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        """The real OpenAI client on this API (closed when the test ends); no retries."""
        made = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)
        self.clients.append(made)
        return made


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    build_onnx_classifier(directory / "classifier.onnx")
    build_tflite_classifier(directory / "classifier.tflite")
    write_labels(directory / "labels.txt")
    return directory


def onnx_spec(models_dir: Path) -> ModelSpec:
    return model_spec(
        "cifar", "onnx", models_dir / "classifier.onnx", labels=models_dir / "labels.txt"
    )


def tflite_spec(models_dir: Path) -> ModelSpec:
    return model_spec(
        "cifar-lite", "tflite", models_dir / "classifier.tflite", labels=models_dir / "labels.txt"
    )


def gguf_spec() -> ModelSpec:
    return model_spec("smollm2", "gguf", smollm2_path())


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a pool with the given models and a LocalApi on a free port, in this loop."""
    started: list[tuple[Served, asyncio.Task[None]]] = []

    async def start(
        *specs: ModelSpec,
        api: dict[str, Any] | None = None,
        inference: dict[str, Any] | None = None,
        inbox_depth: int = 4,
    ) -> Served:
        pool = ModelPool(
            InferenceSettings.model_validate(
                {"threads": 2, "gguf_context_tokens": 512, **(inference or {})}
            )
        )
        for spec in specs:
            await pool.load(spec)
        results: list[ResultMessage] = []

        async def sink(message: ResultMessage) -> None:
            results.append(message)

        inbox = PushInbox(inbox_depth)
        local = LocalApi(
            pool, inbox, sink, LocalApiSettings.model_validate({"port": 0, **(api or {})})
        )
        task = asyncio.create_task(local.serve(), name="local-api")
        async with asyncio.timeout(10):
            await local.started.wait()
        served = Served(url=local.url, pool=pool, inbox=inbox, results=results)
        started.append((served, task))
        return served

    yield start
    for served, task in started:
        for made in served.clients:
            await made.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await served.pool.aclose()


def v2_body(pixels: np.ndarray, name: str = "image", datatype: str = "FP32") -> dict[str, Any]:
    return {
        "id": "req-1",
        "inputs": [
            {
                "name": name,
                "shape": list(pixels.shape),
                "datatype": datatype,
                "data": pixels.reshape(-1).tolist(),
            }
        ],
    }


BINARY_HEADER = "Inference-Header-Content-Length"


def binary_input(
    tensor: np.ndarray, name: str = "image", datatype: str = "FP32", size: int | None = None
) -> dict[str, Any]:
    """An input whose bytes follow the JSON header (binary tensor data extension)."""
    return {
        "name": name,
        "shape": list(tensor.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": tensor.nbytes if size is None else size},
    }


def binary_request(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a binary extension request: the JSON header, then the bytes."""
    encoded = json.dumps(header).encode()
    headers = {BINARY_HEADER: str(len(encoded)), "Content-Type": "application/octet-stream"}
    return encoded + b"".join(tensors), headers


def binary_answer(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    """A binary extension answer split into its JSON header and the bytes after it."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers[BINARY_HEADER])
    header: dict[str, Any] = json.loads(response.content[:length])
    return header, response.content[length:]


async def test_openai_client_lists_chats_completes_and_embeds_with_the_gguf_model(
    serve: Serve, models_dir: Path
) -> None:
    served = await serve(gguf_spec(), onnx_spec(models_dir))
    api = served.openai()

    models = await api.models.list()
    assert [m.id for m in models.data] == ["smollm2"]  # tensor models are on /v2

    chat = await api.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    text = chat.choices[0].message.content
    assert text
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8
    assert chat.choices[0].finish_reason in ("stop", "length")

    completion = await api.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 4

    # The client asks for base64 by default and decodes it.
    embedded = await api.embeddings.create(model="smollm2", input=["hello", "world"])
    assert [len(e.embedding) for e in embedded.data] == [576, 576]
    assert math.sqrt(sum(v * v for v in embedded.data[0].embedding)) == pytest.approx(1, rel=1e-5)
    as_floats = await api.embeddings.create(model="smollm2", input="hello", encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(embedded.data[0].embedding, rel=1e-5)

    # Every inference went to the results stream, the request id standing for the input.
    assert [r.source for r in served.results] == [ResultSource.API] * 4
    chat_result = served.results[0]
    assert chat_result.input_ref == chat.id
    assert chat_result.text == text and chat_result.tokens == chat.usage.completion_tokens
    assert chat_result.tokens_per_s is not None and chat_result.tokens_per_s > 0
    assert chat_result.sha256 == gguf_spec().sha256


async def test_streaming_chat_arrives_as_sse_chunks_ending_in_done(serve: Serve) -> None:
    served = await serve(gguf_spec())
    stream = await served.openai().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish: str | None = None
    usage_tokens = 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces)
    assert finish in ("stop", "length")
    assert 0 < usage_tokens <= 10
    assert served.results[0].text == "".join(pieces)

    async with (
        httpx.AsyncClient(base_url=served.url) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
                "stream": True,
            },
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


async def test_kserve_v2_infer_matches_the_runtimes_called_directly(
    serve: Serve, models_dir: Path
) -> None:
    served = await serve(onnx_spec(models_dir), tflite_spec(models_dir))
    pixels = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    direct = onnxruntime.InferenceSession(
        str(models_dir / "classifier.onnx"), providers=["CPUExecutionProvider"]
    ).run(None, {"image": pixels})[0]
    nhwc = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))
    interpreter = Interpreter(model_path=str(models_dir / "classifier.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], nhwc)
    interpreter.invoke()
    direct_lite = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    async with httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/v2/health/live")).json() == {"live": True}
        assert (await http.get("/v2/health/ready")).status_code == 200
        assert (await http.get("/v2/models/cifar/ready")).json() == {"name": "cifar", "ready": True}
        metadata = (await http.get("/v2/models/cifar")).json()
        assert metadata["platform"] == "onnxruntime_onnx"
        assert metadata["inputs"] == [
            {"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
        ]

        for name, tensor, reference in (
            ("cifar", pixels, direct),
            ("cifar-lite", nhwc, direct_lite),
        ):
            response = await http.post(f"/v2/models/{name}/infer", json=v2_body(tensor))
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_name"] == name and body["id"] == "req-1"
            output = body["outputs"][0]
            assert (output["name"], output["datatype"], output["shape"]) == (
                "probabilities",
                "FP32",
                [1, 10],
            )
            np.testing.assert_allclose(output["data"], reference.reshape(-1), rtol=1e-5)
            best = int(np.argmax(reference))
            assert body["parameters"]["label"] == CIFAR10_LABELS[best]
            assert body["parameters"]["confidence"] == pytest.approx(float(reference[0, best]))

    assert [(r.model, r.input_ref, r.label) for r in served.results] == [
        ("cifar", "req-1", CIFAR10_LABELS[int(np.argmax(direct))]),
        ("cifar-lite", "req-1", CIFAR10_LABELS[int(np.argmax(direct_lite))]),
    ]


async def test_binary_tensors_in_and_out_carry_the_same_numbers_as_json(
    serve: Serve, models_dir: Path
) -> None:
    served = await serve(onnx_spec(models_dir))
    pixels = np.random.default_rng(2).random((4, 3, 32, 32), dtype=np.float32)
    infer = "/v2/models/cifar/infer"
    async with httpx.AsyncClient(base_url=served.url) as http:
        assert "binary_tensor_data" in (await http.get("/v2")).json()["extensions"]

        as_json = await http.post(infer, json=v2_body(pixels))
        assert as_json.status_code == 200, as_json.text
        assert as_json.headers["content-type"] == "application/json"
        json_output = as_json.json()["outputs"][0]
        reference = np.asarray(json_output["data"], np.float32).reshape(json_output["shape"])
        assert reference.shape == (4, 10)

        # Bytes in, JSON out: the same input array, so the same numbers exactly.
        content, headers = binary_request(
            {"id": "bin-in", "inputs": [binary_input(pixels)]}, pixels.tobytes()
        )
        answer = await http.post(infer, content=content, headers=headers)
        assert answer.status_code == 200, answer.text
        assert BINARY_HEADER.lower() not in answer.headers
        output = answer.json()["outputs"][0]
        assert (output["name"], output["datatype"], output["shape"]) == (
            "probabilities",
            "FP32",
            [4, 10],
        )
        np.testing.assert_array_equal(np.asarray(output["data"], np.float32), reference.ravel())

        # Bytes in, bytes out, asked for by output and then for the whole request.
        for asked in (
            {"outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]},
            {"parameters": {"binary_data_output": True}},
        ):
            content, headers = binary_request(
                {"id": "bin-out", "inputs": [binary_input(pixels)], **asked}, pixels.tobytes()
            )
            header, data = binary_answer(await http.post(infer, content=content, headers=headers))
            assert header["id"] == "bin-out"
            (described,) = header["outputs"]
            assert "data" not in described
            assert described["parameters"] == {"binary_data_size": 4 * 10 * 4}
            assert (described["datatype"], described["shape"]) == ("FP32", [4, 10])
            assert len(data) == 4 * 10 * 4
            np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(4, 10), reference)

        # JSON in, bytes out; an output's own "binary_data": false wins over the request's.
        body = v2_body(pixels) | {"parameters": {"binary_data_output": True}}
        header, data = binary_answer(await http.post(infer, json=body))
        np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(4, 10), reference)
        body["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": False}}]
        overridden = await http.post(infer, json=body)
        assert overridden.headers["content-type"] == "application/json"
        np.testing.assert_array_equal(
            np.asarray(overridden.json()["outputs"][0]["data"], np.float32), reference.ravel()
        )
    assert [r.input_ref for r in served.results] == [
        "req-1",
        "bin-in",
        "bin-out",
        "bin-out",
        "req-1",
        "req-1",
    ]


async def test_malformed_binary_requests_are_refused_with_what_is_wrong(
    serve: Serve, models_dir: Path
) -> None:
    served = await serve(onnx_spec(models_dir))
    pixels = np.zeros((1, 3, 32, 32), np.float32)
    good = pixels.tobytes()
    one_input = {"inputs": [binary_input(pixels)]}
    content, _ = binary_request(one_input, good)
    header_length = len(json.dumps(one_input).encode())
    cases: list[tuple[bytes, dict[str, str], str]] = [
        # Inference-Header-Content-Length past the end of the body.
        (content, {BINARY_HEADER: str(len(content) + 1)}, "but the body has only"),
        (content, {BINARY_HEADER: "-5"}, "must be a number of bytes, not '-5'"),
        # A header length that cuts the JSON short.
        (content, {BINARY_HEADER: str(header_length - 3)}, "not valid JSON"),
        # The sizes do not add up to what follows the JSON: bytes missing, then bytes extra.
        (*binary_request(one_input, good[:-4]), "add up to 12288 bytes, but 12284 bytes follow"),
        (*binary_request(one_input, good + b"\0"), "add up to 12288 bytes, but 12289 bytes"),
        (*binary_request(v2_body(pixels), b"\0" * 8), "add up to 0 bytes, but 8 bytes follow"),
        # A size that does not match shape x datatype, though it matches the body.
        (
            *binary_request({"inputs": [binary_input(pixels, size=6144)]}, good[:6144]),
            "shape [1, 3, 32, 32] of FP32 is 12288 bytes, parameters.binary_data_size says 6144",
        ),
        # binary_data_size on a JSON-only request (no Inference-Header-Content-Length).
        (
            json.dumps(one_input).encode(),
            {"Content-Type": "application/json"},
            "has parameters.binary_data_size but the request has no "
            "Inference-Header-Content-Length header",
        ),
        (
            *binary_request(
                {"inputs": [binary_input(pixels) | {"data": pixels.ravel().tolist()}]}, good
            ),
            "has both 'data' and parameters.binary_data_size",
        ),
        (
            *binary_request({"inputs": [binary_input(pixels, size=-1)]}),
            "inputs.0.parameters.binary_data_size: Input should be greater than or equal to 0",
        ),
        (
            *binary_request(
                {"inputs": [binary_input(pixels) | {"parameters": {"binary_data_size": "12288"}}]},
                good,
            ),
            "inputs.0.parameters.binary_data_size: Input should be a valid integer",
        ),
        (
            *binary_request(
                one_input
                | {"outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]},
                good,
            ),
            "outputs.0.parameters.binary_data: Input should be a valid boolean",
        ),
        # The JSON-side checks hold for bytes too.
        (
            *binary_request(
                {"inputs": [binary_input(pixels.astype(np.int64), datatype="INT64")]},
                pixels.astype(np.int64).tobytes(),
            ),
            "has datatype FP32, not INT64",
        ),
        (
            *binary_request(
                {"inputs": [binary_input(np.zeros((1, 3, 32, 31), np.float32))]},
                np.zeros((1, 3, 32, 31), np.float32).tobytes(),
            ),
            "must have shape [-1, 3, 32, 32]",
        ),
        (
            *binary_request(
                {"inputs": [binary_input(pixels, size=4) | {"shape": [8192, 8192]}]}, b"\0" * 4
            ),
            "has 67108864 elements, over 16777216",
        ),
    ]
    async with httpx.AsyncClient(base_url=served.url) as http:
        for content, headers, message in cases:
            response = await http.post("/v2/models/cifar/infer", content=content, headers=headers)
            assert response.status_code == 400, (message, response.text)
            assert message in response.json()["error"], (message, response.text)
        # The body that every case above spoiled one way goes through as it is.
        content, headers = binary_request(one_input, good)
        response = await http.post("/v2/models/cifar/infer", content=content, headers=headers)
        assert response.status_code == 200, response.text
    assert len(served.results) == 1


async def test_api_key_is_required_on_every_route_when_set(serve: Serve, models_dir: Path) -> None:
    served = await serve(onnx_spec(models_dir), api={"api_key": API_KEY})
    async with httpx.AsyncClient(base_url=served.url) as http:
        missing = await http.get("/v1/models")
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = await http.get("/v2/models/cifar", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and isinstance(wrong.json()["error"], str)
        right = await http.get("/v2/models/cifar", headers={"Authorization": f"Bearer {API_KEY}"})
        assert right.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        await served.openai("wrong-key").models.list()
    assert (await served.openai(API_KEY).models.list()).data == []


async def test_without_a_key_only_this_device_may_call_not_a_web_page_in_its_browser(
    serve: Serve, models_dir: Path
) -> None:
    served = await serve(onnx_spec(models_dir))
    async with httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/v2/models/cifar")).status_code == 200
        local = {"Host": "localhost:8471", "Origin": "http://127.0.0.1:3000"}
        assert (await http.get("/v2/models/cifar", headers=local)).status_code == 200
        rebound = await http.get("/v2/models/cifar", headers={"Host": "evil.example:8471"})
        assert rebound.status_code == 403 and "localhost" in rebound.json()["error"]
        cross_site = await http.post(
            "/v1/push/cifar", content=b"[[1]]", headers={"Origin": "https://evil.example"}
        )
        assert cross_site.status_code == 403
        assert cross_site.json()["error"]["code"] == "not_loopback"
    assert served.inbox.drain("cifar") == [], "the cross-site push was not taken"


async def test_bad_requests_get_clear_errors_in_each_protocols_shape(
    serve: Serve, models_dir: Path
) -> None:
    served = await serve(gguf_spec(), onnx_spec(models_dir), api={"max_body_bytes": 64 * 1024})
    api = served.openai()
    with pytest.raises(openai.NotFoundError, match="no model named 'nope'"):
        await api.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="tensor model"):
        await api.chat.completions.create(
            model="cifar", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="messages"):
        await api.chat.completions.create(model="smollm2", messages=[])

    pixels = np.zeros((1, 3, 32, 32), np.float32)
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/completions", {"model": "smollm2"}, 400, "prompt"),
        ("POST", "/v1/embeddings", {"model": "smollm2", "input": [""]}, 400, "non-empty"),
        ("POST", "/v1/chat/completions", b"x" * 70_000, 413, "larger than"),
        ("GET", "/v2/models/nope", None, 404, "no model named 'nope'"),
        ("POST", "/v2/models/nope/infer", v2_body(pixels), 404, "no model named 'nope'"),
        ("POST", "/v2/models/cifar/infer", {"inputs": []}, 400, "inputs"),
        ("POST", "/v2/models/cifar/infer", b"[1,", 400, "not valid JSON"),
        (
            "POST",
            "/v2/models/cifar/infer",
            v2_body(np.zeros((1, 3, 32, 31), np.float32)),
            400,
            "must have shape [-1, 3, 32, 32]",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            v2_body(np.zeros((1, 3, 32, 32), np.int64), datatype="INT64"),
            400,
            "has datatype FP32, not INT64",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            {
                "inputs": [
                    {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0]}
                ]
            },
            400,
            "needs 3072 values, data has 1",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
            400,
            "BYTES",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": "0.5"}]},
            400,
            "inputs.0.data: Input should be a valid list",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32"}]},
            400,
            "inputs.0.data: Field required",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            {"inputs": [{"name": "image", "shape": [2, 2], "datatype": "FP32", "data": [[1], 2]}]},
            400,
            "data is not a FP32 array",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            {"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": ["a"]}]},
            400,
            "data is not a FP32 array",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            {"inputs": [{"name": "image", "shape": [8192, 8192], "datatype": "FP32", "data": []}]},
            400,
            "has 67108864 elements, over 16777216",
        ),
        (
            "POST",
            "/v2/models/cifar/infer",
            v2_body(pixels) | {"outputs": [{"name": "logits"}]},
            400,
            "has no output 'logits'; it has probabilities",
        ),
        ("POST", "/v2/models/smollm2/infer", v2_body(pixels), 400, "GGUF language model"),
        ("GET", "/v3/nothing", None, 404, "Not Found"),
    ]
    async with httpx.AsyncClient(base_url=served.url) as http:
        for method, path, body, status, message in cases:
            if isinstance(body, bytes):
                response = await http.request(method, path, content=body)
            else:
                response = await http.request(method, path, json=body)
            assert response.status_code == status, (path, response.text)
            error = response.json()["error"]
            text = error if path.startswith("/v2") else error["message"]
            assert message in text, (path, text)
    # Refused requests are the caller's, not the model's: none counts as a failed result.
    assert served.results == []


async def test_full_queue_is_429_and_a_crashed_worker_is_503(serve: Serve) -> None:
    served = await serve(
        gguf_spec(),
        inference={
            "queue_depth": 0,
            # The restart is drawn from [0, 600] s: practically never within this test.
            "restart_min_s": 600,
            "restart_max_s": 600,
            # Long enough that the worker ends by the SIGKILL below, not by this timeout, even on
            # a loaded machine; short, since the last request waits this long for the worker
            # before its 503.
            "request_timeout_s": 10,
        },
    )
    api = served.openai()
    long_chat = await api.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Write a long story about the sea."}],
        max_tokens=300,
        stream=True,
    )
    async with long_chat:
        async for _ in long_chat:
            break  # the model is now busy with it
        with pytest.raises(openai.RateLimitError, match="already has 0 requests waiting"):
            await api.completions.create(model="smollm2", prompt="Hi", max_tokens=1)

        pid = served.pool.worker_pid("smollm2")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="ended during the request"):
            async for _ in long_chat:
                pass
    # The restart waits minutes here, so the next request finds the worker down: 503.
    with pytest.raises(openai.InternalServerError) as raised:
        await api.completions.create(model="smollm2", prompt="Hi", max_tokens=1)
    assert raised.value.status_code == 503
    assert "not back yet" in raised.value.message
    errors = [r.error for r in served.results if r.error]
    assert errors and "ended during the request" in errors[0]


async def test_push_puts_inputs_into_the_inbox_until_it_is_full(
    serve: Serve, models_dir: Path
) -> None:
    served = await serve(onnx_spec(models_dir), inbox_depth=2)
    async with httpx.AsyncClient(base_url=served.url) as http:
        first = await http.post("/v1/push/cifar", content=b"[[0.5]]")
        assert first.status_code == 202 and first.json()["pending"] == 1
        assert (await http.post("/v1/push/cifar", content=b"[[1]]")).status_code == 202
        full = await http.post("/v1/push/cifar", content=b"[[2]]")
        assert (
            full.status_code == 429 and "already holds 2 inputs" in full.json()["error"]["message"]
        )
        assert (await http.post("/v1/push/nope", content=b"[1]")).status_code == 404
        assert (await http.post("/v1/push/cifar", content=b"  ")).status_code == 400
        too_big = await http.post("/v1/push/cifar", content=b"1" * (1024 * 1024 + 1))
        assert too_big.status_code == 413
    drained = served.inbox.drain("cifar")
    assert [p.text for p in drained] == ["[[0.5]]", "[[1]]"]
    assert drained[0].id == first.json()["id"]


async def test_a_port_in_use_is_a_local_api_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pool = ModelPool(InferenceSettings())

        async def sink(message: ResultMessage) -> None:
            raise AssertionError("nothing is served")

        api = LocalApi(pool, PushInbox(1), sink, LocalApiSettings(port=port))
        with pytest.raises(LocalApiError, match=f"cannot listen on 127.0.0.1:{port}"):
            await api.serve()
