"""RFC 7807 problem details from (and back to) the sealedtorch error tree.

Each :class:`~sealedtorch.errors.SealedTorchError` subclass has a stable ``problem_type``;
the problem ``type`` URI is ``urn:sealedtorch:problem:<problem_type>``.  The server turns an
error into a problem response with :func:`problem_for`; a client turns a problem response
back into the same class with :func:`error_from_problem`, so code on both sides catches the
same exceptions.  URIs never change once published: clients match on them.
"""

from __future__ import annotations

from typing import Any

from .. import errors
from ..errors import SealedTorchError

TYPE_PREFIX = "urn:sealedtorch:problem:"
#: Unexpected server failures: no detail is disclosed, only the request id.
INTERNAL = "internal"

_TITLE: dict[str, str] = {
    "bad-request": "Malformed request",
    "config": "Invalid parameter",
    "unauthorized": "Missing, invalid or expired token",
    "forbidden": "This token's role does not allow the operation",
    "attestation": "Evidence did not verify",
    "collateral": "Verification collateral unavailable or expired",
    "binding": "Evidence not bound to this challenge and key",
    "nonce": "Unknown, expired or used nonce",
    "policy-denied": "Policy denies this identity",
    "key-unavailable": "No key available",
    "conflict": "Conflicts with stored state",
    "policy-invalid": "Invalid policy",
    "key-file": "Invalid key",
    "integrity": "Stored data failed authentication",
    "rate-limited": "Too many requests from this client",
    "unavailable": "Service temporarily unavailable",
    INTERNAL: "Internal error",
}


def type_uri(problem_type: str) -> str:
    return TYPE_PREFIX + problem_type


def http_status(exc: SealedTorchError) -> int:
    """The HTTP status for ``exc``: what its class declares, or what its raiser passed
    (e.g. 410 for a revoked key, 413 for an oversized body)."""
    return exc.http_status


def public_detail(exc: SealedTorchError) -> str:
    """The text a client may see.  Integrity failures are server-side faults (a tampered
    store, a wrong KEK): the client learns only that something failed."""
    if isinstance(exc, errors.IntegrityError):
        return "a stored record failed authentication; the operator has been alerted"
    return str(exc)


def problem_for(exc: SealedTorchError, *, request_id: str | None) -> dict[str, Any]:
    """The problem+json body for ``exc``."""
    kind = exc.problem_type
    body: dict[str, Any] = {
        "type": type_uri(kind), "title": _TITLE.get(kind, kind), "status": http_status(exc),
        "detail": public_detail(exc), "problem": kind, "request_id": request_id,
    }
    if isinstance(exc, errors.PolicyDenied):
        body["reasons"] = list(exc.reasons)
    return body


def internal_problem(*, request_id: str | None) -> dict[str, Any]:
    return {"type": type_uri(INTERNAL), "title": _TITLE[INTERNAL], "status": 500,
            "detail": "internal error; quote the request id to the operator",
            "problem": INTERNAL, "request_id": request_id}


def _error_classes() -> dict[str, type[SealedTorchError]]:
    found: dict[str, type[SealedTorchError]] = {}
    todo: list[type[SealedTorchError]] = [SealedTorchError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.problem_type, cls)
        todo.extend(cls.__subclasses__())
    return found


def error_from_problem(body: Any, status: int) -> SealedTorchError:
    """Rebuild the typed error a problem response stands for (client side).

    Unknown or malformed problems become a plain :class:`SealedTorchError` carrying the
    status, so a newer server never crashes an older client.
    """
    if not isinstance(body, dict):
        return SealedTorchError(f"keyserver answered HTTP {status} without a problem body")
    uri = body.get("type")
    detail = body.get("detail") or body.get("title") or f"HTTP {status}"
    kind = uri[len(TYPE_PREFIX):] if isinstance(uri, str) and uri.startswith(TYPE_PREFIX) \
        else None
    request_id = body.get("request_id")
    suffix = f" (request {request_id})" if request_id else ""
    cls = _error_classes().get(kind) if kind else None
    exc: SealedTorchError
    context: dict[str, Any] = {"http_status": status, "problem": body}
    if cls is errors.PolicyDenied:
        raw = body.get("reasons")
        reasons = [str(r) for r in raw] if isinstance(raw, list) else []
        message = str(detail)
        listed = ": " + "; ".join(reasons)
        if reasons and message.endswith(listed):  # PolicyDenied appends them itself
            message = message[:-len(listed)]
        exc = errors.PolicyDenied(message + suffix, reasons, **context)
    elif cls is not None:
        exc = cls(f"{detail}{suffix}", **context)
    else:
        exc = SealedTorchError(f"keyserver error {uri or 'unknown'} (HTTP {status}): "
                               f"{detail}{suffix}", **context)
    return exc
