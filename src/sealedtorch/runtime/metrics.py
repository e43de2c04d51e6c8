"""The runtime's Prometheus metrics (the primitives are in :mod:`sealedtorch.metrics`)."""

from __future__ import annotations

import time

from ..metrics import CONTENT_TYPE, LATENCY_BUCKETS, Counter, Gauge, Histogram, Registry

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "Registry", "RuntimeMetrics"]

_LATENCY = LATENCY_BUCKETS
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RuntimeMetrics:
    """The runtime's metrics, all prefixed ``sealedtorch_runtime_``."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        p = "sealedtorch_runtime_"
        self.requests = r.add(Counter(
            p + "requests_total", "Inference requests by model and HTTP status code.",
            ("model", "code")))
        self.request_seconds = r.add(Histogram(
            p + "request_duration_seconds",
            "Inference request latency (body received to response ready).", _LATENCY,
            ("model",)))
        self.inference_seconds = r.add(Histogram(
            p + "inference_duration_seconds", "Forward-pass time per batch.", _LATENCY,
            ("model",)))
        self.queue_seconds = r.add(Histogram(
            p + "queue_wait_seconds", "Time requests wait before their batch starts.",
            _LATENCY, ("model",)))
        self.batch_rows = r.add(Histogram(
            p + "batch_size", "Rows per forward pass (after dynamic batching).", _BATCH,
            ("model",)))
        self.batch_requests = r.add(Histogram(
            p + "batch_requests", "Requests merged into one forward pass.", _BATCH,
            ("model",)))
        self.queue_depth = r.add(Gauge(
            p + "queue_depth", "Requests waiting for a forward pass.", ("model",)))
        self.rejected = r.add(Counter(
            p + "rejected_total", "Requests refused before inference, by reason.",
            ("model", "reason")))
        self.load_seconds = r.add(Gauge(
            p + "model_load_seconds",
            "Time to load a model: key, decryption, build (seconds).", ("model",)))
        self.ready = r.add(Gauge(
            p + "model_ready", "1 when the model is loaded and serving.", ("model",)))
        self.attestations = r.add(Counter(
            p + "attestation_requests_total", "Evidence requests by outcome.", ("outcome",)))
        self.unloads = r.add(Counter(
            p + "model_unloads_total",
            "Models unloaded because the keycache no longer holds their key, by reason.",
            ("model", "reason")))
        self.reloads = r.add(Counter(
            p + "model_reloads_total",
            "Models (re)loaded by the key watcher without a restart (rotation, recovery), "
            "by outcome.", ("model", "outcome")))
        self.key_checks = r.add(Counter(
            p + "key_checks_total", "Key watcher checks with the keycache, by outcome.",
            ("model", "outcome")))
        self.start_time = r.add(Gauge(
            p + "start_time_seconds", "Unix time the runtime started."))
        self.start_time.set(time.time())

    def render(self) -> str:
        return self.registry.render()
