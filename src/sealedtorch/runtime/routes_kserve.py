"""The Open Inference Protocol (KServe v2) endpoints other than inference: server metadata,
liveness, readiness, model metadata and model readiness.

Liveness is unconditional (the process answers); readiness is the runtime's: every model
loaded and the runtime not stopping.  A not-ready answer names each model's state and error,
so an operator sees why from ``/v2/health/ready`` alone.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .. import __version__
from ..errors import ModelNotFound
from .dependencies import ReadySlot, RuntimeDep

__all__ = ["kserve_router"]

kserve_router = APIRouter()


@kserve_router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": "sealedtorch", "version": __version__,
            "extensions": ["binary_tensor_data", "sealedtorch_attestation", "metrics"]}


@kserve_router.get("/v2/health/live")
async def live() -> dict[str, Any]:
    return {"live": True}


@kserve_router.get("/v2/health/ready")
async def ready(runtime: RuntimeDep) -> JSONResponse:
    ok = runtime.ready
    body: dict[str, Any] = {"ready": ok}
    if not ok:
        body["models"] = [s.describe() for s in runtime.slots.values()]
    return JSONResponse(body, status_code=200 if ok else 503)


@kserve_router.get("/v2/models/{name}")
@kserve_router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(slot: ReadySlot, runtime: RuntimeDep) -> Any:
    m = slot.model
    assert m is not None  # a ReadySlot holds its model
    max_batch_size = runtime.config.max_batch_size if m.batchable else 0
    return {"name": m.name, "versions": [m.version], "platform": "pytorch",
            "inputs": [s.to_json() for s in m.inputs],
            "outputs": [s.to_json() for s in m.outputs],
            "parameters": {"model_id": m.model_id, "key_version": m.key_version,
                           "arch": m.arch, "device": str(m.device),
                           "max_batch_size": max_batch_size}}


@kserve_router.get("/v2/models/{name}/ready")
@kserve_router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, runtime: RuntimeDep, version: str | None = None
                      ) -> JSONResponse:
    # Ready or not, with the slot's state (a not-ready model is 503, not an error: its body
    # says why); 404 only for a name or version that is not served.  (A comment, not a
    # docstring: FastAPI would publish a docstring as the operation's description.)
    slot = runtime.slots.get(name)
    if slot is None:
        raise ModelNotFound(f"unknown model {name!r}")
    if version is not None and slot.model is not None and version != slot.model.version:
        raise ModelNotFound(f"model {name!r} has no version {version!r} (served: "
                            f"{slot.model.version})")
    if version is not None and slot.model is None and slot.state == "ready":
        raise ModelNotFound(f"model {name!r} has no version {version!r}")
    body = {"name": name, "ready": slot.state == "ready", **slot.describe()}
    if slot.model is not None:
        body["version"] = slot.model.version
    return JSONResponse(body, status_code=200 if slot.state == "ready" else 503)
