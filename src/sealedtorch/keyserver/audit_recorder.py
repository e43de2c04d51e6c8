"""The keyserver's one audit recorder: how every decision becomes an audit record, a log
line and a metric, shared by the attestation, release and admin services.

Invariants:

- Every record is appended through the store (:meth:`StoreTx.append_audit`), which chains
  it and appends its leaf to the transparency log in the same transaction; this module
  never writes the chain itself.
- A refused request is audited in its *own* transaction, after the refused one rolled
  back (:meth:`AuditRecorder.failure`), so a refusal changes nothing but the audit log; and
  the refusal stands even if that record cannot be written.
- Failures of callers who have proven nothing (malformed requests, attestation attempts,
  bad bearer tokens) are sampled (:class:`FailureSampler`): a flood grows the log by at most
  ``budget + 1`` records a window.  Integrity failures and failures of authenticated
  callers are always recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import (
    AuthenticationError,
    IntegrityError,
    PolicyDenied,
    SealedTorchError,
    ServiceUnavailable,
    StoreIntegrityError,
)
from .audit import ALLOW, DENY, ERROR
from .metrics import KeyserverMetrics
from .store import Store, StoreUnavailable

log = logging.getLogger("sealedtorch.keyserver")

Clock = Callable[[], float]


#: Unauthenticated failures audited one record each per window; the rest are counted.
FAILURE_BUDGET = 100
FAILURE_WINDOW = 60.0


class FailureSampler:
    """Decides which failures of *unauthenticated* requests get their own durable audit
    record: the first ``budget`` in each ``window`` seconds (per replica); the others are
    only counted (metrics) and, when the window closes, one summary record lists how many
    of each (event, problem) were left out.  So a flood of malformed or unauthenticated
    requests grows the audit log by at most ``budget + 1`` records a window, whatever its
    size, while authenticated failures (and every integrity failure) are always recorded.
    """

    def __init__(self, budget: int = FAILURE_BUDGET, window: float = FAILURE_WINDOW,
                 clock: Clock = time.monotonic) -> None:
        self.budget = budget
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._recorded = 0
        self._suppressed: dict[tuple[str, str], int] = {}

    def admit(self, event: str, problem: str) -> tuple[bool, dict[str, Any] | None]:
        """(record this one?, the summary of a window that just closed, if any)."""
        now = self.clock()
        with self._lock:
            summary = None
            if self._start is None or now - self._start >= self.window:
                summary = self._close()
                self._start = now
            if self._recorded < self.budget:
                self._recorded += 1
                return True, summary
            key = (event, problem)
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False, summary

    def flush(self) -> dict[str, Any] | None:
        """The summary of the current window if it has ended (else None)."""
        with self._lock:
            if self._start is None or self.clock() - self._start < self.window:
                return None
            summary = self._close()
            self._start = None
            return summary

    def _close(self) -> dict[str, Any] | None:
        suppressed, self._suppressed, self._recorded = self._suppressed, {}, 0
        if not suppressed:
            return None
        return {"event": "audit.failures.suppressed", "decision": DENY,
                "window_seconds": self.window, "recorded": self.budget,
                "suppressed_total": sum(suppressed.values()),
                "suppressed": [{"event": e, "problem": p, "count": n}
                               for (e, p), n in sorted(suppressed.items())],
                "reasons": [f"unauthenticated failures beyond {self.budget} a window are "
                            f"counted, not recorded one by one"]}


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: for audit records and logs."""

    client: str | None = None
    request_id: str | None = None


