"""The key watcher: a running model stops when its key goes, and moves to a newer version.

Why: a key revoked (or a lease ended) at the keycache must also stop a runtime that already
decrypted the weights, not only the next load.  Every ``key_watch_s`` seconds (runtime
configuration, so part of the measurement) :class:`KeyWatcher` asks the keycache for the
latest key of each loaded sealed model, with the same attested request a load makes:

- the keycache still holds the loaded version, and nothing newer: nothing to do;
- it holds a *newer* version and the file at the model's configured path (re-read each
  time: the host replaces it, e.g. by an atomic rename) is sealed under that version: the
  new file is loaded beside the old model, then swapped in atomically (one attribute
  assignment that requests read); the old model's queued requests finish, then its weights
  are zeroed and dropped.  Rotation has no downtime: a request either runs on the old or on
  the new version;
- it no longer holds the loaded version (revoked, retired, lease ended, keycache stale or
  refused by the keyserver, policy changed): the model is *unloaded* — its worker drained,
  weights zeroed, every reference dropped; ``/v2/models/NAME/ready`` answers false and
  inference 503 with a :class:`~sealedtorch.errors.ModelUnloaded` problem naming why;
- the keycache cannot be reached at all (socket gone, timeouts): the model keeps serving
  until ``key_watch_grace_s`` after the last successful check, then is unloaded.

An unloaded model — or one that failed to load for want of its key, when ``serve
--stay-unready`` keeps the server up — is loaded again, without a restart, as soon as the
keycache holds the key its configured file needs.  Every unload and reload is logged and counted
(``sealedtorch_runtime_model_unloads_total``, ``..._model_reloads_total``).

Bound: a model stops serving at most ``key_watch_s`` (+ one keycache round trip) after the
keycache stops holding its key, and the keycache stops at the latest at lease end.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import KeyUnavailable, ModelUnloaded, SealedTorchError

if TYPE_CHECKING:
    from .batching import Batcher
    from .loader import LoadedModel
    from .state import ModelSlot, Runtime, Source

__all__ = ["KeyWatcher"]

log = logging.getLogger("sealedtorch.runtime.watch")


def _sealed_file(source: Source | None) -> Path | None:
    """The file a source loads from (re-read on every check), or None for sources that
    hold no key (in-memory modules, plaintext sources without a path)."""
    path = getattr(source, "path", None)
    return path if isinstance(path, Path) else None


def _unreachable(exc: BaseException) -> bool:
    """The keycache could not be asked at all (as opposed to answering "not held")."""
    from ..keycache.client import KeycacheUnavailable

    return isinstance(exc, KeycacheUnavailable)


@dataclass
class _Watch:
    confirmed_at: float
    failed_file: tuple[int, int, int] | None = None  # (mtime_ns, size, version) that failed


def _retired_module(*args: Any, **kwargs: Any) -> Any:
    """What a retired model's ``module`` becomes: its weights are gone, it never runs."""
    raise ModelUnloaded("this model was unloaded; its weights are zeroed")


