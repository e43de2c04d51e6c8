"""The runtime's FastAPI application: the routers, the shared context, the error answers.

Every answer that is not a success has the protocol's ``{"error": message}`` body: unknown
routes (404), wrong methods (405), invalid parameters (400), the runtime's own refusals
(their class's status, :mod:`.responses`) and internal errors (500, logged; the client sees
the exception's class name only).  No OpenAPI document or docs UI is served.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ModelNotFound, ModelNotReady, SealedTorchError
from .dependencies import AppContext
from .responses import error_response, response_for
from .routes_attestation import attestation_router
from .routes_infer import infer_router
from .routes_kserve import kserve_router
from .routes_metrics import metrics_router
from .state import Runtime

__all__ = ["create_app"]

log = logging.getLogger("sealedtorch.runtime")


def create_app(runtime: Runtime) -> FastAPI:
    """The HTTP application serving ``runtime`` (KServe v2, the OpenAI-compatible API,
    attestation, metrics)."""
    from .openai_api import openai_router

    app = FastAPI(title="sealedtorch runtime", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url=None, exception_handlers={
                      StarletteHTTPException: _http_error, RequestValidationError: _invalid,
                      ModelNotFound: _refused, ModelNotReady: _refused, Exception: _internal})
    app.state.context = AppContext.for_runtime(runtime)
    app.include_router(kserve_router)
    app.include_router(infer_router)
    app.include_router(openai_router(runtime))  # /v1/completions, /v1/chat/completions
    app.include_router(attestation_router)
    app.include_router(metrics_router)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # unknown routes (404) and wrong methods (405): the protocol's {"error": ...} body
    if exc.status_code == 404:
        message = f"no such endpoint: {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                         for e in exc.errors())
    return error_response(400, f"invalid request: {problems}"[:500])


async def _refused(request: Request, exc: SealedTorchError) -> JSONResponse:
    """A lookup refused in a dependency (unknown or unready model)."""
    return response_for(exc)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s: %s: %s", request.method, request.url.path,
              type(exc).__name__, exc, extra={"fields": {"path": request.url.path}})
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log")
