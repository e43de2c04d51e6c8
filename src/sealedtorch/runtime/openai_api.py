"""An OpenAI-compatible text API for served causal LMs, inside the TEE.

``POST /v1/completions``, ``POST /v1/chat/completions`` (chat template from the sealed
tokenizer) and ``GET /v1/models``, with ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed`` and ``stream`` (server-sent events, ending with ``data: [DONE]``).  They
sit behind the same TLS key as the KServe API, so a client that checked
``/v1/attestation`` and pinned that key (``sealedtorch.runtime.client``) talks to the TEE
only.  Prompts are tokenized and completions detokenized here: raw text never needs
tokenizing outside the TEE.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the
official clients raise their usual exceptions.  Request fields this server does not
implement (``n`` > 1, ``logprobs``, ``echo``, ``best_of``, tools) are refused with a 400
naming the field rather than silently ignored; fields that do not change the output
(``user``, ``stream_options``) are accepted.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from .hf import GenerationParams, GenerationResult, TextGenerator

if TYPE_CHECKING:
    from .server import Runtime

__all__ = ["ChatRequest", "CompletionRequest", "openai_router"]

_MAX_STOP = 4
#: The largest OpenAI-API request body read (a long prompt is well under 1 MB of JSON).
MAX_TEXT_REQUEST_BYTES = 4 << 20
_UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools",
                "tool_choice", "functions", "function_call", "logit_bias", "response_format")


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=1 << 16)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 16)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (len(value) > _MAX_STOP or not all(value)):
            raise ValueError(f"at most {_MAX_STOP} non-empty stop strings")
        return value

    def params(self, default_max: int) -> GenerationParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            temperature=self.temperature, top_p=self.top_p, stop=stop, seed=self.seed)


class CompletionRequest(_Common):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


_Request = TypeVar("_Request", bound=_Common)


def _error(status: int, message: str, *, param: str | None = None,
           kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class _Api:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def generator(self, name: str) -> TextGenerator | JSONResponse:
        slot = self.runtime.slots.get(name)
        if slot is None:
            served = [n for n, s in self.runtime.slots.items() if _generator_of(s.model)]
            return _error(404, f"The model {name!r} does not exist (text models served: "
                               f"{', '.join(served) or 'none'})", param="model",
                          code="model_not_found")
        if slot.state != "ready" or slot.model is None:
            return _error(503, f"model {name!r} is not ready ({slot.state})",
                          kind="server_error")
        generator = _generator_of(slot.model)
        if generator is None:
            return _error(400, f"model {name!r} does not generate text (it is served on the "
                               "KServe v2 API only)", param="model")
        return generator

    async def answer(self, request: Request, cls: type[_Request],
                     encode: Callable[[TextGenerator, _Request], list[int] | JSONResponse],
                     form: _Format) -> Response:
        """One endpoint's whole handling: parse and check the body, find the model, encode
        the prompt (``encode``), generate and answer in ``form``; or the error on the way."""
        req = await self.parse(request, cls)
        if isinstance(req, JSONResponse):
            return req
        gen = self.generator(req.model)
        if isinstance(gen, JSONResponse):
            return gen
        ids = encode(gen, req)
        if isinstance(ids, JSONResponse):
            return ids
        return await self.run(gen, ids, req, form)

    async def parse(self, request: Request, cls: type[_Request]) -> _Request | JSONResponse:
        # Bounded before and while reading: a text request is small, and an unbounded read
        # would let any client make the runtime hold whatever it sends.
        limit = min(self.runtime.config.max_request_bytes, MAX_TEXT_REQUEST_BYTES)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return _error(413, f"request body of {declared} bytes is larger than the limit of "
                               f"{limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _error(413, f"request body is larger than the limit of {limit} bytes")
        try:
            data = json.loads(body)
        except ValueError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(data, dict):
            return _error(400, "the request body must be a JSON object")
        for name in _UNSUPPORTED:
            if data.get(name) not in (None, False, 0, [], {}):
                return _error(400, f"{name!r} is not supported by this server", param=name)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            return _error(400, f"{loc}: {err['msg']}", param=loc)

    async def run(self, gen: TextGenerator, prompt_ids: list[int], req: _Common,
                  form: _Format) -> Response:
        params = req.params(16 if isinstance(req, CompletionRequest) else 256)
        ident, created = uuid.uuid4().hex, int(time.time())

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return form.chunk(text, finish, req.model, ident, created)

        if not req.stream:
            result = await asyncio.to_thread(gen.generate, prompt_ids, params)
            return JSONResponse(form.answer(result, req.model, ident, created))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | GenerationResult | BaseException] = asyncio.Queue()

        def emit(text: str) -> None:  # called on the generating thread
            loop.call_soon_threadsafe(queue.put_nowait, text)

        def produce() -> None:
            try:
                result = gen.generate(prompt_ids, params, on_text=emit)
                loop.call_soon_threadsafe(queue.put_nowait, result)
            except BaseException as exc:  # reported in the stream, then the stream ends
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        threading.Thread(target=produce, name="generate", daemon=True).start()

        async def events() -> AsyncIterator[bytes]:
            yield _sse(chunk(None, None))  # role / opening chunk
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    yield _sse(chunk(item, None))
                elif isinstance(item, GenerationResult):
                    yield _sse(chunk(None, item.finish_reason))
                    break
                else:
                    yield _sse({"error": {"message": f"generation failed: "
                                                     f"{type(item).__name__}",
                                          "type": "server_error"}})
                    break
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store"})


def _encode_prompt(gen: TextGenerator, req: CompletionRequest) -> list[int]:
    return gen.encode(req.prompt if isinstance(req.prompt, str) else req.prompt[0])


def _encode_messages(gen: TextGenerator, req: ChatRequest) -> list[int] | JSONResponse:
    try:
        return gen.encode_chat([m.model_dump(exclude_none=True) for m in req.messages])
    except ConfigError as exc:  # no chat template
        return _error(400, str(exc), param="messages")


def _generator_of(model: Any) -> TextGenerator | None:
    task = getattr(model, "text", None) if model is not None else None
    return getattr(task, "generator", None)


def _usage(r: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids),
            "total_tokens": r.prompt_tokens + len(r.token_ids)}


@dataclass(frozen=True)
class _Format:
    """How one endpoint writes its answers, whole or streamed: the two endpoints differ
    only in the id prefix, the object names and the choice's text field, so one renderer
    keeps their shared fields (and OpenAI's shape) from drifting apart."""

    id_prefix: str
    answer_object: str
    chunk_object: str
    #: The choice's text field(s): (text, finish_reason, streamed?) -> fields.
    text_fields: Callable[[str | None, str | None, bool], dict[str, Any]]

    def answer(self, r: GenerationResult, model: str, ident: str,
               created: int) -> dict[str, Any]:
        return {**self._head(self.answer_object, model, ident, created),
                "choices": [self._choice(r.text, r.finish_reason, False)], "usage": _usage(r)}

    def chunk(self, text: str | None, finish: str | None, model: str, ident: str,
              created: int) -> dict[str, Any]:
        """One server-sent event's data; ``(None, None)`` is the opening chunk."""
        return {**self._head(self.chunk_object, model, ident, created),
                "choices": [self._choice(text, finish, True)]}

    def _head(self, kind: str, model: str, ident: str, created: int) -> dict[str, Any]:
        return {"id": f"{self.id_prefix}-{ident}", "object": kind, "created": created,
                "model": model}

    def _choice(self, text: str | None, finish: str | None, streamed: bool) -> dict[str, Any]:
        return {"index": 0, **self.text_fields(text, finish, streamed),
                "finish_reason": finish, "logprobs": None}


def _completion_text(text: str | None, finish: str | None, streamed: bool) -> dict[str, Any]:
    return {"text": text or ""}


def _chat_text(text: str | None, finish: str | None, streamed: bool) -> dict[str, Any]:
    if not streamed:
        return {"message": {"role": "assistant", "content": text}}
    if text is None and finish is None:  # the opening chunk names the role
        return {"delta": {"role": "assistant", "content": ""}}
    return {"delta": {"content": text} if text else {}}


_COMPLETION = _Format("cmpl", "text_completion", "text_completion", _completion_text)
_CHAT = _Format("chatcmpl", "chat.completion", "chat.completion.chunk", _chat_text)


def openai_router(runtime: Runtime) -> APIRouter:
    """The ``/v1`` OpenAI-compatible routes over ``runtime``'s text-generation models."""
    router = APIRouter()
    api = _Api(runtime)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "sealedtorch"}
                for name, s in runtime.slots.items() if _generator_of(s.model)]
        return {"object": "list", "data": data}

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.answer(request, CompletionRequest, _encode_prompt, _COMPLETION)

    @router.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await api.answer(request, ChatRequest, _encode_messages, _CHAT)

    return router
