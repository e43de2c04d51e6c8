"""The inference server: Open Inference Protocol (KServe v2) REST over TLS, attestation,
metrics, structured logs, graceful shutdown.

Three ways to run it:

- :func:`serve` — the ``sealedtorch serve`` command: blocks until SIGTERM/SIGINT.
- :class:`RuntimeServer` — in-process, uvicorn in a background thread (tests, demos)::

      with RuntimeServer.start([ModelSource("resnet50", path)], keys=keycache_client,
                               sim_platform=platform_dir) as srv:
          srv.wait_ready()
          srv.url, srv.spki          # https://127.0.0.1:PORT, the attested TLS key

- :class:`SubprocessServer` — ``sealedtorch serve`` in a child process, with its bound URL
  read back from an announce file.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{m}``,
``/v2/models/{m}/ready``, ``POST /v2/models/{m}/infer`` (each also under
``/v2/models/{m}/versions/{v}``), ``GET /v1/attestation?nonce=``, ``GET /metrics``.
The server listens (live) at once and loads models in the background; it is ready when every
model has loaded.  A model that fails to load leaves the server unready, and says why in
``/v2/health/ready``, the model's ready endpoint and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..atomicfile import write_atomically
from ..attest import binding
from ..errors import ConfigError, SealedTorchError
from ..hardening import harden_process
from ..keys import KeySource
from ..listen import bind_tcp
from ..logs import configure_logging
from .attestation import RateLimiter, attestation_domain, evidence_document, parse_nonce
from .batching import Batcher, InferenceFailed, QueueFull, ShuttingDown
from .bodies import (
    LARGE_JSON_BYTES,
    SMALL_BODY_BYTES,
    BudgetTimeout,
    ByteBudget,
    prevalidate_json,
)
from .config import RuntimeConfig, load_config
from .kserve import (
    HEADER_LENGTH,
    InvalidRequest,
    PayloadTooLarge,
    parse_infer_parts,
    split_body,
)
from .kserve import encode_infer_response as _encode
from .loader import LoadedModel, resolve_device
from .metrics import CONTENT_TYPE, RuntimeMetrics
from .text_kserve import encode_text_response, parse_text_request
from .tls import ServerTls

__all__ = ["Runtime", "RuntimeServer", "SubprocessServer", "configure_logging", "create_app",
           "parse_listen", "serve", "write_certificate"]

log = logging.getLogger("sealedtorch.runtime")


class Source(Protocol):
    name: str

    def load(self, keys: KeySource | None, config: RuntimeConfig,
             device: torch.device | None = None) -> LoadedModel: ...


# --- the runtime's state ----------------------------------------------------------------

@dataclass
class _Slot:
    name: str
    source: Source | None
    state: str = "loading"  # loading | ready | failed | stopped
    error: BaseException | None = None
    model: LoadedModel | None = None
    batcher: Batcher | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state}
        if self.model is not None:
            out.update(self.model.describe())
        if self.error is not None:
            out["error"] = f"{type(self.error).__name__}: {self.error}"
        return out


@dataclass
class Runtime:
    """Models, their workers, the TLS identity and the attester of one server."""

    config: RuntimeConfig
    tls: ServerTls
    attester: Any = None
    keys: KeySource | None = None
    metrics: RuntimeMetrics = field(default_factory=RuntimeMetrics)
    slots: dict[str, _Slot] = field(default_factory=dict)
    device: torch.device | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _stopping: bool = False
    watcher: Any = None  # the key watcher (.watch.KeyWatcher), once started

    def start_watching(self) -> None:
        """Start re-checking loaded models' keys with the keycache (``key_watch_s``):
        unload on revocation, swap in a newer version (see :mod:`.watch`)."""
        from .watch import KeyWatcher

        if self.watcher is None:
            self.watcher = KeyWatcher(self).start()

    def add(self, item: Source | LoadedModel) -> None:
        if item.name in self.slots:
            raise ConfigError(f"model name {item.name!r} is given twice")
        if isinstance(item, LoadedModel):
            slot = _Slot(item.name, None)
            self.slots[item.name] = slot
            self._activate(slot, item)
        else:
            self.slots[item.name] = _Slot(item.name, item)
            self.metrics.ready.set(0, model=item.name)

    def _activate(self, slot: _Slot, model: LoadedModel) -> None:
        slot.model = model
        slot.batcher = Batcher(model, max_batch_size=self.config.max_batch_size,
                               max_queue=self.config.max_queue,
                               batch_delay_ms=self.config.batch_delay_ms, metrics=self.metrics)
        slot.state = "ready"
        self.metrics.load_seconds.set(model.load_seconds, model=model.name)
        self.metrics.ready.set(1, model=model.name)

    def load_all(self) -> None:
        """Load every pending model, in order (run in a background thread)."""
        try:
            for slot in list(self.slots.values()):
                if slot.state != "loading" or slot.source is None or self._stopping:
                    continue
                try:
                    model = slot.source.load(self.keys, self.config, self.device)
                except Exception as exc:
                    slot.state, slot.error = "failed", exc
                    log.error("model %s failed to load: %s: %s", slot.name, type(exc).__name__,
                              exc, extra={"fields": {"model": slot.name,
                                                     "error_type": type(exc).__name__}})
                    continue
                if self._stopping:
                    model.unload()
                    continue
                self._activate(slot, model)
                log.info("model %s ready", slot.name,
                         extra={"fields": {**model.describe(), "model": slot.name}})
            if self.ready:
                log.info("runtime ready: %d model(s)", len(self.slots))
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return bool(self.slots) and all(s.state == "ready" for s in self.slots.values()) \
            and not self._stopping

    @property
    def failures(self) -> list[_Slot]:
        return [s for s in self.slots.values() if s.state == "failed"]

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def attested_models(self) -> list[dict[str, Any]]:
        out = []
        for s in self.slots.values():
            m = s.model
            entry = {"name": s.name, "model_id": m.model_id if m else None,
                     "key_version": m.key_version if m else None,
                     "arch": m.arch if m else None, "ready": s.state == "ready",
                     "file_sha256": m.file_sha256 if m else None}
            pin = (self.config.models or {}).get(s.name)
            entry["pin"] = None if pin is None else pin.model_dump(mode="json")
            out.append(entry)
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queues, stop the workers, zero the weights."""
        self._stopping = True
        if self.watcher is not None:
            self.watcher.stop(timeout)
        for slot in self.slots.values():
            if slot.batcher is not None:
                slot.batcher.stop(timeout)
            if slot.model is not None:
                slot.model.unload()
            slot.state = "stopped"
            self.metrics.ready.set(0, model=slot.name)


