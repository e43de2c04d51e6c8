"""The keyserver's HTTP routes, one module-level router per part of the API.

Each route translates JSON to one call of the :class:`~.service.Keyserver` the application
serves (``app.state.service``) and back; none decides anything itself.  The admin routes
take their caller through the :func:`admin` dependency.

Invariants:

- The route functions' names are the OpenAPI operation ids, and the order the routers are
  included in (:data:`ROUTERS`) is the order of the served paths: renaming a function or
  reordering changes the published description.
- An admin token is looked at only after the request itself validated (the token is
  authenticated when the route first asks for :attr:`AdminCall.who`): a malformed request
  is refused as such (``422``), whatever its token, exactly as before routers existed.
  Roles are checked by the services, inside the operation's transaction, so a forbidden
  attempt is audited under the operation's own event.
- The hot path (challenge, sim attest, key release) runs on the event loop when the store
  is local (:func:`_hot`); hardware evidence and the admin API run in the thread pool.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from . import protocol
from .audit import iso
from .audit_recorder import RequestContext
from .metrics import CONTENT_TYPE
from .service import Keyserver
from .store import AdminTokenRecord, KeyState

log = logging.getLogger("sealedtorch.keyserver")

T = TypeVar("T")


def service_of(request: Request) -> Keyserver:
    """The keyserver the application serves."""
    service: Keyserver = request.app.state.service
    return service


def request_context(request: Request) -> RequestContext:
    """Who is asking, for audit records and logs: client address and request id."""
    return RequestContext(request.client.host if request.client else None,
                          getattr(request.state, "request_id", None))


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (None if absent or another
    scheme)."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


async def _hot(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` inline when the store is local (a SQLite commit is cheaper than a hop
    to a worker thread), in the thread pool when it is a network database (whose round
    trips must not stall the event loop)."""
    if getattr(service_of(request).store, "inline", True):
        return fn(*args)
    return await run_in_threadpool(fn, *args)


# ---------------------------------------------------------------------- admin callers

@dataclass
class AdminCall:
    """An admin request: the service, the request context, and the caller's admin token
    record (:attr:`who`), authenticated on first use (and audited if refused)."""

    service: Keyserver
    ctx: RequestContext
    token: str | None
    action: str

    @functools.cached_property
    def who(self) -> AdminTokenRecord:
        return self.service.authenticate_admin(self.token, self.ctx, self.action)


def admin(action: str) -> Any:
    """The dependency of an admin route: its :class:`AdminCall`, whose token is audited
    under ``action`` if it does not authenticate."""

    async def admin_call(request: Request,
                         authorization: str | None = Header(None)) -> AdminCall:
        return AdminCall(service_of(request), request_context(request), bearer(authorization),
                         action)

    return Depends(admin_call)


# ---------------------------------------------------------------------- operations

operations = APIRouter(tags=["operations"])


