"""The runtime's error answers: ``{"error": message}`` with an HTTP status.

The KServe v2 protocol answers errors as ``{"error": "..."}`` (not RFC 9457 problems like the
keyserver).  The status comes from the exception's class (``http_status`` in
:mod:`sealedtorch.errors`), so one refusal has one status wherever it is raised.  Refusals
because of momentary load (a full queue, shutdown, no room in the body budget) also carry
``Retry-After``.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import BudgetTimeout, QueueFull, SealedTorchError, ShuttingDown

__all__ = ["RETRY_LATER", "error_response", "response_for"]

#: Refusals that a retry one second later may pass: they say "busy", not "no".
RETRY_LATER: tuple[type[SealedTorchError], ...] = (QueueFull, ShuttingDown, BudgetTimeout)


def error_response(status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error body with ``status``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def response_for(exc: SealedTorchError) -> JSONResponse:
    """``exc`` as an answer: its class's (or raiser's) status, its message, and
    ``Retry-After`` for :data:`RETRY_LATER` refusals (one second unless the raiser said)."""
    retry_after = exc.retry_after
    if retry_after is None and isinstance(exc, RETRY_LATER):
        retry_after = 1
    headers = None if retry_after is None else {"retry-after": str(max(1, round(retry_after)))}
    return error_response(exc.http_status, str(exc), headers)
