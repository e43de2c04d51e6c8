"""``GET /metrics``: the runtime's Prometheus metrics (:mod:`.metrics`).

Queue depths are sampled at scrape time, so the gauge is current even when no request has
moved a queue since the last scrape.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from .dependencies import RuntimeDep
from .metrics import CONTENT_TYPE

__all__ = ["metrics_router"]

metrics_router = APIRouter()


@metrics_router.get("/metrics")
async def prometheus(runtime: RuntimeDep) -> PlainTextResponse:
    metrics = runtime.metrics
    for slot in runtime.slots.values():
        if slot.batcher is not None:
            metrics.queue_depth.set(slot.batcher.depth, model=slot.name)
    return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)
