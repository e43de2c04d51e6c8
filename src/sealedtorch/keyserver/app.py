"""The keyserver's HTTP application (FastAPI): the request envelope, the error handlers, and
the routers of :mod:`.routes` (a thin translation of JSON to :class:`Keyserver` calls).

Every error leaves as ``application/problem+json`` (RFC 7807) with a stable ``type`` URI
(see :mod:`.problems`).  Bodies are limited in size before they are parsed.  Each request
gets an id (``X-Request-Id``), used in the access log, the audit log and problem bodies.
The OpenAPI description is served at ``/v1/openapi.json``.

The hot path (challenge, sim attest, key release) runs on the event loop: each is a few
signature/HPKE operations and one local SQLite commit, cheaper than the hop to a worker
thread (measured ~0.3 ms a request).  Hardware evidence (which may fetch collateral over
the network) and the admin API run in the thread pool.

The attestation endpoints (challenge and attest) are rate limited per client address, in
memory, per replica (:class:`RateLimiter`), in the request envelope *before the body is
read or parsed*, so a malformed flood is refused as cheaply as a well-formed one; a refused
request is ``429`` with ``Retry-After`` and is counted in the metrics but not audited (a
flood must not grow the audit chain).  Failures of unauthenticated requests that get past
the limiter are audited individually up to a budget per minute, then counted and
summarised (see :class:`~.audit_recorder.FailureSampler`).  ``GET /metrics`` serves Prometheus
text.  A database outage answers ``503`` (``Retry-After: 1``) until the store is back.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import crypto
from ..errors import RateLimited, RequestError, SealedTorchError
from .audit_recorder import RequestContext
from .problems import internal_problem, problem_for
from .protocol import PROBLEM_MEDIA_TYPE
from .routes import ROUTERS, request_context, service_of
from .service import Keyserver

access_log = logging.getLogger("sealedtorch.keyserver.access")
log = logging.getLogger("sealedtorch.keyserver")

_EVENTS = (("/v1/attest/challenge", "attest.challenge"), ("/v1/attest", "attest"),
           ("/v1/keys", "release"), ("/v1/admin/models", "register"),
           ("/v1/admin/policies", "policy.set"), ("/v1/admin/rotations", "rotate"),
           ("/v1/admin/revocations", "revoke"), ("/v1/admin/retirements", "retire"),
           ("/v1/admin/tokens/revocations", "token.revoke"),
           ("/v1/admin/tokens/rotations", "token.rotate"),
           ("/v1/admin/tokens", "token.create"), ("/v1/admin/audit", "audit.read"))


@dataclass(frozen=True)
class RateLimit:
    """Per client address: ``rate`` requests a second on average, bursts up to ``burst``."""

    rate: float = 50.0
    burst: float = 200.0


class RateLimiter:
    """Token buckets per client address, in this process's memory (so per replica: with
    N replicas behind a balancer a client gets up to N times the rate).  At most
    ``max_clients`` buckets are kept; the least recently seen are dropped first."""

    def __init__(self, limit: RateLimit, *, max_clients: int = 65_536,
                 clock: Any = time.monotonic) -> None:
        if limit.rate <= 0 or limit.burst < 1:
            raise ValueError("rate limit: rate must be > 0 and burst >= 1")
        self.limit = limit
        self._max = max_clients
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """0 if ``client`` may go on now (and charge it one request), else the seconds
        until it may."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.limit.burst, now))
            tokens = min(self.limit.burst, tokens + (now - last) * self.limit.rate)
            if tokens >= 1:
                tokens -= 1
                wait = 0.0
            else:
                wait = (1 - tokens) / self.limit.rate
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return wait


#: Rate-limited paths (the attestation endpoints) and their metric label.
_LIMITED = {"/v1/attest/challenge": "challenge", "/v1/attest": "attest"}


def _event_for(path: str) -> str:
    for prefix, event in _EVENTS:
        if path == prefix or path.startswith(prefix + "/"):
            return event
    return "request"


def _problem_response(body: dict[str, Any], retry_after: float | None = None
                      ) -> JSONResponse:
    headers: dict[str, str] = {}
    if body["status"] == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="sealedtorch-keyserver"'
    if body["status"] in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_MEDIA_TYPE,
                        headers=headers or None)


