"""``POST /v2/models/{name}/infer`` (also under ``/versions/{version}``): one inference
request from body to answer.

The steps: the slot the URL names (:func:`~.dependencies.served_slot`), a reservation in
the request-body byte budget (bodies declared at most ``SMALL_BODY_BYTES`` skip it, so they
never wait behind large ones), the body (:mod:`.request_body`), parsing (large JSON is
pre-validated and parsed in a worker thread), the model's worker (:mod:`.batching`), the
encoded outputs.

Invariants:

- every answer of these routes, including refusals raised by their dependencies, is
  counted in ``sealedtorch_runtime_requests_total`` by model and status, with its latency
  (:class:`_CountedRoute`); a name that is not served is not counted (no unbounded labels);
- the runtime's refusals are answered with their class's status (:mod:`.responses`); bad
  requests (and budget timeouts) are also counted in ``..._rejected_total``; anything else
  is an internal error (500, logged);
- a request whose worker was retired by a key rotation while its body was read runs on the
  new worker: rotation fails no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from ..errors import (
    BudgetTimeout,
    InferenceFailed,
    InferenceTimeout,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    QueueFull,
    SealedTorchError,
    ShuttingDown,
)
from .batching import Batcher
from .bodies import LARGE_JSON_BYTES, SMALL_BODY_BYTES, ByteBudget, prevalidate_json
from .config import RuntimeConfig
from .dependencies import BodyBudget, ReadySlot, RuntimeDep, app_context
from .kserve import HEADER_LENGTH, InferRequest, encode_infer_response, parse_infer_parts
from .loader import LoadedModel
from .request_body import read_request_body
from .responses import response_for
from .state import ModelSlot, Runtime
from .text_kserve import encode_text_response, parse_text_request

__all__ = ["infer_router"]

log = logging.getLogger("sealedtorch.runtime")

#: Bad requests: answered with their status, counted as rejected and logged.
_REJECTED = (InvalidRequest, PayloadTooLarge, InferenceFailed)
#: Every refusal these routes answer with its class's status (anything else is a 500).
_ANSWERED = (*_REJECTED, QueueFull, ShuttingDown, BudgetTimeout, ModelNotFound, ModelNotReady,
             InferenceTimeout)

#: JSON up to this size is parsed/written on the event loop (a thread hop costs more than
#: that); larger documents go to a worker thread so health checks never wait on them.
_INLINE_BYTES = 64 * 1024

_T = TypeVar("_T")


class _CountedRoute(APIRoute):
    """An infer route whose every answer is counted, refusals from its dependencies too
    (they never reach the endpoint, so the endpoint cannot count them)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def counted(request: Request) -> Response:
            started = time.perf_counter()
            runtime = app_context(request).runtime
            name = request.path_params["name"]
            try:
                response = await handler(request)
            except _ANSWERED as exc:
                response = _refusal(runtime, name, exc)
            if name in runtime.slots:
                runtime.metrics.requests.inc(model=name, code=str(response.status_code))
                runtime.metrics.request_seconds.observe(time.perf_counter() - started,
                                                        model=name)
            return response

        return counted


def _refusal(runtime: Runtime, name: str, exc: SealedTorchError) -> Response:
    """The answer to a refusal; bad requests (and budget timeouts) counted as rejected."""
    if isinstance(exc, (*_REJECTED, BudgetTimeout)):
        runtime.metrics.rejected.inc(model=name, reason=type(exc).__name__)
    if isinstance(exc, _REJECTED):
        log.info("rejected request for %s: %s", name, exc,
                 extra={"fields": {"model": name, "reason": type(exc).__name__}})
    return response_for(exc)


infer_router = APIRouter(route_class=_CountedRoute)


@infer_router.post("/v2/models/{name}/infer")
@infer_router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(slot: ReadySlot, request: Request, runtime: RuntimeDep,
                budget: BodyBudget) -> Response:
    batcher = slot.batcher
    if batcher is None:  # unloaded by the key watcher since served_slot looked
        raise ModelNotReady(f"model {slot.name!r} is not ready ({slot.state}: {slot.error})")
    cfg = runtime.config
    declared = request.headers.get("content-length", "")
    want = min(int(declared), cfg.max_request_bytes) if declared.isdigit() \
        else cfg.max_request_bytes
    if want <= SMALL_BODY_BYTES:  # small declared bodies never wait behind large ones
        return await _answer(runtime, slot, batcher, request)
    async with _reserved(budget, want, cfg.request_timeout_s):
        return await _answer(runtime, slot, batcher, request)


