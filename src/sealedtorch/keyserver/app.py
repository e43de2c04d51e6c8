"""The keyserver's HTTP API (FastAPI): a thin translation of JSON to :class:`Keyserver` calls.

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
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import crypto
from ..errors import RateLimited, RequestError, SealedTorchError
from . import protocol
from .audit import iso
from .audit_recorder import RequestContext
from .metrics import CONTENT_TYPE
from .problems import internal_problem, problem_for
from .protocol import PROBLEM_MEDIA_TYPE
from .service import Keyserver
from .store import KeyState

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


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


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
                await _run_sync(self.service.record_request_error, ctx, event, exc)
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


async def _run_sync(fn: Any, *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _ctx(request: Request) -> RequestContext:
    return RequestContext(request.client.host if request.client else None,
                          getattr(request.state, "request_id", None))


def create_app(service: Keyserver, *, max_body: int = 1 << 20,
               rate_limit: RateLimit | None = None) -> ASGIApp:
    """The ASGI application serving ``service``; ``rate_limit`` (None: off) applies to the
    attestation endpoints, per client address."""
    app = FastAPI(
        title="sealedtorch keyserver", version="1",
        description="Attested key release for sealed PyTorch models. See docs/protocol.md.",
        openapi_url="/v1/openapi.json", docs_url=None, redoc_url=None)
    app.state.service = service

    limiter = RateLimiter(rate_limit) if rate_limit is not None else None
    # A local SQLite commit is cheaper than a hop to a worker thread; a network database's
    # round trips are not, and must not stall the event loop (stores say which they are).
    inline = bool(getattr(service.store, "inline", True))

    async def hot(fn: Any, *args: Any) -> Any:
        return fn(*args) if inline else await _run_sync(fn, *args)

    @app.exception_handler(SealedTorchError)
    async def _sealedtorch_error(request: Request, exc: SealedTorchError) -> JSONResponse:
        return _problem_response(problem_for(exc, request_id=_ctx(request).request_id),
                                 exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:10]:  # never echo "input": it may hold key material
            loc = ".".join(str(p) for p in err.get("loc", ()))
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
        error = RequestError("invalid request: " + "; ".join(problems))
        ctx = _ctx(request)
        await _run_sync(service.record_request_error, ctx, _event_for(request.url.path), error)
        return _problem_response(problem_for(error, request_id=ctx.request_id))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"type": "about:blank", "title": str(exc.detail), "status": exc.status_code,
                "detail": str(exc.detail), "request_id": _ctx(request).request_id}
        return _problem_response(body)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = _ctx(request).request_id
        log.error("internal error handling %s %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc_info=exc,
                  extra={"fields": {"request_id": request_id}})
        return _problem_response(internal_problem(request_id=request_id))

    # ---------------------------------------------------------------- operations

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process serves HTTP")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Readiness: the store answers")
    def readyz() -> Any:
        try:
            service.ready()
        except Exception as exc:
            log.error("not ready: %s", exc)
            return JSONResponse({"status": "unavailable"}, status_code=503,
                                headers={"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
             summary="Prometheus metrics (text exposition format 0.0.4)")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics_text(), media_type=CONTENT_TYPE)

    # ---------------------------------------------------------------- attestation

    @app.post("/v1/attest/challenge", tags=["attestation"], response_model=None,
              responses={200: {"model": protocol.ChallengeResponse}},
              summary="A single-use nonce to bind into evidence")
    async def challenge(req: protocol.ChallengeRequest, request: Request) -> dict[str, str]:
        ch = await hot(service.challenge, req.tee, _ctx(request))
        return {"nonce": protocol.b64encode(ch.nonce), "expires_at": iso(ch.expires_at)}

    @app.post("/v1/attest", tags=["attestation"], response_model=None,
              responses={200: {"model": protocol.AttestResponse}},
              summary="Verify evidence; answer an attestation-result token")
    async def attest(req: protocol.AttestRequest, request: Request) -> dict[str, Any]:
        if req.tee == "sim":  # one signature check: cheaper inline than a thread hop
            issued = await hot(service.attest, req, _ctx(request))
        else:  # DCAP/SNP verification may fetch collateral: keep the event loop free
            issued = await _run_sync(service.attest, req, _ctx(request))
        info = issued.info
        return {"token": issued.token, "token_type": "Bearer",
                "expires_at": iso(info.expires_at), "role": info.role.value,
                "tee": info.claims.tee.value, "insecure": info.claims.insecure,
                "claims": info.claims.to_json()}

    @app.get("/v1/keys", tags=["keys"], response_model=None,
             responses={200: {"model": protocol.KeysResponse}},
             summary="Every key this attested identity may have, HPKE-sealed to its key")
    async def keys_all(request: Request,
                 tlog_since: int | None = Query(None, ge=0, le=2**62),
                 authorization: str | None = Header(None)) -> dict[str, Any]:
        keys, receipt = await hot(functools.partial(service.release_with_receipt,
                                                    since=tlog_since),
                                  _bearer(authorization), _ctx(request))
        return {"keys": [k.to_json() for k in keys], "receipt": receipt}

    @app.get("/v1/keys/{model_id:path}", tags=["keys"], response_model=None,
             responses={200: {"model": protocol.KeysResponse}},
             summary="One model's key (latest active version unless ?version=)")
    async def keys_one(model_id: str, request: Request,
                 version: int | None = Query(None, ge=1, le=2**32 - 1),
                 tlog_since: int | None = Query(None, ge=0, le=2**62),
                 authorization: str | None = Header(None)) -> dict[str, Any]:
        keys, receipt = await hot(functools.partial(service.release_with_receipt,
                                                    model_id=model_id, version=version,
                                                    since=tlog_since),
                                  _bearer(authorization), _ctx(request))
        return {"keys": [k.to_json() for k in keys], "receipt": receipt}

    # ---------------------------------------------------------------- administration

    def admin(request: Request, authorization: str | None, action: str) -> Any:
        return service.authenticate_admin(_bearer(authorization), _ctx(request), action)

    @app.get("/v1/admin/models", tags=["admin"], response_model=protocol.ModelsResponse)
    def list_models(request: Request,
                    authorization: str | None = Header(None)) -> protocol.ModelsResponse:
        who = admin(request, authorization, "admin.list")
        return protocol.ModelsResponse(models=service.list_models(who, _ctx(request)))

    @app.get("/v1/admin/models/{model_id:path}", tags=["admin"],
             response_model=protocol.ModelInfo)
    def get_model(model_id: str, request: Request,
                  authorization: str | None = Header(None)) -> protocol.ModelInfo:
        who = admin(request, authorization, "admin.get")
        return service.list_models(who, _ctx(request), model_id)[0]

    @app.post("/v1/admin/models", tags=["admin"], status_code=201,
              response_model=protocol.ModelInfo, summary="Register a model key and policy")
    def register(req: protocol.RegisterRequest, request: Request,
                 authorization: str | None = Header(None)) -> protocol.ModelInfo:
        who = admin(request, authorization, "register")
        return service.register(who, _ctx(request), req)

    @app.put("/v1/admin/policies", tags=["admin"], response_model=protocol.ModelInfo,
             summary="Replace a model's policy")
    def set_policy(req: protocol.PolicyRequest, request: Request,
                   authorization: str | None = Header(None)) -> protocol.ModelInfo:
        who = admin(request, authorization, "policy.set")
        return service.set_policy(who, _ctx(request), req)

    @app.post("/v1/admin/rotations", tags=["admin"], status_code=201,
              response_model=protocol.RotateResponse, summary="Add a new key version")
    def rotate(req: protocol.RotateRequest, request: Request,
               authorization: str | None = Header(None)) -> protocol.RotateResponse:
        who = admin(request, authorization, "rotate")
        return service.rotate(who, _ctx(request), req)

    @app.post("/v1/admin/revocations", tags=["admin"],
              response_model=protocol.StateChangeResponse,
              summary="Stop releasing a model (or one version) immediately")
    def revoke(req: protocol.StateChangeRequest, request: Request,
               authorization: str | None = Header(None)) -> protocol.StateChangeResponse:
        who = admin(request, authorization, "revoke")
        return service.change_state(who, _ctx(request), req, KeyState.REVOKED)

    @app.post("/v1/admin/retirements", tags=["admin"],
              response_model=protocol.StateChangeResponse,
              summary="Retire a model (or one version): no more releases, key erased")
    def retire(req: protocol.StateChangeRequest, request: Request,
               authorization: str | None = Header(None)) -> protocol.StateChangeResponse:
        who = admin(request, authorization, "retire")
        return service.change_state(who, _ctx(request), req, KeyState.RETIRED)

    @app.post("/v1/admin/tokens", tags=["admin"], status_code=201,
              response_model=protocol.TokenCreateResponse,
              summary="Create an admin, owner or auditor token (admins only)")
    def create_token(req: protocol.TokenCreateRequest, request: Request,
                     authorization: str | None = Header(None)
                     ) -> protocol.TokenCreateResponse:
        who = admin(request, authorization, "token.create")
        return service.create_token(who, _ctx(request), req)

    @app.get("/v1/admin/tokens", tags=["admin"], response_model=protocol.TokensResponse,
             summary="List tokens (ids, names, roles; never the tokens) (admins only)")
    def list_tokens(request: Request,
                    authorization: str | None = Header(None)) -> protocol.TokensResponse:
        who = admin(request, authorization, "token.list")
        return protocol.TokensResponse(tokens=service.list_tokens(who, _ctx(request)))

    @app.post("/v1/admin/tokens/revocations", tags=["admin"],
              response_model=protocol.TokenInfo, summary="Revoke a token now (admins only)")
    def revoke_token(req: protocol.TokenRevokeRequest, request: Request,
                     authorization: str | None = Header(None)) -> protocol.TokenInfo:
        who = admin(request, authorization, "token.revoke")
        return service.revoke_token(who, _ctx(request), req.token_id)

    @app.post("/v1/admin/tokens/rotations", tags=["admin"], status_code=201,
              response_model=protocol.TokenCreateResponse,
              summary="Replace a token by a new one of the same identity; the old one is "
                      "revoked (admins only)")
    def rotate_token(req: protocol.TokenRotateRequest, request: Request,
                     authorization: str | None = Header(None)
                     ) -> protocol.TokenCreateResponse:
        who = admin(request, authorization, "token.rotate")
        return service.rotate_token(who, _ctx(request), req)

    @app.get("/v1/admin/audit", tags=["admin"], response_model=protocol.AuditResponse,
             summary="Audit records (admins and auditors: all; owners: their own models')")
    def read_audit(request: Request, model_id: str | None = Query(None, max_length=1024),
                   since: float | None = Query(None, ge=0, le=1e11,
                                               description="Unix time (seconds)"),
                   after_seq: int | None = Query(None, ge=0, le=2**62),
                   limit: int = Query(1000, ge=1, le=10_000),
                   authorization: str | None = Header(None)) -> protocol.AuditResponse:
        who = admin(request, authorization, "audit.read")
        return service.read_audit(who, _ctx(request), model_id=model_id, since=since,
                                  after_seq=after_seq, limit=limit)

    # ---------------------------------------------------------------- transparency log

    @app.get("/v1/audit/checkpoint", tags=["audit"],
             response_model=protocol.CheckpointResponse,
             summary="The transparency log's current signed checkpoint (any admin token)")
    def audit_checkpoint(request: Request, authorization: str | None = Header(None)
                         ) -> protocol.CheckpointResponse:
        return service.audit_checkpoint(admin(request, authorization, "audit.checkpoint"))

    @app.get("/v1/audit/proof/inclusion", tags=["audit"],
             response_model=protocol.InclusionProofResponse,
             summary="RFC 9162 inclusion proof of one leaf (any admin token)")
    def audit_inclusion(request: Request, index: int = Query(ge=0, le=2**62),
                        size: int | None = Query(None, ge=1, le=2**62),
                        authorization: str | None = Header(None)
                        ) -> protocol.InclusionProofResponse:
        who = admin(request, authorization, "audit.proof")
        return service.audit_inclusion(who, index, size)

    @app.get("/v1/audit/proof/consistency", tags=["audit"],
             response_model=protocol.ConsistencyProofResponse,
             summary="RFC 9162 consistency proof between two tree sizes (any admin token)")
    def audit_consistency(request: Request, first: int = Query(ge=0, le=2**62),
                          second: int | None = Query(None, ge=0, le=2**62),
                          authorization: str | None = Header(None)
                          ) -> protocol.ConsistencyProofResponse:
        who = admin(request, authorization, "audit.proof")
        return service.audit_consistency(who, first, second)

    return _Envelope(app, service, max_body, limiter)