@operations.get("/healthz", summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@operations.get("/readyz", summary="Readiness: the store answers")
def readyz(request: Request) -> Any:
    try:
        service_of(request).ready()
    except Exception as exc:
        log.error("not ready: %s", exc)
        return JSONResponse({"status": "unavailable"}, status_code=503,
                            headers={"Retry-After": "1"})
    return {"status": "ready"}


@operations.get("/metrics", response_class=PlainTextResponse,
                summary="Prometheus metrics (text exposition format 0.0.4)")
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(service_of(request).metrics_text(), media_type=CONTENT_TYPE)


# ---------------------------------------------------------------------- attestation

attestation = APIRouter(tags=["attestation"])


@attestation.post("/v1/attest/challenge", response_model=None,
                  responses={200: {"model": protocol.ChallengeResponse}},
                  summary="A single-use nonce to bind into evidence")
async def challenge(req: protocol.ChallengeRequest, request: Request) -> dict[str, str]:
    ch = await _hot(request, service_of(request).challenge, req.tee, request_context(request))
    return {"nonce": protocol.b64encode(ch.nonce), "expires_at": iso(ch.expires_at)}


@attestation.post("/v1/attest", response_model=None,
                  responses={200: {"model": protocol.AttestResponse}},
                  summary="Verify evidence; answer an attestation-result token")
async def attest(req: protocol.AttestRequest, request: Request) -> dict[str, Any]:
    service, ctx = service_of(request), request_context(request)
    if req.tee == "sim":  # one signature check: cheaper inline than a thread hop
        issued = await _hot(request, service.attest, req, ctx)
    else:  # DCAP/SNP verification may fetch collateral: keep the event loop free
        issued = await run_in_threadpool(service.attest, req, ctx)
    info = issued.info
    return {"token": issued.token, "token_type": "Bearer",
            "expires_at": iso(info.expires_at), "role": info.role.value,
            "tee": info.claims.tee.value, "insecure": info.claims.insecure,
            "claims": info.claims.to_json()}


# ---------------------------------------------------------------------- keys

keys = APIRouter(tags=["keys"])


async def _released(request: Request, authorization: str | None,
                    **selection: Any) -> dict[str, Any]:
    release = functools.partial(service_of(request).release_with_receipt, **selection)
    released, receipt = await _hot(request, release, bearer(authorization),
                                   request_context(request))
    return {"keys": [k.to_json() for k in released], "receipt": receipt}


@keys.get("/v1/keys", response_model=None, responses={200: {"model": protocol.KeysResponse}},
          summary="Every key this attested identity may have, HPKE-sealed to its key")
async def keys_all(request: Request,
                   tlog_since: int | None = Query(None, ge=0, le=2**62),
                   authorization: str | None = Header(None)) -> dict[str, Any]:
    return await _released(request, authorization, since=tlog_since)


@keys.get("/v1/keys/{model_id:path}", response_model=None,
          responses={200: {"model": protocol.KeysResponse}},
          summary="One model's key (latest active version unless ?version=)")
async def keys_one(model_id: str, request: Request,
                   version: int | None = Query(None, ge=1, le=2**32 - 1),
                   tlog_since: int | None = Query(None, ge=0, le=2**62),
                   authorization: str | None = Header(None)) -> dict[str, Any]:
    return await _released(request, authorization, model_id=model_id, version=version,
                           since=tlog_since)


# ---------------------------------------------------------------------- administration

administration = APIRouter(tags=["admin"])


@administration.get("/v1/admin/models", response_model=protocol.ModelsResponse)
def list_models(call: Annotated[AdminCall, admin("admin.list")]) -> protocol.ModelsResponse:
    return protocol.ModelsResponse(models=call.service.list_models(call.who, call.ctx))


@administration.get("/v1/admin/models/{model_id:path}", response_model=protocol.ModelInfo)
def get_model(model_id: str, call: Annotated[AdminCall, admin("admin.get")]) -> protocol.ModelInfo:
    return call.service.list_models(call.who, call.ctx, model_id)[0]


@administration.post("/v1/admin/models", status_code=201, response_model=protocol.ModelInfo,
                     summary="Register a model key and policy")
def register(req: protocol.RegisterRequest,
             call: Annotated[AdminCall, admin("register")]) -> protocol.ModelInfo:
    return call.service.register(call.who, call.ctx, req)


@administration.put("/v1/admin/policies", response_model=protocol.ModelInfo,
                    summary="Replace a model's policy")
def set_policy(req: protocol.PolicyRequest,
               call: Annotated[AdminCall, admin("policy.set")]) -> protocol.ModelInfo:
    return call.service.set_policy(call.who, call.ctx, req)


@administration.post("/v1/admin/rotations", status_code=201,
                     response_model=protocol.RotateResponse, summary="Add a new key version")
def rotate(req: protocol.RotateRequest,
           call: Annotated[AdminCall, admin("rotate")]) -> protocol.RotateResponse:
    return call.service.rotate(call.who, call.ctx, req)


@administration.post("/v1/admin/revocations", response_model=protocol.StateChangeResponse,
                     summary="Stop releasing a model (or one version) immediately")
def revoke(req: protocol.StateChangeRequest,
           call: Annotated[AdminCall, admin("revoke")]) -> protocol.StateChangeResponse:
    return call.service.change_state(call.who, call.ctx, req, KeyState.REVOKED)


@administration.post("/v1/admin/retirements", response_model=protocol.StateChangeResponse,
                     summary="Retire a model (or one version): no more releases, key erased")
def retire(req: protocol.StateChangeRequest,
           call: Annotated[AdminCall, admin("retire")]) -> protocol.StateChangeResponse:
    return call.service.change_state(call.who, call.ctx, req, KeyState.RETIRED)


@administration.post("/v1/admin/tokens", status_code=201,
                     response_model=protocol.TokenCreateResponse,
                     summary="Create an admin, owner or auditor token (admins only)")
def create_token(req: protocol.TokenCreateRequest,
                 call: Annotated[AdminCall, admin("token.create")]) -> protocol.TokenCreateResponse:
    return call.service.create_token(call.who, call.ctx, req)


@administration.get("/v1/admin/tokens", response_model=protocol.TokensResponse,
                    summary="List tokens (ids, names, roles; never the tokens) (admins only)")
def list_tokens(call: Annotated[AdminCall, admin("token.list")]) -> protocol.TokensResponse:
    return protocol.TokensResponse(tokens=call.service.list_tokens(call.who, call.ctx))


@administration.post("/v1/admin/tokens/revocations", response_model=protocol.TokenInfo,
                     summary="Revoke a token now (admins only)")
def revoke_token(req: protocol.TokenRevokeRequest,
                 call: Annotated[AdminCall, admin("token.revoke")]) -> protocol.TokenInfo:
    return call.service.revoke_token(call.who, call.ctx, req.token_id)


@administration.post("/v1/admin/tokens/rotations", status_code=201,
                     response_model=protocol.TokenCreateResponse,
                     summary="Replace a token by a new one of the same identity; the old one "
                             "is revoked (admins only)")
def rotate_token(req: protocol.TokenRotateRequest,
                 call: Annotated[AdminCall, admin("token.rotate")]) -> protocol.TokenCreateResponse:
    return call.service.rotate_token(call.who, call.ctx, req)


@administration.get("/v1/admin/audit", response_model=protocol.AuditResponse,
                    summary="Audit records (admins and auditors: all; owners: their own "
                            "models')")
def read_audit(call: Annotated[AdminCall, admin("audit.read")],
               model_id: str | None = Query(None, max_length=1024),
               since: float | None = Query(None, ge=0, le=1e11,
                                           description="Unix time (seconds)"),
               after_seq: int | None = Query(None, ge=0, le=2**62),
               limit: int = Query(1000, ge=1, le=10_000)) -> protocol.AuditResponse:
    return call.service.read_audit(call.who, call.ctx, model_id=model_id, since=since,
                                   after_seq=after_seq, limit=limit)


# ---------------------------------------------------------------------- transparency log

transparency = APIRouter(tags=["audit"])


@transparency.get("/v1/audit/checkpoint", response_model=protocol.CheckpointResponse,
                  summary="The transparency log's current signed checkpoint (any admin "
                          "token)")
def audit_checkpoint(call: Annotated[AdminCall, admin("audit.checkpoint")]
                     ) -> protocol.CheckpointResponse:
    return call.service.audit_checkpoint(call.who)


@transparency.get("/v1/audit/proof/inclusion", response_model=protocol.InclusionProofResponse,
                  summary="RFC 9162 inclusion proof of one leaf (any admin token)")
def audit_inclusion(call: Annotated[AdminCall, admin("audit.proof")],
                    index: int = Query(ge=0, le=2**62),
                    size: int | None = Query(None, ge=1, le=2**62)
                    ) -> protocol.InclusionProofResponse:
    return call.service.audit_inclusion(call.who, index, size)


@transparency.get("/v1/audit/proof/consistency",
                  response_model=protocol.ConsistencyProofResponse,
                  summary="RFC 9162 consistency proof between two tree sizes (any admin "
                          "token)")
def audit_consistency(call: Annotated[AdminCall, admin("audit.proof")],
                      first: int = Query(ge=0, le=2**62),
                      second: int | None = Query(None, ge=0, le=2**62)
                      ) -> protocol.ConsistencyProofResponse:
    return call.service.audit_consistency(call.who, first, second)


#: Every router, in the order their paths are served and described.
ROUTERS = (operations, attestation, keys, administration, transparency)
