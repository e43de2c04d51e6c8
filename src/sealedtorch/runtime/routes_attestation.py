"""``GET /v1/attestation?nonce=``: TEE evidence binding the caller's nonce to this server's
TLS key (and its origin), with the served models and the runtime configuration.

Evidence costs the TEE a report, so requests are rate-limited per client address (429 with
``Retry-After``).  Every outcome is counted (``..._attestation_requests_total``).  The
evidence is produced in a worker thread: a slow TEE never stalls health checks.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..attest import binding
from ..errors import InvalidRequest, SealedTorchError
from .attestation import attestation_domain, evidence_document, parse_nonce
from .dependencies import AttestationLimit, RuntimeDep
from .responses import error_response, response_for

__all__ = ["attestation_router"]

log = logging.getLogger("sealedtorch.runtime")

attestation_router = APIRouter()


@attestation_router.get("/v1/attestation")
async def attestation(request: Request, runtime: RuntimeDep, limit: AttestationLimit,
                      nonce: str | None = None) -> JSONResponse:
    metrics = runtime.metrics
    wait = limit.take(request.client.host if request.client else "?")
    if wait > 0:
        metrics.attestations.inc(outcome="rate_limited")
        return error_response(429, f"too many attestation requests from this address; "
                                   f"retry after {wait:.1f} s",
                              {"retry-after": str(max(1, round(wait)))})
    if runtime.attester is None:
        metrics.attestations.inc(outcome="unavailable")
        return error_response(503, "this runtime has no attester (no TEE configured)")
    try:
        raw_nonce = parse_nonce(nonce)
    except InvalidRequest as exc:
        metrics.attestations.inc(outcome="bad_request")
        return response_for(exc)
    spki = runtime.tls.spki
    origin = "ephemeral" if runtime.tls.generated else "file"
    try:
        evidence = await anyio.to_thread.run_sync(
            runtime.attester.evidence,
            binding.report_data(raw_nonce, spki, domain=attestation_domain(origin)))
    except SealedTorchError as exc:
        metrics.attestations.inc(outcome="error")
        log.error("attestation failed: %s", exc)
        # 503 whatever the attester's error class says: the TEE failed, not the caller
        return error_response(503, f"the TEE did not produce evidence: {exc}")
    metrics.attestations.inc(outcome="ok")
    return JSONResponse(evidence_document(
        evidence, nonce=raw_nonce, spki=spki, models=runtime.attested_models(),
        config=runtime.config, tls_key_origin=origin))