# --- the application --------------------------------------------------------------------

def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int
                     ) -> tuple[bytearray, memoryview | torch.Tensor]:
    """The request body, at most ``limit`` bytes, as (JSON header, binary data).

    With the binary extension and a Content-Length, the binary part is received straight
    into one fresh uint8 tensor, so input tensors can be views of it (no further copy).
    """
    declared = request.headers.get("content-length")
    size: int | None = None
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest("Content-Length is not an integer") from None
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes is larger than the limit "
                                  f"of {limit} bytes (max_request_bytes)")
    split = request.headers.get(HEADER_LENGTH)
    if size is not None and split is None:
        # JSON only, length known: received into one buffer of that size, returned as is
        # (no growing copies, no second copy of the header).
        body = bytearray(size)
        pos = 0
        async for chunk in request.stream():
            end = pos + len(chunk)
            if end > size:
                raise InvalidRequest("request body is longer than its Content-Length")
            body[pos:end] = chunk
            pos = end
        if pos != size:
            raise InvalidRequest(f"request body ended after {pos} of {size} bytes")
        return body, memoryview(b"")
    if size is None or split is None:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(f"request body is larger than the limit of {limit} "
                                      f"bytes (max_request_bytes)")
        header, binary = split_body(body, split)
        return bytearray(header), binary
    try:
        n = int(split)
    except ValueError:
        raise InvalidRequest(f"{HEADER_LENGTH} must be an integer") from None
    if not 0 < n <= size:
        raise InvalidRequest(f"{HEADER_LENGTH} {n} is outside the body of {size} bytes")
    header = bytearray(n)
    data = torch.empty(size - n, dtype=torch.uint8)
    target = memoryview(data.numpy()) if size > n else memoryview(bytearray())
    pos = 0
    async for chunk in request.stream():
        end = pos + len(chunk)
        if end > size:
            raise InvalidRequest("request body is longer than its Content-Length")
        if pos < n:
            k = min(n, end) - pos
            header[pos:pos + k] = chunk[:k]
            if k < len(chunk):
                target[0:end - n] = chunk[k:]
        else:
            target[pos - n:end - n] = chunk
        pos = end
    if pos != size:
        raise InvalidRequest(f"request body ended after {pos} of {size} bytes")
    return header, data