class AuditRecorder:
    """Writes audit records, samples unauthenticated failures, logs and counts decisions.

    One instance is shared by every service of a keyserver, so they share one failure
    budget and one set of counters."""

    def __init__(self, *, store: Store, clock: Clock, metrics: KeyserverMetrics,
                 failures: FailureSampler | None = None) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.failures = failures or FailureSampler()

    def integrity_failure(self, table: str) -> None:
        """Count a row of ``table`` that failed its MAC (the caller raises)."""
        self.metrics.integrity_failures.inc(table=table)

    def entry(self, ctx: RequestContext, event: str, **fields: Any) -> dict[str, Any]:
        return {"time": self.clock(), "event": event, "client": ctx.client,
                "request_id": ctx.request_id, **fields}

    def append(self, entry: dict[str, Any]) -> None:
        with self.store.transaction() as tx:
            tx.append_audit(entry)

    def failure(self, entry: dict[str, Any], exc: SealedTorchError) -> None:
        entry.update(decision=ERROR if isinstance(exc, IntegrityError) else DENY,
                     problem=exc.problem_type, reasons=fail_reasons(exc))
        if isinstance(exc, StoreUnavailable):
            # nothing was decided, and the store cannot take a record anyway
            self.metrics.unavailable.inc()
            log.warning("%s: %s", entry.get("event"), exc,
                        extra={"fields": {"event": entry.get("event"), "problem":
                                          exc.problem_type,
                                          "request_id": entry.get("request_id")}})
            return
        if _unauthenticated(entry, exc):
            record, summary = self.failures.admit(str(entry.get("event")), exc.problem_type)
            if summary is not None:
                self._write_summary(summary)
            if not record:  # counted, not recorded: a flood costs the log nothing
                self.metrics.record(entry)
                self.metrics.audit_suppressed.inc(event=str(entry.get("event")))
                return
        try:
            self.append(entry)
        except ServiceUnavailable as store_exc:  # the refusal stands all the same
            log.warning("could not audit a refused request: %s", store_exc,
                        extra={"fields": {"event": entry.get("event"),
                                          "request_id": entry.get("request_id")}})
        except Exception:  # the refusal stands even if it cannot be recorded
            log.exception("could not write the audit record for a refused request",
                          extra={"fields": {"event": entry.get("event"),
                                            "request_id": entry.get("request_id")}})
        self.log(entry)

    def log(self, entry: dict[str, Any]) -> None:
        self.metrics.record(entry)
        fields = {k: entry.get(k) for k in (
            "event", "decision", "problem", "model_id", "versions", "version", "client",
            "request_id", "actor", "role", "tee", "insecure", "policy_digest") if
            entry.get(k) is not None}
        if entry.get("decision") in (DENY, ERROR):
            fields["reasons"] = entry.get("reasons")
        level = logging.INFO
        if entry.get("insecure") and entry.get("decision") == ALLOW:
            level = logging.WARNING
        elif entry.get("decision") == ERROR:
            level = logging.ERROR
        msg = f"{entry.get('event')}: {entry.get('decision')}"
        if entry.get("insecure") and entry.get("decision") == ALLOW:
            msg += " (INSECURE sim evidence: development only)"
        log.log(level, msg, extra={"fields": fields})

    def record_request_error(self, ctx: RequestContext, event: str,
                             exc: SealedTorchError) -> None:
        """Audit a request the HTTP layer refused before it reached an operation (malformed
        JSON, an oversized body, ...): nobody was authenticated yet, so it is sampled."""
        self.failure(self.entry(ctx, event, unauthenticated=True), exc)

    def _write_summary(self, summary: dict[str, Any]) -> None:
        summary = {"time": self.clock(), **summary}
        try:
            self.append(summary)
        except Exception:  # the counters still hold the numbers
            log.exception("could not write the summary of suppressed failures")
            return
        log.warning("%d unauthenticated failures were counted, not recorded one by one",
                    summary["suppressed_total"],
                    extra={"fields": {"event": summary["event"],
                                      "suppressed": summary["suppressed"]}})

    def flush_failures(self) -> None:
        """Write the summary of a closed window of suppressed failures (if any)."""
        summary = self.failures.flush()
        if summary is not None:
            self._write_summary(summary)


def fail_reasons(exc: SealedTorchError) -> list[str]:
    """The reasons an audit record gives for ``exc``: its audit-only reasons if it has any
    (those name reference values, so they never go to the client), else its text."""
    if exc.audit_reasons is not None:  # for the audit log only, not the client
        return list(exc.audit_reasons)
    if isinstance(exc, PolicyDenied) and exc.reasons:
        return list(exc.reasons)
    return [str(exc)]


#: Events whose caller has proven nothing yet (their failures are sampled).
_UNAUTHENTICATED_EVENTS = frozenset({"attest", "attest.challenge"})


def _unauthenticated(entry: dict[str, Any], exc: SealedTorchError) -> bool:
    """A failure of a caller who has not authenticated: malformed requests, attestation
    attempts, bad bearer tokens.  Never an integrity failure, never a caller whose token
    verified (those are always recorded)."""
    if isinstance(exc, StoreIntegrityError):
        return False
    if entry.get("unauthenticated") or entry.get("event") in _UNAUTHENTICATED_EVENTS:
        return True
    return type(exc) is AuthenticationError  # a missing/forged/expired/revoked token
