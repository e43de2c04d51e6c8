"""What the runtime's routes share, as FastAPI dependencies: the runtime, the served model
slot a URL names, the request-body byte budget and the attestation rate limiter.

The routers are module-level (:mod:`.routes_kserve`, :mod:`.routes_infer`,
:mod:`.routes_attestation`, :mod:`.routes_metrics`); :func:`~.app.create_app` puts one
:class:`AppContext` on ``app.state`` and these dependencies read it, so one process can run
several apps (tests do) without globals.  Every dependency here is ``async``: FastAPI runs
plain ``def`` dependencies in a worker thread, a hop these lookups must not pay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ..errors import ModelNotFound, ModelNotReady
from .attestation import RateLimiter
from .bodies import ByteBudget
from .state import ModelSlot, Runtime

__all__ = [
    "AppContext",
    "AttestationLimit",
    "BodyBudget",
    "ReadySlot",
    "RuntimeDep",
    "app_context",
    "served_slot",
]


@dataclass(frozen=True)
class AppContext:
    """The per-app objects the routes share."""

    runtime: Runtime
    #: Bytes of request bodies in flight: at most two bodies of the largest allowed size.
    body_budget: ByteBudget
    #: Evidence requests per client address (each one costs the TEE a report).
    attestation_limit: RateLimiter

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> AppContext:
        return cls(runtime, ByteBudget(2 * runtime.config.max_request_bytes), RateLimiter())


def app_context(request: Request) -> AppContext:
    """The :class:`AppContext` of the app serving ``request``."""
    context: AppContext = request.app.state.context
    return context


async def context_of(request: Request) -> AppContext:
    return app_context(request)


Context = Annotated[AppContext, Depends(context_of)]


async def runtime_of(context: Context) -> Runtime:
    return context.runtime


async def body_budget_of(context: Context) -> ByteBudget:
    return context.body_budget


async def attestation_limit_of(context: Context) -> RateLimiter:
    return context.attestation_limit


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
BodyBudget = Annotated[ByteBudget, Depends(body_budget_of)]
AttestationLimit = Annotated[RateLimiter, Depends(attestation_limit_of)]


async def served_slot(name: str, runtime: RuntimeDep, version: str | None = None) -> ModelSlot:
    """The slot of model ``name`` (at ``version``, when the URL names one), ready to serve:
    :class:`ModelNotFound` (404) for an unknown name or version, :class:`ModelNotReady`
    (503) while it is loading, failed or unloaded."""
    slot = runtime.slots.get(name)
    if slot is None:
        raise ModelNotFound(f"unknown model {name!r} (served: "
                            f"{', '.join(runtime.slots) or 'none'})")
    if slot.state != "ready" or slot.model is None:
        why = f": {type(slot.error).__name__}: {slot.error}" if slot.error else ""
        raise ModelNotReady(f"model {name!r} is not ready ({slot.state}{why})")
    if version is not None and version != slot.model.version:
        raise ModelNotFound(f"model {name!r} has no version {version!r} (served: "
                            f"{slot.model.version})")
    return slot


ReadySlot = Annotated[ModelSlot, Depends(served_slot)]