#: Content-Encodings a request body may use (tritonclient's request_compression_algorithm).
_ENCODINGS = ("gzip", "deflate")


def _content_encoding(request: Request) -> str | None:
    """The body's Content-Encoding (None for identity); 400 for one we cannot decode."""
    value = request.headers.get("content-encoding", "").strip().lower()
    if value in ("", "identity"):
        return None
    if value not in _ENCODINGS:
        raise InvalidRequest(f"Content-Encoding {value[:40]!r} is not supported (use gzip, "
                             f"deflate or none)")
    return value


async def _read_encoded_body(request: Request, limit: int
                             ) -> tuple[bytearray, memoryview | torch.Tensor]:
    """A gzip/deflate body, decompressed to at most ``limit`` bytes, as (JSON header,
    binary data).  ``Inference-Header-Content-Length`` counts the decompressed JSON part,
    as tritonclient sends it.  Decompression is bounded: a small body that inflates past
    ``limit`` (a "zip bomb") is refused after ``limit`` bytes of output, never held whole."""
    encoding = _content_encoding(request)
    compressed = bytearray()
    async for chunk in request.stream():
        compressed += chunk
        if len(compressed) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes "
                                  f"(max_request_bytes)")
    body = await anyio.to_thread.run_sync(
        lambda: _inflate(bytes(compressed), encoding or "gzip", limit))
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    return bytearray(header), binary


def _inflate(data: bytes, encoding: str, limit: int) -> bytearray:
    import zlib

    # wbits: 16+15 reads a gzip wrapper; 15 a zlib stream (HTTP "deflate" is zlib-wrapped)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else
                                  zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while pending:
            out += inflater.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise PayloadTooLarge(f"the {encoding} request body decompresses to more than "
                                      f"the limit of {limit} bytes (max_request_bytes)")
            pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        if not inflater.eof:
            raise InvalidRequest(f"the {encoding} request body is truncated")
        if inflater.unused_data:
            raise InvalidRequest(f"{len(inflater.unused_data)} bytes follow the end of the "
                                 f"{encoding} stream")
    except zlib.error as exc:
        raise InvalidRequest(f"the request body is not valid {encoding} data: {exc}") \
            from None
    return out


#: JSON up to this size is parsed/written on the event loop (a thread hop costs more than
#: that); larger documents go to a worker thread so health checks never wait on them.
_INLINE_BYTES = 64 * 1024


