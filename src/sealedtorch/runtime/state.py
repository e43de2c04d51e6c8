"""The runtime's state: one :class:`ModelSlot` per served model name, in one :class:`Runtime`.

Invariants:

- a slot exists for every name given at start and is never removed; only its state changes
  (``loading`` -> ``ready`` | ``failed``; ``ready`` -> ``unloaded`` -> ``ready`` by the key
  watcher; anything -> ``stopped`` at close);
- a slot serves requests only while ``state == "ready"`` and it holds a model *and* a batcher;
  requests read the model from the batcher (one attribute read), so the key watcher can swap
  both atomically (see :mod:`.watch`);
- once :attr:`Runtime.stopping` is set, nothing new is loaded or swapped in.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import ConfigError
from ..keys import KeySource
from .batching import Batcher
from .config import RuntimeConfig
from .loader import LoadedModel
from .metrics import RuntimeMetrics
from .tls import ServerTls

if TYPE_CHECKING:
    from ..attest.attesters import Attester
    from .watch import KeyWatcher

__all__ = ["ModelSlot", "Runtime", "Source"]

log = logging.getLogger("sealedtorch.runtime")


class Source(Protocol):
    """Something that loads one model to serve (:class:`~.loader.ModelSource`,
    :class:`~.loader.PlainSource`).  ``name`` is read-only, so frozen dataclasses fit."""

    @property
    def name(self) -> str: ...

    def load(self, keys: KeySource | None, config: RuntimeConfig,
             device: torch.device | None = None) -> LoadedModel: ...


@dataclass
class ModelSlot:
    """One served model name: its source, state, model and worker."""

    name: str
    source: Source | None
    state: str = "loading"  # loading | ready | failed | unloaded | stopped
    error: BaseException | None = None
    model: LoadedModel | None = None
    batcher: Batcher | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state}
        if self.model is not None:
            out.update(self.model.describe())
        if self.error is not None:
            out["error"] = f"{type(self.error).__name__}: {self.error}"
        return out


@dataclass
class Runtime:
    """Models, their workers, the TLS identity and the attester of one server."""

    config: RuntimeConfig
    tls: ServerTls
    attester: Attester | None = None
    keys: KeySource | None = None
    metrics: RuntimeMetrics = field(default_factory=RuntimeMetrics)
    slots: dict[str, ModelSlot] = field(default_factory=dict)
    device: torch.device | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    #: Set once shutdown begins: no new loads, swaps or retries onto a new worker.
    stopping: bool = False
    watcher: KeyWatcher | None = None  # the key watcher, once started

    def start_watching(self) -> None:
        """Start re-checking loaded models' keys with the keycache (``key_watch_s``):
        unload on revocation, swap in a newer version (see :mod:`.watch`)."""
        from .watch import KeyWatcher

        if self.watcher is None:
            self.watcher = KeyWatcher(self).start()

    def add(self, item: Source | LoadedModel) -> None:
        if item.name in self.slots:
            raise ConfigError(f"model name {item.name!r} is given twice")
        if isinstance(item, LoadedModel):
            slot = ModelSlot(item.name, None)
            self.slots[item.name] = slot
            self._activate(slot, item)
        else:
            self.slots[item.name] = ModelSlot(item.name, item)
            self.metrics.ready.set(0, model=item.name)

    def _activate(self, slot: ModelSlot, model: LoadedModel) -> None:
        slot.model = model
        slot.batcher = Batcher(model, max_batch_size=self.config.max_batch_size,
                               max_queue=self.config.max_queue,
                               batch_delay_ms=self.config.batch_delay_ms, metrics=self.metrics)
        slot.state = "ready"
        self.metrics.load_seconds.set(model.load_seconds, model=model.name)
        self.metrics.ready.set(1, model=model.name)

    def load_all(self) -> None:
        """Load every pending model, in order (run in a background thread)."""
        try:
            for slot in list(self.slots.values()):
                if slot.state != "loading" or slot.source is None or self.stopping:
                    continue
                try:
                    model = slot.source.load(self.keys, self.config, self.device)
                except Exception as exc:
                    slot.state, slot.error = "failed", exc
                    log.error("model %s failed to load: %s: %s", slot.name, type(exc).__name__,
                              exc, extra={"fields": {"model": slot.name,
                                                     "error_type": type(exc).__name__}})
                    continue
                if self.stopping:
                    model.unload()
                    continue
                self._activate(slot, model)
                log.info("model %s ready", slot.name,
                         extra={"fields": {**model.describe(), "model": slot.name}})
            if self.ready:
                log.info("runtime ready: %d model(s)", len(self.slots))
        finally:
            self._done.set()

    @property
    def ready(self) -> bool:
        return bool(self.slots) and all(s.state == "ready" for s in self.slots.values()) \
            and not self.stopping

    @property
    def failures(self) -> list[ModelSlot]:
        return [s for s in self.slots.values() if s.state == "failed"]

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def attested_models(self) -> list[dict[str, Any]]:
        out = []
        for s in self.slots.values():
            m = s.model
            entry: dict[str, Any] = {
                "name": s.name, "model_id": m.model_id if m else None,
                "key_version": m.key_version if m else None,
                "arch": m.arch if m else None, "ready": s.state == "ready",
                "file_sha256": m.file_sha256 if m else None}
            pin = (self.config.models or {}).get(s.name)
            entry["pin"] = None if pin is None else pin.model_dump(mode="json")
            out.append(entry)
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queues, stop the workers, zero the weights."""
        self.stopping = True
        if self.watcher is not None:
            self.watcher.stop(timeout)
        for slot in self.slots.values():
            if slot.batcher is not None:
                slot.batcher.stop(timeout)
            if slot.model is not None:
                slot.model.unload()
            slot.state = "stopped"
            self.metrics.ready.set(0, model=slot.name)
