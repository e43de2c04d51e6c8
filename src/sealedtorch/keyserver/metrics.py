"""The keyserver's Prometheus metrics (``GET /metrics``), on :mod:`sealedtorch.metrics`.

Counters and histograms are per replica (each process counts what it answered; Prometheus
sums replicas).  The gauges read from the store at scrape time (nonces, audit chain length)
describe the shared database, so every replica reports the same value.  No label carries a
model id: the metrics endpoint must not reveal which models exist.
"""

from __future__ import annotations

import time
from typing import Any

from ..metrics import CONTENT_TYPE, LATENCY_BUCKETS, Counter, Gauge, Histogram, Registry

__all__ = ["CONTENT_TYPE", "KeyserverMetrics"]

PREFIX = "sealedtorch_keyserver_"
_TEES = frozenset({"sgx", "tdx", "snp", "sim", "none"})


class KeyserverMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        p = PREFIX
        self.releases = r.add(Counter(
            p + "releases_total",
            "Model keys released (one per model and request), by TEE and attested role.",
            ("tee", "role")))
        self.keys_released = r.add(Counter(
            p + "key_versions_released_total", "Key versions released, by TEE.", ("tee",)))
        self.attestations = r.add(Counter(
            p + "attestations_total", "Attestation results (tokens) issued, by TEE.",
            ("tee",)))
        self.denials = r.add(Counter(
            p + "denials_total",
            "Refused requests by event, reason (the problem type) and TEE ('none' when the "
            "request named no valid TEE).", ("event", "reason", "tee")))
        self.attest_seconds = r.add(Histogram(
            p + "attestation_duration_seconds",
            "POST /v1/attest latency in the service (verification, binding, nonce, audit), "
            "by TEE.", LATENCY_BUCKETS, ("tee",)))
        self.release_seconds = r.add(Histogram(
            p + "release_duration_seconds",
            "GET /v1/keys[/…] latency in the service (token, policies, unwrap, HPKE, audit), "
            "by TEE.", LATENCY_BUCKETS, ("tee",)))
        self.rate_limited = r.add(Counter(
            p + "rate_limited_total",
            "Requests refused by the per-client rate limit (per replica), by endpoint.",
            ("endpoint",)))
        self.unavailable = r.add(Counter(
            p + "store_unavailable_total",
            "Requests answered 503 because the database was unavailable."))
        self.integrity_failures = r.add(Counter(
            p + "store_integrity_failures_total",
            "Store rows refused because they fail their MAC under the KEK (inserted or "
            "changed behind the keyserver's back), by table.", ("table",)))
        self.audit_suppressed = r.add(Counter(
            p + "audit_suppressed_total",
            "Unauthenticated failures counted but not recorded one by one (beyond the "
            "per-window budget of individual audit records), by event.", ("event",)))
        self.nonces = r.add(Gauge(
            p + "nonces",
            "Nonces held in the store (shared by all replicas): issued, used or expired, "
            "until purged an hour after expiry."))
        self.audit_length = r.add(Gauge(
            p + "audit_chain_length", "Records in the audit chain (shared by all replicas)."))
        self.store_up = r.add(Gauge(
            p + "store_up", "1 if the store answered this scrape, else 0."))
        self.start_time = r.add(Gauge(
            p + "start_time_seconds", "Unix time this replica started."))
        self.start_time.set(time.time())

    def record(self, entry: dict[str, Any]) -> None:
        """Count one decided audit entry (called for every record the service logs)."""
        event, decision = entry.get("event"), entry.get("decision")
        tee = str(entry.get("tee") or "none")
        if tee not in _TEES:  # the request's own text: never a label value
            tee = "invalid"
        if decision in ("allow", "ok"):
            if event == "release" and "withheld" not in entry:
                self.releases.inc(tee=tee, role=str(entry.get("role") or "none"))
                versions = entry.get("versions")
                self.keys_released.inc(len(versions) if isinstance(versions, list) else 1,
                                       tee=tee)
            elif event == "attest":
                self.attestations.inc(tee=tee)
            return
        reason = entry.get("problem")
        if reason is None:
            reason = "policy-denied" if entry.get("withheld") else "no-keys"
        self.denials.inc(event=str(event), reason=str(reason), tee=tee)

    def render(self) -> str:
        return self.registry.render()
