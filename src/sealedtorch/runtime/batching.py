"""One inference worker per model: a bounded queue and simple dynamic batching.

Requests are queued (at most ``max_queue``; beyond that :class:`QueueFull`, HTTP 503) and a
worker thread runs them under ``torch.inference_mode()``, so the event loop that answers
health checks never waits for a forward pass.  The worker takes the oldest request, adds
every queued request with the same input dtypes and shapes (apart from the first, batch,
dimension) up to ``max_batch_size`` rows — optionally waiting ``batch_delay_ms`` for more —
concatenates them, runs one forward pass and splits the outputs back.  If a merged batch
fails, its requests are retried one by one, so one bad input only fails its own request.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InferenceFailed, QueueFull, RequestError, SealedTorchError, ShuttingDown  # noqa: F401 (re-exported)
from .kserve import InferRequest
from .loader import LoadedModel
from .metrics import RuntimeMetrics

__all__ = ["Batcher", "InferenceFailed", "QueueFull", "ShuttingDown"]

log = logging.getLogger("sealedtorch.runtime.batching")


@dataclass
class _Job:
    request: InferRequest
    future: concurrent.futures.Future[dict[str, torch.Tensor]]
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """The worker of one model.  :meth:`submit` is safe from any thread."""

    def __init__(self, model: LoadedModel, *, max_batch_size: int, max_queue: int,
                 batch_delay_ms: float = 0.0, metrics: RuntimeMetrics | None = None) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.delay = batch_delay_ms / 1000.0
        self.metrics = metrics or RuntimeMetrics()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"infer-{model.name}",
                                        daemon=True)
        self._thread.start()

    # --- producer side ------------------------------------------------------------------

    def submit(self, request: InferRequest) -> concurrent.futures.Future[dict[str, torch.Tensor]]:
        future: concurrent.futures.Future[dict[str, torch.Tensor]] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the runtime is shutting down; not accepting requests")
            if len(self._jobs) >= self.max_queue:
                self.metrics.rejected.inc(model=self.model.name, reason="queue_full")
                raise QueueFull(f"model {self.model.name!r} has {len(self._jobs)} requests "
                                f"waiting (max_queue {self.max_queue}); retry later")
            self._jobs.append(_Job(request, future))
            self.metrics.queue_depth.set(len(self._jobs), model=self.model.name)
            self._cond.notify()
        return future

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every queued request, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- worker side --------------------------------------------------------------------

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._jobs.popleft()
            batch = [first]
            if self.model.batchable:
                rows = first.request.rows
                key = first.request.shape_key
                deadline = time.perf_counter() + self.delay
                while True:
                    rows = self._gather(batch, key, rows)
                    remaining = deadline - time.perf_counter()
                    if rows >= self.max_batch_size or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
            self.metrics.queue_depth.set(len(self._jobs), model=self.model.name)
            return batch

    def _gather(self, batch: list[_Job], key: tuple[Any, ...], rows: int) -> int:
        kept: collections.deque[_Job] = collections.deque()
        while self._jobs:
            job = self._jobs.popleft()
            if job.request.shape_key == key and rows + job.request.rows <= self.max_batch_size:
                batch.append(job)
                rows += job.request.rows
            else:
                kept.append(job)
        self._jobs.extendleft(reversed(kept))
        return rows

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if live:
                self._execute(live)

    def _execute(self, batch: list[_Job]) -> None:
        name = self.model.name
        started = time.perf_counter()
        for job in batch:
            self.metrics.queue_seconds.observe(started - job.queued_at, model=name)
        try:
            results = self._forward([j.request for j in batch])
        except Exception as exc:
            if len(batch) > 1:  # find the culprit: run each request on its own
                for job in batch:
                    self._execute([job])
                return
            failure = _failure(exc)
            log.warning("inference failed for model %s: %s", name, failure,
                        extra={"fields": {"model": name}})
            batch[0].future.set_exception(failure)
            return
        elapsed = time.perf_counter() - started
        rows = sum(j.request.rows for j in batch)
        self.metrics.inference_seconds.observe(elapsed, model=name)
        self.metrics.batch_rows.observe(rows, model=name)
        self.metrics.batch_requests.observe(len(batch), model=name)
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _forward(self, requests: list[InferRequest]) -> list[dict[str, torch.Tensor]]:
        model = self.model
        names = [s.name for s in model.inputs]
        if len(requests) == 1:
            args = [requests[0].inputs[n] for n in names]
        else:
            args = [torch.cat([r.inputs[n] for r in requests]) for n in names]
        with torch.inference_mode():
            args = [a.to(model.device, non_blocking=True) for a in args]
            raw = model.module(*args)
            outputs = _name_outputs(raw, [s.name for s in model.outputs])
            outputs = {k: v.to("cpu") for k, v in outputs.items()}
        if len(requests) == 1:
            return [outputs]
        rows = [r.rows for r in requests]
        total = sum(rows)
        for k, v in outputs.items():
            if v.dim() == 0 or v.shape[0] != total:
                raise InferenceFailed(f"output {k!r} has shape {list(v.shape)}, not one row "
                                      f"per input row; cannot split a merged batch")
        pieces = {k: torch.split(v, rows) for k, v in outputs.items()}
        return [{k: pieces[k][i] for k in outputs} for i in range(len(requests))]


def _name_outputs(raw: Any, names: list[str]) -> dict[str, torch.Tensor]:
    if isinstance(raw, torch.Tensor):
        values = {names[0]: raw}
    elif isinstance(raw, Mapping):
        values = {n: raw[n] for n in names if n in raw}
    elif isinstance(raw, list | tuple):
        values = dict(zip(names, raw, strict=False))
    else:
        raise InferenceFailed(f"the model returned {type(raw).__name__}, not tensors")
    missing = [n for n in names if not isinstance(values.get(n), torch.Tensor)]
    if missing:
        raise InferenceFailed(f"the model did not return output(s) {', '.join(missing)}")
    return values


def _failure(exc: Exception) -> SealedTorchError:
    if isinstance(exc, SealedTorchError):
        return exc
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return InferenceFailed(f"the model could not run on this input: "
                           f"{type(exc).__name__}: {text}")