@contextlib.asynccontextmanager
async def _reserved(budget: ByteBudget, want: int, timeout: float) -> AsyncIterator[None]:
    """``want`` bytes of the body budget while the body is read and answered
    (:class:`BudgetTimeout` after ``timeout`` seconds without room)."""
    reserved = await budget.acquire(want, timeout)
    try:
        yield
    finally:
        await budget.release(reserved)


async def _answer(runtime: Runtime, slot: ModelSlot, batcher: Batcher,
                  request: Request) -> Response:
    cfg = runtime.config
    # compressed bodies are decompressed within max_request_bytes, under the same byte
    # budget as any other body (reserved by the caller)
    header, binary = await read_request_body(request, cfg.max_request_bytes)
    header_length_given = request.headers.get(HEADER_LENGTH) is not None
    model = batcher.model  # one read: the key watcher swaps the batcher atomically
    if model.text is not None:  # transformers: text in and out, tokenized here
        return await _answer_text(cfg, model, header, binary)
    parsed = await _parse(cfg, model, header, binary, header_length_given)
    future, batcher = _submit(runtime, slot, batcher, parsed)
    model = batcher.model
    outputs = await _outcome(future, cfg.request_timeout_s)
    json_elements = sum(outputs[r.name].numel() for r in parsed.outputs if not r.binary)
    payload, headers = await _maybe_in_thread(
        json_elements > _INLINE_BYTES // 16,
        lambda: encode_infer_response(model.name, model.version, parsed.id, outputs,
                                      parsed.outputs))
    return Response(payload, status_code=200, headers=headers)


async def _answer_text(cfg: RuntimeConfig, model: LoadedModel, header: bytearray,
                       binary: memoryview | torch.Tensor) -> Response:
    task = model.text
    request = parse_text_request(header, binary, outputs=model.outputs,
                                 max_batch_size=cfg.max_batch_size,
                                 model_name=model.name, model_versions=(model.version,))
    try:
        values = await asyncio.wait_for(
            asyncio.to_thread(task.run, request.texts, request.parameters),
            cfg.request_timeout_s)
    except TimeoutError:
        raise _timed_out(cfg.request_timeout_s) from None
    payload, headers = encode_text_response(model.name, model.version, request.id, values,
                                            request.outputs)
    return Response(payload, status_code=200, headers=headers)


async def _parse(cfg: RuntimeConfig, model: LoadedModel, header: bytearray,
                 binary: memoryview | torch.Tensor, header_length_given: bool) -> InferRequest:
    """The request, checked against the model's signature and the limits; a large JSON-only
    body is pre-validated (declared sizes) before its data is parsed."""
    max_batch_size = cfg.max_batch_size if model.batchable else max(1, model.inputs[0].shape[0])
    if len(header) > LARGE_JSON_BYTES and len(binary) == 0:
        header, binary = await anyio.to_thread.run_sync(
            lambda: prevalidate_json(header, inputs=model.inputs, max_batch_size=max_batch_size,
                                     max_elements=cfg.max_elements))
    return await _maybe_in_thread(
        len(header) > _INLINE_BYTES,
        lambda: parse_infer_parts(
            header, binary, inputs=model.inputs, outputs=model.outputs,
            max_batch_size=max_batch_size, max_elements=cfg.max_elements,
            model_name=model.name, model_versions=(model.version,),
            header_length_given=header_length_given))


def _submit(runtime: Runtime, slot: ModelSlot, batcher: Batcher, parsed: InferRequest
            ) -> tuple[Future[dict[str, torch.Tensor]], Batcher]:
    """Queue ``parsed`` on ``batcher``, or on the slot's new batcher if the key watcher
    swapped in a newer version while the body was read (rotation without failed requests).
    Returns the future and the batcher that took it."""
    try:
        return batcher.submit(parsed), batcher
    except ShuttingDown:
        current = slot.batcher
        if current is None and slot.error is not None and not runtime.stopping:
            raise ModelNotReady(f"model {slot.name!r} is not ready ({slot.state}: "
                                f"{slot.error})") from None
        if current is None or current is batcher or runtime.stopping:
            raise
        return current.submit(parsed), current


async def _outcome(future: Future[dict[str, torch.Tensor]], timeout: float
                   ) -> dict[str, torch.Tensor]:
    """The worker's outputs; :class:`InferenceTimeout` (the job cancelled if still queued)
    after ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        future.cancel()
        raise _timed_out(timeout) from None


def _timed_out(timeout: float) -> InferenceTimeout:
    return InferenceTimeout(f"inference did not finish within {timeout:g} s")


async def _maybe_in_thread(offload: bool, fn: Callable[[], _T]) -> _T:
    return await anyio.to_thread.run_sync(fn) if offload else fn()
