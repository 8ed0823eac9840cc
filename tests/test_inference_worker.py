"""Worker supervision with real processes: crashes, restarts, bad loads, swaps, queues, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import InferenceSettings
from device_agent.inference import (
    ChatInput,
    ChatMessage,
    InferenceOutput,
    InferenceTimeoutError,
    ModelLoadError,
    ModelNotLoadedError,
    ModelPool,
    ModelSpec,
    QueueFullError,
    TensorInput,
    WorkerCrashedError,
)
from fleet_protocol import ModelRuntime
from tests.fixtures.models import (
    build_onnx_classifier,
    model_spec,
    smollm2_path,
    write_corrupt_model,
)

pytestmark = pytest.mark.timeout(120)

# A chat long enough (hundreds of tokens) to still be running when the test acts on it.
LONG_CHAT = ChatInput(
    messages=(ChatMessage(role="user", content="Write a long story about a lighthouse keeper."),),
    max_tokens=400,
    temperature=0.0,
)
PIXELS = np.zeros((3, 32, 32), np.float32)

PoolFactory = Callable[..., ModelPool]


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    pools: list[ModelPool] = []

    def make(**overrides: object) -> ModelPool:
        values: dict[str, object] = {
            "threads": 2,
            "gguf_context_tokens": 512,
            "restart_min_s": 0.05,
            "restart_max_s": 0.2,
        }
        values.update(overrides)
        pool = ModelPool(InferenceSettings.model_validate(values))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_onnx_classifier(tmp_path_factory.mktemp("models") / "classifier.onnx")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers; /proc says whether it is one.
    with contextlib.suppress(FileNotFoundError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    return False


async def test_worker_killed_mid_request_fails_it_cleanly_then_restarts_and_serves(
    make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool()
    await pool.load(model_spec("smollm2", "gguf", smollm2_path()))
    first_pid = pool.worker_pid("smollm2")
    assert first_pid is not None

    caplog.set_level(logging.WARNING, logger="device_agent.inference.pool")
    with pytest.raises(WorkerCrashedError, match="killed by SIGKILL"):
        async with contextlib.aclosing(pool.stream("smollm2", LONG_CHAT)) as items:
            async for item in items:
                assert isinstance(item, str), "the chat ended before the worker was killed"
                os.kill(first_pid, signal.SIGKILL)  # mid-request: after its first token

    short = ChatInput(messages=(ChatMessage(role="user", content="Hi"),), max_tokens=3)
    answer = await pool.infer("smollm2", short)
    assert answer.text is not None and answer.tokens
    assert pool.worker_restarts("smollm2") == 1
    assert pool.worker_pid("smollm2") not in (None, first_pid)
    assert any(
        "model worker ended model=smollm2" in r.getMessage() and "restarts=1" in r.getMessage()
        for r in caplog.records
    )


async def test_an_idle_worker_that_dies_is_restarted_too(
    make_pool: PoolFactory, onnx_file: Path
) -> None:
    pool = make_pool()
    await pool.load(model_spec("cifar", "onnx", onnx_file))
    pid = pool.worker_pid("cifar")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(30):
        while pool.worker_restarts("cifar") < 1 or not pool.is_ready("cifar"):  # noqa: ASYNC110 - the pool offers no event for this
            await asyncio.sleep(0.05)
    assert (await pool.infer("cifar", TensorInput({"image": PIXELS}))).label is not None


@pytest.mark.parametrize("runtime", ["onnx", "tflite", "gguf"])
async def test_a_corrupt_model_fails_to_load_and_the_old_one_keeps_serving(
    make_pool: PoolFactory, onnx_file: Path, tmp_path: Path, runtime: str
) -> None:
    pool = make_pool()
    good = model_spec("model", "onnx", onnx_file, version="1")
    await pool.load(good)
    pid = pool.worker_pid("model")

    corrupt = write_corrupt_model(tmp_path / f"bad.{runtime}", runtime)
    with pytest.raises(ModelLoadError, match="model"):
        await pool.load(model_spec("model", runtime, corrupt, version="2"))

    assert pool.spec("model") == good
    assert pool.worker_pid("model") == pid
    assert (await pool.infer("model", TensorInput({"image": PIXELS}))).label is not None
    assert pool.worker_restarts("model") == 0


async def test_a_missing_weights_file_is_a_model_load_error(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool()
    for runtime in ModelRuntime:
        spec = ModelSpec(
            name="ghost",
            version="1",
            release=1,
            runtime=runtime,
            sha256="0" * 64,
            weights=tmp_path / f"missing.{runtime.value}",
        )
        with pytest.raises(ModelLoadError, match="ghost"):
            await pool.load(spec)
    assert pool.spec("ghost") is None


async def test_loading_a_new_release_swaps_workers_only_once_it_has_loaded(
    make_pool: PoolFactory, onnx_file: Path, tmp_path: Path
) -> None:
    pool = make_pool()
    await pool.load(model_spec("cifar", "onnx", onnx_file, version="1", release=1))
    old_pid = pool.worker_pid("cifar")
    assert old_pid is not None

    newer = build_onnx_classifier(tmp_path / "v2.onnx", seed=5)
    await pool.load(model_spec("cifar", "onnx", newer, version="2", release=2))
    spec = pool.spec("cifar")
    assert spec is not None and (spec.version, spec.release) == ("2", 2)
    assert pool.worker_pid("cifar") != old_pid
    assert not process_alive(old_pid)
    assert pool.worker_restarts("cifar") == 0  # a swap is not a crash
    assert (await pool.infer("cifar", TensorInput({"image": PIXELS}))).label is not None


async def test_requests_past_the_queue_depth_are_refused_at_once(make_pool: PoolFactory) -> None:
    pool = make_pool(queue_depth=1)
    await pool.load(model_spec("smollm2", "gguf", smollm2_path()))
    short = ChatInput(messages=(ChatMessage(role="user", content="Hi"),), max_tokens=2)
    async with contextlib.aclosing(pool.stream("smollm2", LONG_CHAT)) as running:
        assert isinstance(await anext(running), str)  # the model is busy with it
        queued = asyncio.create_task(pool.infer("smollm2", short))
        await asyncio.sleep(0.1)
        assert not queued.done()
        with pytest.raises(QueueFullError, match="already has 1 requests waiting"):
            await pool.infer("smollm2", short)
    # The abandoned stream is cancelled in the worker; the queued request then runs.
    answer = await asyncio.wait_for(queued, 30)
    assert isinstance(answer, InferenceOutput) and answer.text is not None


async def test_a_request_past_its_timeout_fails_and_the_worker_is_restarted(
    make_pool: PoolFactory,
) -> None:
    # Long enough for a one-token answer on a busy machine, far too short for LONG_CHAT.
    pool = make_pool(request_timeout_s=3)
    await pool.load(model_spec("smollm2", "gguf", smollm2_path()))
    with pytest.raises(InferenceTimeoutError, match="did not answer within the request timeout"):
        await pool.infer("smollm2", LONG_CHAT)
    # Let the restart finish first, so the short request's own timeout covers only itself.
    async with asyncio.timeout(30):
        while not pool.is_ready("smollm2"):  # noqa: ASYNC110 - the pool offers no event for this
            await asyncio.sleep(0.05)
    short = ChatInput(messages=(ChatMessage(role="user", content="Hi"),), max_tokens=1)
    assert (await pool.infer("smollm2", short)).tokens == 1
    assert pool.worker_restarts("smollm2") == 1


async def test_unloaded_and_unknown_models_are_not_loaded_errors(
    make_pool: PoolFactory, onnx_file: Path
) -> None:
    pool = make_pool()
    await pool.load(model_spec("cifar", "onnx", onnx_file))
    pid = pool.worker_pid("cifar")
    assert pid is not None
    await pool.unload("cifar")
    assert not process_alive(pid)
    with pytest.raises(ModelNotLoadedError, match="no model named 'cifar'"):
        await pool.infer("cifar", TensorInput({"image": PIXELS}))
    with pytest.raises(ModelNotLoadedError):
        await pool.health_check("nothing")
    assert pool.specs() == []
