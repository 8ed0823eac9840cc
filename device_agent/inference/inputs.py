"""What a model can be asked: text, chat, tensors or embeddings; and parsing an ``infer`` input."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from device_agent.inference.errors import InvalidInputError
from device_agent.inference.spec import ModelSpec
from fleet_protocol import ModelRuntime

__all__ = [
    "DEFAULT_TEMPERATURE",
    "SINGLE_INPUT",
    "ChatInput",
    "ChatMessage",
    "EmbeddingInput",
    "InferenceInput",
    "ProbeInput",
    "TensorInput",
    "TextInput",
    "parse_command_input",
]

# llama-cpp-python's own default for chat: mostly deterministic answers with a little variety.
DEFAULT_TEMPERATURE = 0.2

# The key a bare JSON array is stored under: a model with one input takes it whatever its name.
SINGLE_INPUT = "input"

ChatRole = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat."""

    role: ChatRole
    content: str


@dataclass(frozen=True)
class TextInput:
    """A plain completion prompt for a GGUF model."""

    prompt: str
    # None: the agent's inference.default_max_tokens.
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatInput:
    """A chat for a GGUF model; the model's own chat template formats it."""

    messages: tuple[ChatMessage, ...]
    # None: the agent's inference.default_max_tokens.
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorInput:
    """Named input tensors (nested lists or numpy arrays) for an ONNX or TFLite model.

    A model with a single input takes a single entry whatever its key. A tensor with one
    dimension fewer than the model's input gets the batch dimension added.
    """

    inputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingInput:
    """Texts to embed with a GGUF model (mean-pooled, L2-normalised vectors)."""

    texts: tuple[str, ...]


@dataclass(frozen=True)
class ProbeInput:
    """The health check: a one-token completion, or zeros of the input shapes."""


InferenceInput = TextInput | ChatInput | TensorInput | EmbeddingInput


def parse_command_input(spec: ModelSpec, text: str) -> InferenceInput:
    """Turn an ``infer`` command's (or a schedule's) input text into a request for ``spec``.

    GGUF: plain text is one user chat message; a JSON object ``{"messages": [...]}`` is a chat
    and ``{"prompt": "..."}`` a completion (both may carry ``max_tokens`` and ``temperature``).
    ONNX/TFLite: a JSON array is the model's single input; ``{"name": array, ...}`` names them.
    Raises :class:`InvalidInputError` with what was wrong.
    """
    if spec.runtime is ModelRuntime.GGUF:
        return _parse_text(spec, text)
    return _parse_tensors(spec, text)


def _parse_text(spec: ModelSpec, text: str) -> InferenceInput:
    stripped = text.strip()
    if not stripped:
        raise InvalidInputError(f"the input for model {spec.name!r} is empty; give it a prompt")
    if not stripped.startswith("{"):
        return ChatInput(messages=(ChatMessage(role="user", content=text),))
    try:
        body = json.loads(stripped)
    except json.JSONDecodeError:
        # Text that merely starts with a brace is still a prompt.
        return ChatInput(messages=(ChatMessage(role="user", content=text),))
    if not isinstance(body, dict):
        return ChatInput(messages=(ChatMessage(role="user", content=text),))
    options = _generation_options(spec, body)
    if "messages" in body:
        return ChatInput(messages=_chat_messages(spec, body["messages"]), **options)
    if isinstance(body.get("prompt"), str):
        return TextInput(prompt=body["prompt"], **options)
    raise InvalidInputError(
        f"a JSON input for GGUF model {spec.name!r} needs 'messages' (a chat) or 'prompt' "
        "(a completion)"
    )


def _generation_options(spec: ModelSpec, body: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidInputError(
                f"max_tokens for model {spec.name!r} must be a positive integer, not {max_tokens!r}"
            )
        options["max_tokens"] = max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
            raise InvalidInputError(
                f"temperature for model {spec.name!r} must be a number from 0 to 2, "
                f"not {temperature!r}"
            )
        options["temperature"] = float(temperature)
    return options


def _chat_messages(spec: ModelSpec, raw: object) -> tuple[ChatMessage, ...]:
    roles = ("system", "user", "assistant", "tool")
    if not isinstance(raw, list) or not raw:
        raise InvalidInputError(f"'messages' for model {spec.name!r} must be a non-empty list")
    messages = []
    for index, item in enumerate(raw):
        if (
            not isinstance(item, dict)
            or item.get("role") not in roles
            or not isinstance(item.get("content"), str)
        ):
            raise InvalidInputError(
                f"message {index} for model {spec.name!r} must be "
                f'{{"role": one of {", ".join(roles)}, "content": text}}'
            )
        messages.append(ChatMessage(role=item["role"], content=item["content"]))
    return tuple(messages)


def _parse_tensors(spec: ModelSpec, text: str) -> TensorInput:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"the input for {spec.runtime.value} model {spec.name!r} must be JSON: an array "
            f'for its single input or {{"input name": array}}; {exc.msg} at position {exc.pos}'
        ) from exc
    if isinstance(body, list):
        return TensorInput(inputs={SINGLE_INPUT: body})
    if isinstance(body, dict) and body and all(isinstance(v, list) for v in body.values()):
        return TensorInput(inputs=dict(body))
    raise InvalidInputError(
        f"the input for {spec.runtime.value} model {spec.name!r} must be a JSON array or an "
        'object of arrays {"input name": [...]}'
    )
