"""The keycache service: refresh keys from the keyserver, release them to local runtimes.

:class:`Keycache` ties together the :class:`~.store.KeyStore`, an :class:`~.upstream.Upstream`
(the keyserver), a local :class:`~.local.NonceRegistry` and an appraiser (how runtimes prove
themselves).  It knows nothing about HTTP: :mod:`.server` exposes it on a Unix socket.

Refreshing: a background thread fetches every released key at start, then every
``refresh`` seconds (sooner if the upstream's attestation token is about to expire).  A failed
fetch never stops the thread: it is logged, the held keys stay in service, and the next try
comes after an exponential backoff with jitter (:class:`Backoff`), capped at the refresh
interval.  Once the last successful refresh is older than ``max_stale`` the store refuses to
serve and the keys are wiped; the next successful refresh restores service.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import LogInconsistent, PolicyDenied, SealedTorchError
from . import protocol
from .local import Appraiser, LocalRequest, NonceRegistry, PeerCred
from .store import KeyStore
from .upstream import Upstream, UpstreamUnavailable

__all__ = ["Backoff", "Keycache"]

log = logging.getLogger("sealedtorch.keycache")


class Backoff:
    """Exponential backoff with "equal jitter": the n-th delay is uniform in [d/2, d] where
    d = min(cap, base·2ⁿ).  Half the delay is guaranteed, so retries never bunch at zero; the
    other half is random, so many keycaches restarting together do not retry in lockstep."""

    def __init__(self, *, base: float = 0.5, cap: float = 60.0,
                 rng: random.Random | None = None) -> None:
        if base <= 0 or cap <= 0:
            raise ValueError("backoff base and cap must be positive")
        self.base, self.cap = float(base), float(cap)
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not a secret)
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 62))
        self.failures += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


class Keycache:
    """Keys from the keyserver, held in memory, released to attested local runtimes."""

    def __init__(self, upstream: Upstream, appraiser: Appraiser, *, refresh: float = 60.0,
                 max_stale: float = 3600.0, nonce_ttl: float = 30.0,
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if refresh <= 0:
            raise ValueError("refresh interval must be positive")
        self.upstream = upstream
        self.appraiser = appraiser
        self.refresh_interval = float(refresh)
        self.store = KeyStore(max_stale=max_stale, clock=clock, wall_clock=wall_clock)
        self.nonces = NonceRegistry(ttl=nonce_ttl, clock=clock)
        self.backoff = backoff or Backoff(cap=min(60.0, self.refresh_interval))
        self._clock, self._wall = clock, wall_clock
        self._started_wall = wall_clock()
        self._lock = threading.Lock()  # serialises refreshes
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # refresh health (for status and error messages)
        self.last_attempt_wall: float | None = None
        self.last_error: str | None = None
        self.reachable: bool | None = None
        self.next_attempt_at: float | None = None
        self.refreshes = 0
        self.released = 0
        self.refused = 0

    # --- refreshing ---------------------------------------------------------------------

    def refresh_once(self) -> bool:
        """Fetch everything from the keyserver now.  Never raises; True on success."""
        with self._lock:
            self.last_attempt_wall = self._wall()
            try:
                released = self.upstream.fetch_all()
                changes = self.store.replace(released)
            except UpstreamUnavailable as exc:
                self._failed(f"keyserver unreachable: {exc}", reachable=False)
                return False
            except LogInconsistent as exc:
                # the keyserver's history was rewritten or forked: keys released under it
                # are not to be trusted, so stop serving them now (not at max-stale)
                self.store.clear()
                log.error("keycache: stopped serving, every key wiped: %s", exc)
                self._failed(f"keyserver transparency log inconsistent: {exc}",
                             reachable=True)
                return False
            except SealedTorchError as exc:
                self._failed(f"keyserver refused this keycache ({type(exc).__name__}): {exc}",
                             reachable=True)
                return False
            except Exception as exc:  # garbage from upstream, a bug: log, keep serving
                log.exception("keycache refresh failed unexpectedly")
                self._failed(f"refresh failed: {type(exc).__name__}: {exc}", reachable=False)
                return False
            self.refreshes += 1
            self.reachable, self.last_error = True, None
            self.backoff.reset()
            if changes:
                for model_id, version in changes.added:
                    log.info("keycache: now holding %s version %d", model_id, version)
                for model_id, version in changes.removed:
                    log.warning("keycache: dropped %s version %d (no longer released by the "
                                "keyserver: revoked, retired or policy changed)",
                                model_id, version)
                for model_id in changes.policy_changed:
                    log.info("keycache: policy of %s changed", model_id)
            log.debug("keycache refresh ok: %d key(s) held", len(self.store))
            return True

    def _failed(self, message: str, *, reachable: bool) -> None:
        self.last_error, self.reachable = message, reachable
        age = self.store.refresh_age()
        held = len(self.store)
        if self.store.is_stale():
            if self.store.expire():
                log.error("keycache: keys wiped, last successful refresh %.0f s ago exceeds "
                          "max-stale %g s", age or 0.0, self.store.max_stale)
        log.warning("keycache refresh failed (%s); holding %d key(s), last success %s", message,
                    held, "never" if age is None else f"{age:.0f} s ago")

    def _delay_after(self, ok: bool) -> float:
        delay = self.refresh_interval if ok else min(self.backoff.next(), self.refresh_interval)
        hint = getattr(self.upstream, "seconds_until_reattest", None)
        if ok and callable(hint):
            try:
                due = hint()
            except Exception:  # a hint must never break the loop
                due = None
            if isinstance(due, int | float):
                delay = min(delay, max(0.5, float(due)))
        age = self.store.refresh_age()
        if age is not None and len(self.store) and age <= self.store.max_stale:
            delay = min(delay, self.store.max_stale - age + 0.05)  # wipe on time
        return max(0.01, delay)

    def _run(self) -> None:
        while not self._stopping.is_set():
            ok = self.refresh_once()
            delay = self._delay_after(ok)
            self.next_attempt_at = self._clock() + delay
            self._wake.wait(delay)
            self._wake.clear()
        self.next_attempt_at = None

    def start(self) -> None:
        """Start the background refresher (first fetch immediately)."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="keycache-refresh", daemon=True)
        self._thread.start()

    def refresh_soon(self) -> None:
        """Wake the refresher now (e.g. on SIGHUP)."""
        self._wake.set()

    def stop(self, *, wipe: bool = True) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        close = getattr(self.upstream, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.debug("closing the upstream failed", exc_info=True)
        if wipe:
            self.store.clear()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the first successful refresh (tests, `run --wait`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.last_refresh is not None:
                return True
            time.sleep(0.02)
        return self.store.last_refresh is not None

    # --- local requests -----------------------------------------------------------------

    def challenge(self, peer: PeerCred | None) -> dict[str, Any]:
        nonce = self.nonces.issue(peer.uid if peer else None)
        return {"nonce": nonce, "expires_in": self.nonces.ttl, "mode": self.appraiser.mode}

    def release(self, request: LocalRequest, peer: PeerCred | None) -> dict[str, Any]:
        """Check one key request end to end; return the sealed key or raise a typed error."""
        try:
            self.nonces.consume(request.nonce, peer.uid if peer else None)
            claims = self.appraiser.appraise(request, peer)
            entry = self.store.get(request.model_id, request.version)
            decision = entry.policy.decide_use(claims)
            if not decision.allowed:
                raise PolicyDenied(
                    f"the policy of model {entry.model_id!r} does not allow this runtime "
                    f"(no allow rule matches)", decision.reasons)
            info = protocol.release_info(entry.model_id, entry.version, request.nonce)
            sealed = entry.seal_to(request.public_key, info=info)
        except SealedTorchError as exc:
            self.refused += 1
            log.warning("keycache refused %s version %s to %s: %s: %s", request.model_id,
                        request.version or "latest", peer or "unknown peer",
                        type(exc).__name__, exc)
            raise
        self.released += 1
        log.info("keycache released %s version %d to %s (%s%s; %s)", entry.model_id,
                 entry.version, peer or "unknown peer", claims.tee,
                 ", INSECURE" if claims.insecure else "", decision.reasons[0])
        return {"model_id": entry.model_id, "version": entry.version, "sealed_key": sealed,
                "policy_digest": entry.policy.digest()}

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        store = self.store
        age = store.refresh_age()
        next_in = None if self.next_attempt_at is None else \
            max(0.0, self.next_attempt_at - self._clock())
        renew = None
        hint = getattr(self.upstream, "seconds_until_reattest", None)
        if callable(hint):
            try:
                renew = hint()
            except Exception:
                renew = None
        return {
            "keys": [protocol.status_key(info) for info in store.list()],
            "keyserver": {"url": getattr(self.upstream, "url", None),
                          "token_renews_in_s": None if renew is None else round(renew, 1)},
            "refresh": {
                "interval_s": self.refresh_interval,
                "max_stale_s": store.max_stale,
                "last_ok_at": store.last_refresh_wall,
                "last_ok_age_s": None if age is None else round(age, 3),
                "last_attempt_at": self.last_attempt_wall,
                "last_error": self.last_error,
                "consecutive_failures": self.backoff.failures,
                "next_attempt_in_s": None if next_in is None else round(next_in, 3),
                "refreshes": self.refreshes,
            },
            "keyserver_reachable": self.reachable,
            "serving": not store.is_stale(),
            "stale": store.last_refresh is not None and store.is_stale(),
            "local": {"mode": self.appraiser.mode, "nonce_ttl_s": self.nonces.ttl,
                      "released": self.released, "refused": self.refused},
            "started_at": self._started_wall,
        }
