"""GGUF models through llama-cpp-python: chat, completion, streaming, embeddings.

Imported only in a worker process. llama.cpp's errors (ValueError, RuntimeError) are translated
here into the inference error tree.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.inference.errors import (
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    RuntimeUnavailableError,
)
from device_agent.inference.inputs import (
    ChatInput,
    EmbeddingInput,
    InferenceInput,
    ProbeInput,
    TensorInput,
    TextInput,
)
from device_agent.inference.outputs import InferenceOutput
from device_agent.inference.runtime import RuntimeOptions
from device_agent.inference.spec import ModelInfo, ModelSpec
from fleet_protocol import ModelRuntime

if TYPE_CHECKING:
    import llama_cpp

__all__ = ["GgufModel"]

# The health check's prompt: one token of answer proves the model generates.
_PROBE_PROMPT = "Hello"


class GgufModel:
    """A llama.cpp model; a second context for embeddings is made on first use."""

    def __init__(self, spec: ModelSpec, options: RuntimeOptions) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise RuntimeUnavailableError(
                f"model {spec.name!r} is GGUF, but llama-cpp-python does not import on this "
                f"device ({exc}); install edgefleet[llm]"
            ) from exc
        self._llama_cpp = llama_cpp
        self._spec = spec
        self._options = options
        self._llm = self._open(embedding=False)
        self._embedder: llama_cpp.Llama | None = None
        self._info = ModelInfo(runtime=ModelRuntime.GGUF, context_tokens=int(self._llm.n_ctx()))

    def _open(self, *, embedding: bool) -> llama_cpp.Llama:
        extra: dict[str, Any] = {}
        if embedding:
            # One vector per text (mean of its tokens), as OpenAI's embeddings are.
            extra = {"embedding": True, "pooling_type": self._llama_cpp.LLAMA_POOLING_TYPE_MEAN}
        try:
            return self._llama_cpp.Llama(
                model_path=str(self._spec.weights),
                n_ctx=self._options.gguf_context_tokens,
                n_threads=self._options.threads,
                n_threads_batch=self._options.threads,
                verbose=False,
                **extra,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"llama.cpp cannot load model {self._spec.name!r} from {self._spec.weights}: {exc}"
            ) from exc

    @property
    def info(self) -> ModelInfo:
        """No tensors; the context size."""
        return self._info

    def run(self, request: InferenceInput | ProbeInput) -> InferenceOutput:
        """A whole answer (chat, completion, embeddings) or the one-token probe."""
        if isinstance(request, ProbeInput):
            request = TextInput(prompt=_PROBE_PROMPT, max_tokens=1, temperature=0.0)
        if isinstance(request, EmbeddingInput):
            return self._embed(request)
        if isinstance(request, TensorInput):
            raise InvalidInputError(
                f"model {self._spec.name!r} is a GGUF language model: it takes text, not tensors"
            )
        started = time.perf_counter()
        answer = self._generate(request, stream=False)
        elapsed = time.perf_counter() - started
        choice = answer["choices"][0]
        text = choice["message"]["content"] if isinstance(request, ChatInput) else choice["text"]
        usage = answer.get("usage") or {}
        tokens = int(usage.get("completion_tokens", 0))
        return InferenceOutput(
            text=text or "",
            tokens=tokens,
            tokens_per_s=tokens / elapsed if elapsed > 0 else None,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            finish_reason=choice.get("finish_reason"),
        )

    def stream(self, request: InferenceInput) -> Iterator[str | InferenceOutput]:
        """Text deltas as llama.cpp produces them (about one per token), then the output."""
        if not isinstance(request, ChatInput | TextInput):
            raise InvalidInputError(
                f"model {self._spec.name!r}: only chats and completions can be streamed"
            )
        started = time.perf_counter()
        parts: list[str] = []
        finish_reason: str | None = None
        try:
            for chunk in self._generate(request, stream=True):
                choice = chunk["choices"][0]
                if isinstance(request, ChatInput):
                    delta = choice.get("delta", {}).get("content")
                else:
                    delta = choice.get("text")
                finish_reason = choice.get("finish_reason") or finish_reason
                if delta:
                    parts.append(delta)
                    yield delta
        except (ValueError, RuntimeError) as exc:
            raise _translate(self._spec.name, exc) from exc
        elapsed = time.perf_counter() - started
        # llama.cpp yields one chunk per generated token (bytes of a split UTF-8 character
        # are held back and joined), so the chunk count is the token count.
        tokens = len(parts)
        yield InferenceOutput(
            text="".join(parts),
            tokens=tokens,
            tokens_per_s=tokens / elapsed if elapsed > 0 else None,
            finish_reason=finish_reason,
        )

    def _generate(self, request: ChatInput | TextInput, *, stream: bool) -> Any:
        max_tokens = request.max_tokens or self._options.default_max_tokens
        stop = list(request.stop) or None
        try:
            if isinstance(request, ChatInput):
                return self._llm.create_chat_completion(
                    messages=[
                        {"role": m.role, "content": m.content}  # type: ignore[misc]
                        for m in request.messages
                    ],
                    max_tokens=max_tokens,
                    temperature=request.temperature,
                    stop=stop,
                    stream=stream,
                )
            return self._llm.create_completion(
                prompt=request.prompt,
                max_tokens=max_tokens,
                temperature=request.temperature,
                stop=stop,
                stream=stream,
            )
        except (ValueError, RuntimeError) as exc:
            raise _translate(self._spec.name, exc) from exc

    def _embed(self, request: EmbeddingInput) -> InferenceOutput:
        if not request.texts or any(not text for text in request.texts):
            raise InvalidInputError(
                f"model {self._spec.name!r}: embeddings need one or more non-empty texts"
            )
        if self._embedder is None:
            # The weights are memory-mapped, so the second context costs its KV cache only.
            self._embedder = self._open(embedding=True)
        try:
            answer = self._embedder.create_embedding(list(request.texts))
        except (ValueError, RuntimeError) as exc:
            raise _translate(self._spec.name, exc) from exc
        vectors = []
        for item in answer["data"]:
            vector = np.asarray(item["embedding"], dtype=np.float64)
            norm = float(np.linalg.norm(vector))
            vectors.append(tuple(float(v) for v in (vector / norm if norm > 0 else vector)))
        tokens = int(answer.get("usage", {}).get("prompt_tokens", 0))
        return InferenceOutput(embeddings=tuple(vectors), tokens=tokens, prompt_tokens=tokens)

    def close(self) -> None:
        """Free both contexts."""
        self._llm.close()
        if self._embedder is not None:
            self._embedder.close()


def _translate(name: str, exc: Exception) -> InferenceError:
    # llama-cpp-python raises ValueError for a prompt longer than the context; that is the
    # caller's input, not the model's fault.
    message = str(exc)
    if isinstance(exc, ValueError) and "context window" in message:
        return InvalidInputError(f"model {name!r}: {message}; shorten the prompt")
    return InferenceError(f"llama.cpp failed on model {name!r}: {message}")