class KeyWatcher:
    """Re-checks every loaded sealed model's key with the keycache (see the module doc)."""

    def __init__(self, runtime: Runtime, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.interval = runtime.config.key_watch_s
        self.grace = runtime.config.key_watch_grace_s
        self._clock = clock
        self._state: dict[str, _Watch] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one check at a time

    @property
    def enabled(self) -> bool:
        return self.interval > 0 and self.runtime.keys is not None

    def start(self) -> KeyWatcher:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="runtime-key-watch",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except Exception:  # the watcher must never die
                log.exception("key watcher check failed unexpectedly")

    # --- one round ----------------------------------------------------------------------

    def check_once(self) -> None:
        """Check every sealed model once (the thread calls this every ``key_watch_s``)."""
        with self._lock:
            for slot in list(self.runtime.slots.values()):
                if self._stop.is_set() or self.runtime.stopping:
                    return
                path = _sealed_file(slot.source)
                if path is None:
                    continue  # in-memory modules and plaintext sources hold no key
                if slot.state == "ready" and slot.model is not None and \
                        slot.model.model_id is not None:
                    self._check_loaded(slot, slot.model, path)
                elif slot.state == "unloaded" or (slot.state == "failed" and isinstance(
                        slot.error, KeyUnavailable)):  # (``serve --stay-unready``)
                    self._try_reload(slot, path, reason="key available again")

    def _check_loaded(self, slot: ModelSlot, model: LoadedModel, path: Path) -> None:
        keys = self.runtime.keys
        assert keys is not None and model.model_id is not None
        now = self._clock()
        watch = self._state.setdefault(slot.name, _Watch(now))
        metrics = self.runtime.metrics
        try:
            latest = keys.get_key(model.model_id, None)
        except SealedTorchError as exc:
            if _unreachable(exc):
                metrics.key_checks.inc(model=slot.name, outcome="unreachable")
                if now - watch.confirmed_at > self.grace:
                    self.unload(slot, exc, why=f"the keycache has been unreachable for "
                                               f"{now - watch.confirmed_at:.0f} s (grace "
                                               f"{self.grace:g} s)")
                else:
                    log.warning("key watcher: keycache unreachable for model %s; serving "
                                "on for up to %.0f s more: %s", slot.name,
                                self.grace - (now - watch.confirmed_at), exc)
                return
            metrics.key_checks.inc(model=slot.name, outcome="not_held")
            self.unload(slot, exc, why="the keycache no longer holds its key")
            return
        held_latest = latest.version
        del latest  # the watcher needs the answer, not the key
        if held_latest == model.key_version:
            watch.confirmed_at = now
            metrics.key_checks.inc(model=slot.name, outcome="held")
            return
        if held_latest > (model.key_version or 0) and \
                self._try_reload(slot, path,
                                 reason=f"the keycache holds version {held_latest}"):
            return
        try:  # no newer file (yet): is the loaded version itself still held?
            keys.get_key(model.model_id, model.key_version)
        except SealedTorchError as exc:
            if _unreachable(exc):
                return  # the next round decides, within the grace period
            metrics.key_checks.inc(model=slot.name, outcome="not_held")
            self.unload(slot, exc, why="the keycache no longer holds its key")
            return
        watch.confirmed_at = now
        metrics.key_checks.inc(model=slot.name, outcome="held")

    def _try_reload(self, slot: ModelSlot, path: Path, *, reason: str) -> bool:
        """Load the file at the slot's ``path`` if it is sealed under a key the keycache
        holds and newer than what is served; swap it in.  True if it did."""
        from ..format import read_preamble

        source, keys = slot.source, self.runtime.keys
        assert source is not None and keys is not None
        try:
            st = path.stat()
            preamble = read_preamble(path)
        except (OSError, SealedTorchError) as exc:
            log.debug("key watcher: %s unreadable: %s", path, exc)
            return False
        current = slot.model
        if current is not None and (preamble.model_id != current.model_id
                                    or preamble.key_version <= (current.key_version or 0)):
            return False  # the file is not a newer version of what is served
        mark = (st.st_mtime_ns, st.st_size, preamble.key_version)
        watch = self._state.setdefault(slot.name, _Watch(self._clock()))
        if watch.failed_file == mark:
            return False  # this very file failed to load before; wait for another one
        try:
            keys.get_key(preamble.model_id, preamble.key_version)  # held?  (cheap refusal)
        except SealedTorchError:
            return False
        started = self._clock()
        try:
            model = source.load(keys, self.runtime.config, self.runtime.device)
        except Exception as exc:
            watch.failed_file = mark
            self.runtime.metrics.reloads.inc(model=slot.name, outcome="failed")
            log.error("key watcher: could not load %s version %d from %s: %s: %s", slot.name,
                      preamble.key_version, path, type(exc).__name__, exc,
                      extra={"fields": {"model": slot.name, "error_type": type(exc).__name__}})
            return False
        if self._stop.is_set() or self.runtime.stopping:
            model.unload()
            return False
        old = current.key_version if current is not None else None
        self.swap(slot, model)
        watch.confirmed_at, watch.failed_file = self._clock(), None
        self.runtime.metrics.reloads.inc(model=slot.name, outcome="ok")
        log.warning("model %s now serves key version %d (was %s; %s), loaded in %.2f s "
                    "without a restart", slot.name, model.key_version,
                    "unloaded" if old is None else f"version {old}", reason,
                    self._clock() - started,
                    extra={"fields": {"model": slot.name, "event": "model_reload",
                                      "model_id": model.model_id,
                                      "key_version": model.key_version,
                                      "previous_version": old}})
        return True

    # --- state changes ------------------------------------------------------------------

    def swap(self, slot: ModelSlot, model: LoadedModel) -> None:
        """Serve ``model`` in ``slot`` from now on; drain, zero and drop the old one."""
        from .batching import Batcher

        cfg = self.runtime.config
        batcher = Batcher(model, max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
                          batch_delay_ms=cfg.batch_delay_ms, metrics=self.runtime.metrics)
        old_model, old_batcher = slot.model, slot.batcher
        slot.model = model
        slot.batcher = batcher  # the switch: requests read the model from their batcher
        slot.state, slot.error = "ready", None
        self.runtime.metrics.load_seconds.set(model.load_seconds, model=slot.name)
        self.runtime.metrics.ready.set(1, model=slot.name)
        self._retire(old_model, old_batcher)

    def unload(self, slot: ModelSlot, cause: BaseException, *, why: str) -> None:
        """Stop serving ``slot``: unready, worker drained, weights zeroed, references
        dropped; requests get 503 with a :class:`ModelUnloaded` problem naming ``why``."""
        model, batcher = slot.model, slot.batcher
        what = f"model id {model.model_id!r} version {model.key_version}" if model else "?"
        error = ModelUnloaded(f"model {slot.name!r} ({what}) was unloaded: {why} "
                              f"({type(cause).__name__}: {cause})")
        slot.state, slot.error = "unloaded", error
        slot.model, slot.batcher = None, None
        self.runtime.metrics.ready.set(0, model=slot.name)
        self.runtime.metrics.unloads.inc(model=slot.name, reason=type(cause).__name__)
        log.error("%s", error, extra={"fields": {
            "model": slot.name, "event": "model_unload", "reason": type(cause).__name__,
            "model_id": model.model_id if model else None,
            "key_version": model.key_version if model else None}})
        self._retire(model, batcher)

    def _retire(self, model: LoadedModel | None, batcher: Batcher | None) -> None:
        if batcher is not None:
            batcher.stop(self.runtime.config.request_timeout_s)  # queued requests finish
        if model is not None:
            model.unload()  # zero the weights in place
            model.module = _retired_module  # drop the last reference to the weights
        del model, batcher
        gc.collect()