class _Envelope:
    """Pure-ASGI outer layer: request id, body-size limit, access log.

    The body is read (up to ``max_body``) before the application sees it, whatever the
    Content-Length header claims, so an oversized or endless body is refused early.
    """

    def __init__(self, app: ASGIApp, service: Keyserver, max_body: int,
                 limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.service = service
        self.max_body = max_body
        self.limiter = limiter

    def _limited(self, scope: Scope, client_addr: str | None) -> tuple[str, float] | None:
        """(endpoint, seconds to wait) if this attestation request is over its client's
        rate; decided from the path alone, before any byte of the body is read."""
        if self.limiter is None:
            return None
        endpoint = _LIMITED.get(scope.get("path", ""))
        if endpoint is None:
            return None
        wait = self.limiter.wait(client_addr or "?")
        return (endpoint, wait) if wait > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = crypto.random_bytes(8).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        client = scope.get("client")
        client_addr = client[0] if client else None
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            over = self._limited(scope, client_addr)
            if over is not None:
                endpoint, wait = over
                self.service.metrics.rate_limited.inc(endpoint=endpoint)
                exc_rl = RateLimited(f"too many attestation requests from this address; "
                                     f"retry in {wait:.1f} s", retry_after=wait)
                response = _problem_response(problem_for(exc_rl, request_id=request_id),
                                             exc_rl.retry_after)
                await response(scope, receive, send_wrapper)
                return
            body = await self._read_body(scope, receive)
            if body is None:
                exc = RequestError(
                    f"request body exceeds the limit of {self.max_body} bytes", http_status=413)
                ctx = RequestContext(client_addr, request_id)
                event = _event_for(scope.get("path", ""))
                await run_in_threadpool(self.service.record_request_error, ctx, event, exc)
                response = _problem_response(problem_for(exc, request_id=request_id))
                await response(scope, receive, send_wrapper)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_wrapper)
        finally:
            access_log.info(
                "%s %s %s", scope.get("method"), scope.get("path"), status,
                extra={"fields": {"method": scope.get("method"), "path": scope.get("path"),
                                  "status": status, "client": client_addr,
                                  "request_id": request_id,
                                  "ms": round((time.perf_counter() - start) * 1000, 2)}})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        return None
                except ValueError:
                    pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def _sealedtorch_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SealedTorchError)
    return _problem_response(problem_for(exc, request_id=request_context(request).request_id),
                             exc.retry_after)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors()[:10]:  # never echo "input": it may hold key material
        loc = ".".join(str(p) for p in err.get("loc", ()))
        problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    error = RequestError("invalid request: " + "; ".join(problems))
    ctx = request_context(request)
    await run_in_threadpool(service_of(request).record_request_error, ctx,
                            _event_for(request.url.path), error)
    return _problem_response(problem_for(error, request_id=ctx.request_id))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    body = {"type": "about:blank", "title": str(exc.detail), "status": exc.status_code,
            "detail": str(exc.detail), "request_id": request_context(request).request_id}
    return _problem_response(body)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_context(request).request_id
    log.error("internal error handling %s %s: %s", request.method, request.url.path,
              type(exc).__name__, exc_info=exc,
              extra={"fields": {"request_id": request_id}})
    return _problem_response(internal_problem(request_id=request_id))


def create_app(service: Keyserver, *, max_body: int = 1 << 20,
               rate_limit: RateLimit | None = None) -> ASGIApp:
    """The ASGI application serving ``service``; ``rate_limit`` (None: off) applies to the
    attestation endpoints, per client address."""
    app = FastAPI(
        title="sealedtorch keyserver", version="1",
        description="Attested key release for sealed PyTorch models. See docs/protocol.md.",
        openapi_url="/v1/openapi.json", docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_exception_handler(SealedTorchError, _sealedtorch_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    for router in ROUTERS:
        app.include_router(router)
    limiter = RateLimiter(rate_limit) if rate_limit is not None else None
    return _Envelope(app, service, max_body, limiter)
