"""OpenAI-compatible routes for GGUF models: models, chat (with SSE streaming), completions,
embeddings; and ``POST /v1/push/{model}`` for ``http`` schedules."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from device_agent.inference import (
    ChatInput,
    ChatMessage,
    EmbeddingInput,
    InferenceFailure,
    InferenceOutput,
    ModelNotLoadedError,
    ModelSpec,
    TextInput,
)
from device_agent.local_api.common import (
    ApiContext,
    ApiError,
    Stopwatch,
    error_from_failure,
    new_request_id,
    parse_body,
    read_body,
    read_json,
    report_failure,
    report_result,
)
from fleet_protocol import ModelRuntime

__all__ = ["openai_routes"]

# What /v1/models says owns every model.
_OWNER = "edgefleet"


class _Request(BaseModel):
    # OpenAI clients send parameters this server ignores (user, top_p, ...): accepted, unused.
    model_config = ConfigDict(extra="ignore", frozen=True)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart]

    def to_chat(self) -> ChatMessage:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0, le=2)]
MaxTokens = Annotated[int, Field(ge=1)]


class _ChatRequest(_Request):
    model: str
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1


class _CompletionRequest(_Request):
    model: str
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Annotated[int, Field(ge=1, le=1)] = 1


class _EmbeddingRequest(_Request):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _gguf_spec(context: ApiContext, name: str) -> ModelSpec:
    spec = context.pool.spec(name)
    if spec is None:
        raise error_from_failure(ModelNotLoadedError(name))
    if spec.runtime is not ModelRuntime.GGUF:
        raise ApiError(
            400,
            f"model {name!r} is a {spec.runtime.value} tensor model; call "
            f"POST /v2/models/{name}/infer (KServe v2) instead",
            param="model",
        )
    return spec


def _usage(output: InferenceOutput) -> dict[str, int]:
    prompt = output.prompt_tokens or 0
    completion = output.tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _OpenAiRoutes:
    def __init__(self, context: ApiContext) -> None:
        self._context = context

    async def models(self, request: Request) -> Response:
        created = int(time.time())
        data = [
            {"id": spec.name, "object": "model", "created": created, "owned_by": _OWNER}
            for spec in self._context.pool.specs()
            if spec.runtime is ModelRuntime.GGUF
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        body = parse_body(
            _ChatRequest, await read_json(request, self._context.settings.max_body_bytes)
        )
        spec = _gguf_spec(self._context, body.model)
        chat = ChatInput(
            messages=tuple(m.to_chat() for m in body.messages),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            stop=_stops(body.stop),
            **({} if body.temperature is None else {"temperature": body.temperature}),
        )
        request_id = new_request_id("chatcmpl")
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await self._stream(spec, chat, request_id, chat=True, usage=include_usage)
        output = await self._infer(spec, chat, request_id)
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": spec.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": output.text or ""},
                        "logprobs": None,
                        "finish_reason": output.finish_reason or "stop",
                    }
                ],
                "usage": _usage(output),
            }
        )

    async def completions(self, request: Request) -> Response:
        body = parse_body(
            _CompletionRequest, await read_json(request, self._context.settings.max_body_bytes)
        )
        spec = _gguf_spec(self._context, body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        completion = TextInput(
            prompt=prompt,
            max_tokens=body.max_tokens,
            stop=_stops(body.stop),
            **({} if body.temperature is None else {"temperature": body.temperature}),
        )
        request_id = new_request_id("cmpl")
        if body.stream:
            return await self._stream(spec, completion, request_id, chat=False, usage=False)
        output = await self._infer(spec, completion, request_id)
        return JSONResponse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": spec.name,
                "choices": [
                    {
                        "index": 0,
                        "text": output.text or "",
                        "logprobs": None,
                        "finish_reason": output.finish_reason or "stop",
                    }
                ],
                "usage": _usage(output),
            }
        )

    async def embeddings(self, request: Request) -> Response:
        body = parse_body(
            _EmbeddingRequest, await read_json(request, self._context.settings.max_body_bytes)
        )
        spec = _gguf_spec(self._context, body.model)
        texts = (body.input,) if isinstance(body.input, str) else tuple(body.input)
        output = await self._infer(spec, EmbeddingInput(texts=texts), new_request_id("embd"))
        data: list[dict[str, Any]] = []
        for index, vector in enumerate(output.embeddings):
            embedding: list[float] | str = list(vector)
            if body.encoding_format == "base64":
                # What OpenAI's client asks for by default: little-endian float32, base64.
                raw = np.asarray(vector, dtype="<f4").tobytes()
                embedding = base64.b64encode(raw).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = output.prompt_tokens or 0
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": spec.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def push(self, request: Request) -> Response:
        name = request.path_params["model"]
        if self._context.pool.spec(name) is None:
            raise error_from_failure(ModelNotLoadedError(name))
        raw = await read_body(request, self._context.settings.push_max_bytes)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"a pushed input must be UTF-8 text: {exc}") from exc
        if not text.strip():
            raise ApiError(400, "a pushed input must not be empty")
        try:
            pushed = self._context.inbox.push(name, text)
        except InferenceFailure as exc:
            raise error_from_failure(exc) from exc
        return JSONResponse(
            {"id": pushed.id, "model": name, "pending": self._context.inbox.pending(name)},
            status_code=202,
        )

    async def _infer(
        self, spec: ModelSpec, request: ChatInput | TextInput | EmbeddingInput, request_id: str
    ) -> InferenceOutput:
        watch = Stopwatch()
        try:
            output = await self._context.pool.infer(spec.name, request)
        except InferenceFailure as exc:
            await report_failure(self._context, spec, exc, request_id, watch.ms)
            raise error_from_failure(exc) from exc
        await report_result(self._context, spec, output, request_id)
        return output

    async def _stream(
        self,
        spec: ModelSpec,
        request: ChatInput | TextInput,
        request_id: str,
        *,
        chat: bool,
        usage: bool,
    ) -> Response:
        watch = Stopwatch()
        items = self._context.pool.stream(spec.name, request)
        try:
            # The first chunk is awaited here, so a full queue or a missing model still gets
            # its HTTP status rather than an error inside a 200 stream.
            first = await anext(items)
        except StopAsyncIteration:
            first = None
        except InferenceFailure as exc:
            await items.aclose()
            await report_failure(self._context, spec, exc, request_id, watch.ms)
            raise error_from_failure(exc) from exc
        created = int(time.time())

        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(text: str | None, *, finish: str | None = None, role: bool = False) -> str:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            return event(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": spec.name,
                    "choices": [choice],
                }
            )

        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(items):
                if chat:
                    yield chunk(None, role=True)
                output: InferenceOutput | None = None
                try:
                    item = first
                    while item is not None:
                        if isinstance(item, InferenceOutput):
                            output = item
                            break
                        yield chunk(item)
                        item = await anext(items, None)
                except InferenceFailure as exc:
                    # The status line is sent already: the error travels as an event, which
                    # OpenAI's client raises as an APIError.
                    await report_failure(self._context, spec, exc, request_id, watch.ms)
                    error = error_from_failure(exc)
                    yield event(
                        {
                            "error": {
                                "message": error.message,
                                "type": error.kind,
                                "code": error.code,
                            }
                        }
                    )
                    return
                if output is not None:
                    yield chunk(None, finish=output.finish_reason or "stop")
                    if usage:
                        yield event(
                            {
                                "id": request_id,
                                "object": "chat.completion.chunk",
                                "created": created,
                                "model": spec.name,
                                "choices": [],
                                "usage": _usage(output),
                            }
                        )
                    await report_result(self._context, spec, output, request_id)
                yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def openai_routes(context: ApiContext) -> list[Route]:
    """The /v1 routes."""
    routes = _OpenAiRoutes(context)
    return [
        Route("/v1/models", routes.models, methods=["GET"]),
        Route("/v1/chat/completions", routes.chat, methods=["POST"]),
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/embeddings", routes.embeddings, methods=["POST"]),
        Route("/v1/push/{model}", routes.push, methods=["POST"]),
    ]