async def _maybe_in_thread(offload: bool, fn: Any) -> Any:
    return await anyio.to_thread.run_sync(fn) if offload else fn()


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="sealedtorch runtime", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url=None)
    cfg = runtime.config
    metrics = runtime.metrics
    #: Bytes of request bodies in flight: at most two bodies of the largest allowed size.
    body_budget = ByteBudget(2 * cfg.max_request_bytes)
    attestation_limit = RateLimiter()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown routes (404) and wrong methods (405): the protocol's {"error": ...} body
        if exc.status_code == 404:
            message = f"no such endpoint: {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(400, f"invalid request: {problems}"[:500])

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc, extra={"fields": {"path": request.url.path}})
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    def slot_or_error(name: str, version: str | None) -> _Slot | JSONResponse:
        slot = runtime.slots.get(name)
        if slot is None:
            return _error(404, f"unknown model {name!r} (served: "
                               f"{', '.join(runtime.slots) or 'none'})")
        if slot.state != "ready" or slot.model is None:
            why = f": {type(slot.error).__name__}: {slot.error}" if slot.error else ""
            return _error(503, f"model {name!r} is not ready ({slot.state}{why})")
        if version is not None and version != slot.model.version:
            return _error(404, f"model {name!r} has no version {version!r} (served: "
                               f"{slot.model.version})")
        return slot

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "sealedtorch", "version": __version__,
                "extensions": ["binary_tensor_data", "sealedtorch_attestation", "metrics"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = runtime.ready
        body: dict[str, Any] = {"ready": ok}
        if not ok:
            body["models"] = [s.describe() for s in runtime.slots.values()]
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Any:
        slot = slot_or_error(name, version)
        if isinstance(slot, JSONResponse):
            return slot
        m = slot.model
        assert m is not None
        return {"name": m.name, "versions": [m.version], "platform": "pytorch",
                "inputs": [s.to_json() for s in m.inputs],
                "outputs": [s.to_json() for s in m.outputs],
                "parameters": {"model_id": m.model_id, "key_version": m.key_version,
                               "arch": m.arch, "device": str(m.device),
                               "max_batch_size": cfg.max_batch_size if m.batchable else 0}}

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        slot = runtime.slots.get(name)
        if slot is None:
            return _error(404, f"unknown model {name!r}")
        if version is not None and slot.model is not None and version != slot.model.version:
            return _error(404, f"model {name!r} has no version {version!r} (served: "
                               f"{slot.model.version})")
        if version is not None and slot.model is None and slot.state == "ready":
            return _error(404, f"model {name!r} has no version {version!r}")
        body = {"name": name, "ready": slot.state == "ready", **slot.describe()}
        if slot.model is not None:
            body["version"] = slot.model.version
        return JSONResponse(body, status_code=200 if slot.state == "ready" else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        started = time.perf_counter()
        response = await _infer(name, version, request)
        if name in runtime.slots:
            metrics.requests.inc(model=name, code=str(response.status_code))
            metrics.request_seconds.observe(time.perf_counter() - started, model=name)
        return response

    async def _infer(name: str, version: str | None, request: Request) -> Response:
        slot = slot_or_error(name, version)
        if isinstance(slot, JSONResponse):
            return slot
        batcher = slot.batcher
        if batcher is None:  # unloaded by the key watcher since slot_or_error looked
            return _error(503, f"model {name!r} is not ready ({slot.state}: {slot.error})")
        model = batcher.model  # one read: the key watcher swaps the batcher atomically
        declared = request.headers.get("content-length", "")
        want = min(int(declared), cfg.max_request_bytes) if declared.isdigit() \
            else cfg.max_request_bytes
        if want <= SMALL_BODY_BYTES:  # small declared bodies never wait behind large ones
            return await _infer_body(name, slot, model, batcher, request)
        try:
            reserved = await body_budget.acquire(want, cfg.request_timeout_s)
        except BudgetTimeout as exc:
            metrics.rejected.inc(model=name, reason="BudgetTimeout")
            return _error(503, str(exc), {"retry-after": "1"})
        try:
            return await _infer_body(name, slot, model, batcher, request)
        finally:
            await body_budget.release(reserved)

    async def _infer_body(name: str, slot: _Slot, model: LoadedModel, batcher: Any,
                          request: Request) -> Response:
        try:
            # compressed bodies are decompressed within max_request_bytes, under the same
            # byte budget as any other body (reserved by the caller)
            if _content_encoding(request) is not None:
                header, binary = await _read_encoded_body(request, cfg.max_request_bytes)
            else:
                header, binary = await _read_body(request, cfg.max_request_bytes)
            header_length_given = request.headers.get(HEADER_LENGTH) is not None
            if model.text is not None:  # transformers: text in and out, tokenized here
                return await _infer_text(model, header, binary)
            if len(header) > LARGE_JSON_BYTES and len(binary) == 0:
                header, binary = await anyio.to_thread.run_sync(
                    lambda: prevalidate_json(
                        header, inputs=model.inputs,
                        max_batch_size=cfg.max_batch_size if model.batchable else max(
                            1, model.inputs[0].shape[0]),
                        max_elements=cfg.max_elements))
            parsed = await _maybe_in_thread(
                len(header) > _INLINE_BYTES,
                lambda: parse_infer_parts(
                    header, binary, inputs=model.inputs,
                    outputs=model.outputs,
                    max_batch_size=cfg.max_batch_size if model.batchable else max(
                        1, model.inputs[0].shape[0]),
                    max_elements=cfg.max_elements, model_name=model.name,
                    model_versions=(model.version,),
                    header_length_given=header_length_given))
            try:
                future = batcher.submit(parsed)
            except ShuttingDown:
                # the key watcher swapped in a newer version while this body was read:
                # run it there (rotation without failed requests)
                current = slot.batcher
                if current is None and slot.error is not None and not runtime._stopping:
                    return _error(503, f"model {name!r} is not ready ({slot.state}: "
                                       f"{slot.error})")
                if current is None or current is batcher or runtime._stopping:
                    raise
                batcher = current
                model = batcher.model
                future = batcher.submit(parsed)
            try:
                outputs = await asyncio.wait_for(asyncio.wrap_future(future),
                                                 cfg.request_timeout_s)
            except TimeoutError:
                future.cancel()
                return _error(504, f"inference did not finish within "
                                   f"{cfg.request_timeout_s:g} s")
            json_elements = sum(outputs[r.name].numel() for r in parsed.outputs
                                if not r.binary)
            payload, headers = await _maybe_in_thread(
                json_elements > _INLINE_BYTES // 16,
                lambda: _encode(model.name, model.version, parsed.id, outputs,
                                parsed.outputs))
            return Response(payload, status_code=200, headers=headers)
        except (InvalidRequest, PayloadTooLarge, InferenceFailed) as exc:
            reason = type(exc).__name__
            metrics.rejected.inc(model=name, reason=reason)
            log.info("rejected request for %s: %s", name, exc,
                     extra={"fields": {"model": name, "reason": reason}})
            return _error(exc.http_status, str(exc))
        except (QueueFull, ShuttingDown) as exc:
            return _error(503, str(exc), {"retry-after": "1"})

    async def _infer_text(model: LoadedModel, header: Any, binary: Any) -> Response:
        task = model.text
        request = parse_text_request(header, binary, outputs=model.outputs,
                                     max_batch_size=cfg.max_batch_size,
                                     model_name=model.name, model_versions=(model.version,))
        try:
            values = await asyncio.wait_for(
                asyncio.to_thread(task.run, request.texts, request.parameters),
                cfg.request_timeout_s)
        except TimeoutError:
            return _error(504, f"inference did not finish within {cfg.request_timeout_s:g} s")
        payload, headers = encode_text_response(model.name, model.version, request.id, values,
                                                request.outputs)
        return Response(payload, status_code=200, headers=headers)

    from .openai_api import openai_router

    app.include_router(openai_router(runtime))  # /v1/completions, /v1/chat/completions

    @app.get("/v1/attestation")
    async def attestation(request: Request, nonce: str | None = None) -> JSONResponse:
        wait = attestation_limit.take(request.client.host if request.client else "?")
        if wait > 0:
            metrics.attestations.inc(outcome="rate_limited")
            return _error(429, f"too many attestation requests from this address; retry "
                               f"after {wait:.1f} s", {"retry-after": str(max(1, round(wait)))})
        if runtime.attester is None:
            metrics.attestations.inc(outcome="unavailable")
            return _error(503, "this runtime has no attester (no TEE configured)")
        try:
            raw_nonce = parse_nonce(nonce)
        except InvalidRequest as exc:
            metrics.attestations.inc(outcome="bad_request")
            return _error(400, str(exc))
        spki = runtime.tls.spki
        origin = "ephemeral" if runtime.tls.generated else "file"
        try:
            evidence = await anyio.to_thread.run_sync(
                runtime.attester.evidence,
                binding.report_data(raw_nonce, spki, domain=attestation_domain(origin)))
        except SealedTorchError as exc:
            metrics.attestations.inc(outcome="error")
            log.error("attestation failed: %s", exc)
            return _error(503, f"the TEE did not produce evidence: {exc}")
        metrics.attestations.inc(outcome="ok")
        return JSONResponse(evidence_document(
            evidence, nonce=raw_nonce, spki=spki, models=runtime.attested_models(),
            config=cfg, tls_key_origin=origin))

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        for slot in runtime.slots.values():
            if slot.batcher is not None:
                metrics.queue_depth.set(slot.batcher.depth, model=slot.name)
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app


# --- assembling and running -------------------------------------------------------------

def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen expects HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _bind(host: str, port: int) -> socket.socket:
    return bind_tcp(host, port)


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    shown = "[::1]" if shown == "::" else (f"[{shown}]" if ":" in shown else shown)
    return f"https://{shown}:{port}"


def build_runtime(models: Sequence[Source | LoadedModel], *, keys: KeySource | None = None,
                  config: RuntimeConfig | str | os.PathLike[str] | None = None,
                  tls_cert: str | os.PathLike[str] | None = None,
                  tls_key: str | os.PathLike[str] | None = None, hosts: Sequence[str] = (),
                  tee: str | None = "auto", sim_platform: str | os.PathLike[str] | None = None,
                  attester: Any = None) -> Runtime:
    """Everything but the network: config, TLS identity, attester, model slots."""
    cfg = load_config(config)
    if not models:
        raise ConfigError("no models to serve: give at least one --model NAME=PATH.sealed")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = ServerTls.from_files(tls_cert, tls_key) if tls_cert is not None and tls_key \
        is not None else ServerTls.generate(hosts)
    if attester is None and tee is not None:
        from ..attest.attesters import get_attester

        attester = get_attester(tee, sim_platform=sim_platform,
                                runtime_config=cfg.canonical_bytes())
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    runtime = Runtime(cfg, tls, attester=attester, keys=keys, device=resolve_device(cfg))
    for m in models:
        runtime.add(m)
    return runtime


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (:func:`serve` and the thread runner stop it
    themselves, and must still drain the workers after it returns), with a hook that runs
    once it listens."""

    after_startup: Any = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit and self.after_startup is not None:
            self.after_startup()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Idle keep-alive connections are dropped at once: closing them politely waits for
        # the client's TLS close_notify, which an idle client never sends.  Connections with
        # a request in flight finish it first (uvicorn's graceful shutdown).
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if transport is not None and (cycle is None or cycle.response_complete):
                transport.abort()
        await super().shutdown(sockets=sockets)


def _uvicorn(runtime: Runtime, sock: socket.socket, graceful: float) -> _Server:
    config = uvicorn.Config(
        create_app(runtime), log_config=None, access_log=False, lifespan="off",
        ssl_context_factory=lambda _config, _default: runtime.tls.context,
        timeout_graceful_shutdown=max(1, int(graceful)), server_header=False,
        backlog=1024)
    del sock
    return _Server(config)


@dataclass
class RuntimeServer:
    """A runtime serving in a background thread of this process."""

    runtime: Runtime
    server: _Server
    thread: threading.Thread
    loader: threading.Thread
    url: str
    sock: socket.socket = field(repr=False)

    @classmethod
    def start(cls, models: Sequence[Source | LoadedModel], *, keys: KeySource | None = None,
              config: RuntimeConfig | str | os.PathLike[str] | None = None,
              host: str = "127.0.0.1", port: int = 0,
              tls_cert: str | os.PathLike[str] | None = None,
              tls_key: str | os.PathLike[str] | None = None, tee: str | None = "auto",
              sim_platform: str | os.PathLike[str] | None = None, attester: Any = None,
              graceful_timeout: float = 5.0, timeout: float = 10.0) -> RuntimeServer:
        """Listen on ``host:port`` (0: any free port), then load ``models`` in the
        background.  Returns as soon as the server accepts connections (live)."""
        runtime = build_runtime(models, keys=keys, config=config, tls_cert=tls_cert,
                                tls_key=tls_key, hosts=(host,), tee=tee,
                                sim_platform=sim_platform, attester=attester)
        sock = _bind(host, port)
        server = _uvicorn(runtime, sock, graceful_timeout)
        bound = sock.getsockname()[1]
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                  name=f"runtime-{bound}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise ConfigError("the runtime's HTTP server did not start")
            time.sleep(0.005)
        loader = threading.Thread(target=runtime.load_all, name="runtime-loader", daemon=True)
        loader.start()
        runtime.start_watching()
        return cls(runtime, server, thread, loader, _url(host, bound), sock)

    @property
    def spki(self) -> bytes:
        return self.runtime.tls.spki

    @property
    def cert_pem(self) -> bytes:
        return self.runtime.tls.cert_pem

    def wait_ready(self, timeout: float = 120.0) -> RuntimeServer:
        """Block until every model is loaded; raise the first load failure."""
        if not self.runtime.wait_loaded(timeout):
            raise TimeoutError(f"models not loaded within {timeout} s")
        failures = self.runtime.failures
        if failures and failures[0].error is not None:
            raise failures[0].error
        return self

    def stop(self) -> None:
        """Stop accepting, finish requests in flight, drain workers, zero weights."""
        self.runtime._stopping = True
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.loader.join(timeout=30)
        self.runtime.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RuntimeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(models: Sequence[Source], *, keys: KeySource | None,
          config: RuntimeConfig | str | os.PathLike[str] | None = None,
          listen: str = "127.0.0.1:8443", tls_cert: str | os.PathLike[str] | None = None,
          tls_key: str | os.PathLike[str] | None = None, tee: str = "auto",
          sim_platform: str | os.PathLike[str] | None = None,
          announce: str | os.PathLike[str] | None = None, exit_on_load_failure: bool = True,
          graceful_timeout: float = 10.0, log_format: str = "json",
          write_cert: str | os.PathLike[str] | None = None) -> int:
    """``sealedtorch serve``: run until SIGTERM/SIGINT (then drain and stop), or until a
    model fails to load (exit status 2 with the reason) unless ``exit_on_load_failure`` is
    false, in which case the server stays up, live but unready."""
    configure_logging(log_format)
    hardening_problems = harden_process("runtime")
    host, port = parse_listen(listen)
    runtime = build_runtime(models, keys=keys, config=config, tls_cert=tls_cert,
                            tls_key=tls_key, hosts=(host,), tee=tee, sim_platform=sim_platform)
    sock = _bind(host, port)
    if write_cert is not None:
        try:
            write_certificate(runtime.tls, write_cert)
        except BaseException:
            sock.close()
            raise
    bound = sock.getsockname()[1]
    server = _uvicorn(runtime, sock, graceful_timeout)
    url = _url(host, bound)
    failure: list[BaseException] = []

    def load() -> None:
        runtime.load_all()
        if runtime.failures and exit_on_load_failure and not runtime._stopping:
            err = runtime.failures[0].error
            failure.append(err if err is not None else ConfigError("model failed to load"))
            server.should_exit = True

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: draining requests in flight, then stopping", signum)
        server.force_exit = server.should_exit  # a second signal: stop now
        runtime._stopping = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    loader = threading.Thread(target=load, name="runtime-loader", daemon=True)

    def started() -> None:
        log.info("runtime listening on %s", url, extra={"fields": {
            "url": url, "tls_spki_sha256": runtime.tls.spki_sha256,
            "tls_generated": runtime.tls.generated, "models": list(runtime.slots),
            "device": str(runtime.device), "hardened": not hardening_problems,
            "config_sha256": _sha256(runtime.config.canonical_bytes())}})
        if announce is not None:
            _announce(Path(announce), {"url": url, "pid": os.getpid(),
                                       "tls_spki_sha256": runtime.tls.spki_sha256,
                                       "cert_pem": runtime.tls.cert_pem.decode()})
        loader.start()
        runtime.start_watching()

    server.after_startup = started

    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        runtime._stopping = True
        if loader.is_alive():
            loader.join(timeout=graceful_timeout)
        runtime.close(graceful_timeout)
        sock.close()
        log.info("runtime stopped")
    if failure:
        raise failure[0]
    return 0


def write_certificate(tls: ServerTls, path: str | os.PathLike[str]) -> Path:
    """Write the serving certificate (and its throwaway CA, if generated) to ``path``
    (``serve --write-cert``), atomically, world-readable: it is public.  A client may pin
    it only after checking that its key is the one ``/v1/attestation`` binds (see
    docs/runtime.md); the file itself proves nothing."""
    target = Path(path)
    try:
        write_atomically(target, tls.trust_pem, mode=0o644)
    except OSError as exc:
        raise ConfigError(f"--write-cert: cannot write {target}: {exc.strerror}") from None
    log.info("wrote the TLS certificate to %s", target,
             extra={"fields": {"path": str(target), "tls_spki_sha256": tls.spki_sha256}})
    return target


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _announce(path: Path, doc: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(doc).encode(), mode=0o644)


# --- a runtime in a child process -------------------------------------------------------

@dataclass
class SubprocessServer:
    """``sealedtorch serve`` in a child process (what the demo and fault tests use)."""

    process: subprocess.Popen[bytes]
    url: str
    cert_pem: bytes
    log_path: Path

    @classmethod
    def start(cls, args: Sequence[str], *, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> SubprocessServer:
        """Run ``sealedtorch serve ARGS`` (give ``--listen 127.0.0.1:0`` for a free port);
        return once it listens.  Its log goes to a temporary file (:attr:`log_path`)."""
        work = Path(tempfile.mkdtemp(prefix="sealedtorch-serve-"))
        announce = work / "announce.json"
        log_path = work / "serve.log"
        cmd = [sys.executable, "-m", "sealedtorch.cli", "serve", *args,
               "--announce", str(announce)]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=env)
        deadline = time.monotonic() + timeout
        while not announce.exists():
            if process.poll() is not None:
                raise ConfigError(f"sealedtorch serve exited with status {process.returncode}:"
                                  f" {log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                process.kill()
                raise ConfigError(f"sealedtorch serve did not listen within {timeout} s")
            time.sleep(0.02)
        doc = json.loads(announce.read_text())
        return cls(process, doc["url"], doc["cert_pem"].encode(), log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> SubprocessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

