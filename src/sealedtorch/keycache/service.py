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

Leases (see docs/keycache.md): every key from the keyserver comes with a signed lease of
``lease_seconds``.  The refresher renews two thirds into the shortest lease (sooner than
``refresh`` when leases are short), and wakes at each lease end to wipe what was not renewed,
so a key stops being served at lease end whatever the network does.  The two bounds nest:
a key is served only while its lease runs *and* the last refresh is younger than max-stale.

Outage or refusal: only :class:`~.upstream.UpstreamUnavailable` (transport failures, 5xx,
503, garbage) is an outage, in which held keys keep being served to those bounds.  Any other
typed error is an explicit refusal by the keyserver (attestation, policy, authentication, a
4xx problem): every key is wiped at once.
"""

from __future__ import annotations

import collections
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


#: How many (model version, runtime) rows ``keycache status`` keeps.
RELEASE_LOG_SIZE = 256


def runtime_measurement(claims: Any) -> str | None:
    """The code identity of a runtime, hex: the sim/SNP measurement, TDX MRTD or SGX
    MRENCLAVE (whichever the claims carry)."""
    for name in ("measurement", "mr_td", "mr_enclave"):
        value = getattr(claims, name, None)
        if isinstance(value, bytes | bytearray) and value:
            return bytes(value).hex()
    return None


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
        self.refusals = 0
        self.released = 0
        self.refused = 0
        # who got which key and when (for `keycache status`): one row per model version
        # and runtime (pid, uid, measurement), at most RELEASE_LOG_SIZE rows, oldest dropped
        self._release_log: collections.OrderedDict[tuple[Any, ...], dict[str, Any]] = \
            collections.OrderedDict()
        self._release_log_lock = threading.Lock()

    # --- refreshing ---------------------------------------------------------------------

    def refresh_once(self) -> bool:
        """Fetch everything from the keyserver now.  Never raises; True on success."""
        with self._lock:
            self.last_attempt_wall = self._wall()
            sent_at = self._clock()  # leases run from here: delays only shorten them
            try:
                released = self.upstream.fetch_all()
                changes = self.store.replace(released, leased_at=sent_at)
            except UpstreamUnavailable as exc:
                text = str(exc)  # a TLS verification failure is not an outage: say which
                self._failed(text if text.startswith("TLS verification") else
                             f"keyserver unreachable: {text}", reachable=False)
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
                message = f"keyserver refused this keycache ({type(exc).__name__}): {exc}"
                wiped = self.store.refuse(f"{type(exc).__name__}: {exc}")
                self.refusals += 1
                log.error("keycache: %s; wiped %d key(s) at once", message, wiped)
                self._failed(message, reachable=True)
                return False
            except Exception as exc:  # garbage from upstream, a bug: log, keep serving
                log.exception("keycache refresh failed unexpectedly")
                self._failed(f"refresh failed: {type(exc).__name__}: {exc}", reachable=False)
                return False
            self.refreshes += 1
            self.reachable, self.last_error = True, None
            took = self._clock() - sent_at
            shortest = min((item[2].seconds for item in released
                            if len(item) > 2 and item[2] is not None), default=None)
            if shortest is not None and took > shortest / 3:
                log.warning("keycache: the refresh took %.1f s, more than a third of the "
                            "shortest lease (%d s); keys may lapse before the next renewal",
                            took, shortest)
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
        now = self._clock()
        renew = self.store.next_renewal()
        if ok and renew is not None:
            delay = min(delay, max(0.05, renew - now))  # renew leases before they end
        end = self.store.next_lease_end()
        if end is not None:
            delay = min(delay, max(0.0, end - now) + 0.05)  # wipe at lease end
        return max(0.01, delay)

    def expire_leases(self) -> None:
        """Wipe keys whose lease ended (the refresher calls this on every wake-up)."""
        self.store.expire_leases()  # logs and counts each wiped key

    def _run(self) -> None:
        while not self._stopping.is_set():
            ok = self.refresh_once()
            self.expire_leases()
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
        self._record_release(entry.model_id, entry.version, peer, claims)
        log.info("keycache released %s version %d to %s (%s%s; %s)", entry.model_id,
                 entry.version, peer or "unknown peer", claims.tee,
                 ", INSECURE" if claims.insecure else "", decision.reasons[0])
        return {"model_id": entry.model_id, "version": entry.version, "sealed_key": sealed,
                "policy_digest": entry.policy.digest()}

    # --- status -------------------------------------------------------------------------

    def _record_release(self, model_id: str, version: int, peer: PeerCred | None,
                        claims: Any) -> None:
        measurement = runtime_measurement(claims)
        pid, uid, gid = (peer.pid, peer.uid, peer.gid) if peer else (None, None, None)
        row_key = (model_id, version, pid, uid, measurement)
        now = self._wall()
        with self._release_log_lock:
            row = self._release_log.pop(row_key, None)
            if row is None:
                row = {"model_id": model_id, "version": version, "pid": pid, "uid": uid,
                       "gid": gid, "tee": str(getattr(claims, "tee", "")),
                       "measurement": measurement,
                       "insecure": bool(getattr(claims, "insecure", False)),
                       "first_at": now, "count": 0}
            row["last_at"] = now
            row["count"] += 1
            self._release_log[row_key] = row
            while len(self._release_log) > RELEASE_LOG_SIZE:
                self._release_log.popitem(last=False)

    def releases(self) -> list[dict[str, Any]]:
        """Which runtime (pid, uid, measurement) got which key version, and when (first and
        last time, how often), most recent last.  Never key bytes."""
        with self._release_log_lock:
            return [dict(row) for row in self._release_log.values()]

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
            "keys": [{**protocol.status_key(info),
                      "lease_left_s": None if info.lease_left_s is None
                      else round(info.lease_left_s, 3), "lease_id": info.lease_id}
                     for info in store.list()],
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
                "refusals": self.refusals,
                "lease_expiries": store.lease_expiries,
                "refused": store.refusal,
            },
            "keyserver_reachable": self.reachable,
            "serving": not store.is_stale() and store.refusal is None,
            "stale": store.last_refresh is not None and store.is_stale(),
            "local": {"mode": self.appraiser.mode, "nonce_ttl_s": self.nonces.ttl,
                      "released": self.released, "refused": self.refused},
            "started_at": self._started_wall,
            "releases": self.releases(),
        }
