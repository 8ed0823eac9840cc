"""Inference on the device: each runtime in a real worker process against its library called
directly, post-processing, input parsing, results, the push inbox and the settings."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime  # type: ignore[import-untyped]
import pytest
from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-untyped]
from pydantic import ValidationError

from device_agent.config import AgentSettings, InferenceSettings
from device_agent.inference import (
    ChatInput,
    ChatMessage,
    EmbeddingInput,
    InboxFullError,
    InferenceOutput,
    InvalidInputError,
    ModelLoadError,
    ModelNotLoadedError,
    ModelPool,
    PushInbox,
    TensorInput,
    TextInput,
    available_runtimes,
    failed_result,
    parse_command_input,
    result_message,
)
from device_agent.inference.postprocess import classify, load_labels
from fleet_protocol import ModelRuntime, ResultSource
from tests.fixtures.models import (
    CIFAR10_LABELS,
    build_onnx_classifier,
    build_tflite_classifier,
    model_spec,
    smollm2_path,
    write_labels,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    build_onnx_classifier(directory / "classifier.onnx")
    build_onnx_classifier(directory / "logits.onnx", softmax=False, seed=7)
    build_tflite_classifier(directory / "classifier.tflite")
    write_labels(directory / "labels.txt")
    return directory


@pytest.fixture
async def pool() -> AsyncIterator[ModelPool]:
    pool = ModelPool(InferenceSettings(threads=2, gguf_context_tokens=512, request_timeout_s=60))
    try:
        yield pool
    finally:
        await pool.aclose()


def image(seed: int, shape: tuple[int, ...] = (3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def expected_classification(probabilities: np.ndarray) -> tuple[str, float]:
    best = int(np.argmax(probabilities))
    return CIFAR10_LABELS[best], float(probabilities[best])


async def test_onnx_model_in_a_worker_matches_onnxruntime_called_directly(
    pool: ModelPool, models_dir: Path
) -> None:
    weights = models_dir / "classifier.onnx"
    spec = model_spec("cifar", "onnx", weights, labels=models_dir / "labels.txt")
    await pool.load(spec)
    await pool.health_check("cifar")
    direct = onnxruntime.InferenceSession(str(weights), providers=["CPUExecutionProvider"])

    for seed in range(3):
        pixels = image(seed)
        output = await pool.infer("cifar", TensorInput({"image": pixels.tolist()}))
        reference = direct.run(None, {"image": pixels[np.newaxis]})[0]
        label, confidence = expected_classification(reference[0])
        assert output.label == label
        assert output.confidence == pytest.approx(confidence, rel=1e-5)
        assert output.scores is not None and len(output.scores) == 10
        assert output.scores[label] == pytest.approx(confidence, rel=1e-5)
        np.testing.assert_allclose(output.tensors["probabilities"], reference, rtol=1e-5)
        assert output.latency_ms > 0

    info = pool.info("cifar")
    assert info is not None and info.inputs[0].shape == (-1, 3, 32, 32)
    assert info.labels == CIFAR10_LABELS


async def test_tflite_model_in_a_worker_matches_the_interpreter_called_directly(
    pool: ModelPool, models_dir: Path
) -> None:
    weights = models_dir / "classifier.tflite"
    spec = model_spec("cifar-lite", "tflite", weights, labels=models_dir / "labels.txt")
    await pool.load(spec)
    await pool.health_check("cifar-lite")
    direct = Interpreter(model_path=str(weights), num_threads=1)
    direct.allocate_tensors()
    detail = direct.get_input_details()[0]

    for seed in range(3):
        pixels = image(seed, (1, 32, 32, 3))
        output = await pool.infer("cifar-lite", TensorInput({"whatever": pixels}))
        direct.set_tensor(detail["index"], pixels)
        direct.invoke()
        reference = direct.get_tensor(direct.get_output_details()[0]["index"])
        label, confidence = expected_classification(reference[0])
        assert output.label == label
        assert output.confidence == pytest.approx(confidence, rel=1e-5)
        np.testing.assert_allclose(output.tensors["probabilities"], reference, rtol=1e-5)

    # A dynamic batch: the interpreter is resized to it; a batch gets no single label.
    batch = await pool.infer("cifar-lite", TensorInput({"image": image(9, (4, 32, 32, 3))}))
    assert batch.tensors["probabilities"].shape == (4, 10)
    assert batch.label is None


async def test_logits_are_turned_into_probabilities_with_softmax(
    pool: ModelPool, models_dir: Path
) -> None:
    weights = models_dir / "logits.onnx"
    await pool.load(model_spec("logits", "onnx", weights))
    pixels = image(4)
    output = await pool.infer("logits", TensorInput({"image": pixels}))
    logits = output.tensors["probabilities"][0].astype(np.float64)
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = int(np.argmax(softmax))
    # Without a labels file the class index is the label.
    assert output.label == str(best)
    assert output.confidence == pytest.approx(float(softmax[best]), rel=1e-6)
    assert output.scores is not None
    assert sum(output.scores.values()) == pytest.approx(1.0, rel=1e-6)


async def test_smollm2_chats_streams_completes_and_embeds_in_a_worker(pool: ModelPool) -> None:
    spec = model_spec("smollm2", "gguf", smollm2_path())
    await pool.load(spec)
    await pool.health_check("smollm2")
    chat = ChatInput(
        messages=(ChatMessage(role="user", content="What is the capital of France?"),),
        max_tokens=12,
        temperature=0.0,
    )

    answer = await pool.infer("smollm2", chat)
    assert answer.text
    assert answer.tokens is not None and 0 < answer.tokens <= 12
    assert answer.tokens_per_s is not None and answer.tokens_per_s > 0
    assert answer.finish_reason in ("stop", "length")

    chunks: list[str] = []
    final: InferenceOutput | None = None
    async for item in pool.stream("smollm2", chat):
        if isinstance(item, str):
            chunks.append(item)
        else:
            final = item
    assert final is not None and len(chunks) > 1
    assert "".join(chunks) == final.text == answer.text  # greedy: the same answer
    assert final.tokens == len(chunks)

    completion = await pool.infer(
        "smollm2", TextInput(prompt="The capital of France is", max_tokens=4, temperature=0.0)
    )
    assert completion.text and completion.tokens == 4

    embedded = await pool.infer("smollm2", EmbeddingInput(texts=("hello", "a longer text")))
    assert len(embedded.embeddings) == 2
    for vector in embedded.embeddings:
        assert len(vector) == 576  # SmolLM2-135M's hidden size
        assert math.sqrt(sum(v * v for v in vector)) == pytest.approx(1.0, rel=1e-6)


async def test_wrong_tensors_are_refused_with_what_the_model_takes(
    pool: ModelPool, models_dir: Path
) -> None:
    await pool.load(model_spec("cifar", "onnx", models_dir / "classifier.onnx"))
    cases: list[tuple[Any, str]] = [
        (TensorInput({"image": image(0, (3, 32, 31))}), "must have shape [-1, 3, 32, 32]"),
        (TensorInput({"image": [[1, 2], [3]]}), "not a rectangular array"),
        (TensorInput({"image": [["a"] * 32] * 32}), "must be float32"),
        (TensorInput({"a": image(0), "b": image(1)}), "unknown input 'a'"),
        (ChatInput(messages=(ChatMessage(role="user", content="hi"),)), "not text"),
    ]
    for request, message in cases:
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            await pool.infer("cifar", request)
    # The worker is fine after refusing them.
    assert (await pool.infer("cifar", TensorInput({"image": image(0)}))).label is not None
    assert pool.worker_restarts("cifar") == 0


async def test_labels_that_do_not_match_the_outputs_fail_the_load(
    pool: ModelPool, models_dir: Path, tmp_path: Path
) -> None:
    labels = write_labels(tmp_path / "five.txt", CIFAR10_LABELS[:5])
    spec = model_spec("cifar", "onnx", models_dir / "classifier.onnx", labels=labels)
    with pytest.raises(ModelLoadError, match="names 5 classes but its output"):
        await pool.load(spec)
    assert pool.spec("cifar") is None
    with pytest.raises(ModelNotLoadedError):
        await pool.infer("cifar", TensorInput({"image": image(0)}))


def test_classify_keeps_the_top_ten_and_names_unlabelled_classes_by_index() -> None:
    scores = np.arange(12, dtype=np.float32)[::-1].copy()  # class 0 best
    found = classify(scores[np.newaxis], ["zero", "one"])
    assert found is not None
    assert found.label == "zero"
    assert list(found.scores)[:3] == ["zero", "one", "2"]
    assert len(found.scores) == 10
    assert found.confidence == pytest.approx(float(np.exp(11) / np.exp(np.arange(12)).sum()))
    # Probabilities are used as they are; a batch of several or a scalar is no classification.
    probabilities = np.array([0.1, 0.7, 0.2], dtype=np.float32)
    found = classify(probabilities, ["a", "b", "c"])
    assert found is not None and found.label == "b"
    assert found.confidence == pytest.approx(0.7)
    assert classify(np.zeros((2, 3), np.float32), ["a", "b", "c"]) is None
    assert classify(np.zeros((1,), np.float32), []) is None


def test_labels_file_is_one_class_per_line_and_empty_ones_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("cat\n  dog \n\n", encoding="utf-8")
    assert load_labels(path) == ("cat", "dog")
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="names no class"):
        load_labels(path)
    path.write_text("x" * 201, encoding="utf-8")
    with pytest.raises(ModelLoadError, match="201 characters"):
        load_labels(path)


def test_command_input_is_a_chat_a_completion_or_tensors(models_dir: Path) -> None:
    gguf = model_spec("chat", "gguf", smollm2_path())
    onnx = model_spec("cifar", "onnx", models_dir / "classifier.onnx")

    plain = parse_command_input(gguf, "Hello there")
    assert plain == ChatInput(messages=(ChatMessage(role="user", content="Hello there"),))
    completion = parse_command_input(gguf, '{"prompt": "Once", "max_tokens": 5}')
    assert completion == TextInput(prompt="Once", max_tokens=5)
    chat = parse_command_input(
        gguf, '{"messages": [{"role": "system", "content": "Be brief"}], "temperature": 0}'
    )
    assert isinstance(chat, ChatInput) and chat.temperature == 0.0
    assert parse_command_input(gguf, "{not json") == ChatInput(
        messages=(ChatMessage(role="user", content="{not json"),)
    )

    assert parse_command_input(onnx, "[[1, 2]]") == TensorInput({"input": [[1, 2]]})
    assert parse_command_input(onnx, '{"image": [1]}') == TensorInput({"image": [1]})

    for spec, text, message in [
        (gguf, "   ", "is empty"),
        (gguf, '{"max_tokens": 3}', "needs 'messages'"),
        (gguf, '{"prompt": "x", "max_tokens": 0}', "positive integer"),
        (gguf, '{"prompt": "x", "temperature": 9}', "from 0 to 2"),
        (gguf, '{"messages": [{"role": "king", "content": "x"}]}', "message 0"),
        (onnx, "not json", "must be JSON"),
        (onnx, '"a string"', "JSON array or an object"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            parse_command_input(spec, text)


def test_results_carry_provenance_and_are_cut_to_the_protocol_limits(models_dir: Path) -> None:
    spec = model_spec("cifar", "onnx", models_dir / "classifier.onnx", version="2.1", release=3)
    output = InferenceOutput(
        label="cat", confidence=0.9, scores={"cat": 0.9}, text="x" * 9000, latency_ms=12.5
    )
    message = result_message(spec, output, source=ResultSource.API, input_ref="r" * 600)
    assert (message.model, message.version, message.release) == ("cifar", "2.1", 3)
    assert message.sha256 == spec.sha256 and message.runtime is ModelRuntime.ONNX
    assert message.source is ResultSource.API
    assert message.input_ref is not None and len(message.input_ref) == 500
    assert message.text is not None and len(message.text) == 8000
    assert (message.label, message.confidence, message.latency_ms) == ("cat", 0.9, 12.5)

    failed = failed_result(
        spec, "boom", source=ResultSource.SCHEDULE, input_ref="/data/a.json", latency_ms=3
    )
    assert failed.error == "boom" and failed.label is None and failed.latency_ms == 3


def test_push_inbox_is_bounded_per_model_and_drains_oldest_first() -> None:
    inbox = PushInbox(depth=2)
    first = inbox.push("cifar", "[1]")
    inbox.push("cifar", "[2]")
    inbox.push("other", "[3]")
    with pytest.raises(InboxFullError, match="already holds 2 inputs"):
        inbox.push("cifar", "[4]")
    assert [p.text for p in inbox.drain("cifar")] == ["[1]", "[2]"]
    assert first.id.startswith("push-")
    assert inbox.drain("cifar") == []
    assert inbox.pending("other") == 1


def test_every_runtime_is_available_in_the_test_environment() -> None:
    assert set(available_runtimes()) == set(ModelRuntime)


def test_local_api_off_loopback_needs_an_api_key(tmp_path: Path) -> None:
    everywhere = "0.0.0.0"  # noqa: S104 - the address under test
    with pytest.raises(ValidationError, match="reachable from the network, without an API key"):
        AgentSettings(state_dir=tmp_path, local_api={"host": everywhere})
    with pytest.raises(ValidationError, match="at least 16 characters"):
        AgentSettings(state_dir=tmp_path, local_api={"host": everywhere, "api_key": "short"})
    settings = AgentSettings(
        state_dir=tmp_path, local_api={"host": everywhere, "api_key": "k" * 24}
    )
    assert settings.local_api.host == everywhere
    # Loopback in any spelling needs no key; a disabled API needs none either.
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert AgentSettings(state_dir=tmp_path, local_api={"host": host}).local_api.host == host
    assert not AgentSettings(
        state_dir=tmp_path, local_api={"host": everywhere, "enabled": False}
    ).local_api.enabled
    with pytest.raises(ValidationError, match="restart_min_s"):
        InferenceSettings(restart_min_s=10, restart_max_s=1)
