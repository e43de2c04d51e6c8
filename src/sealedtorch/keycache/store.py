"""The keycache's in-memory key store.

Semantics, in one place:

- The store holds model keys by ``(model_id, version)``, each with its model's policy (the
  policy the keyserver released it under, enforced again on every local request).
- :meth:`KeyStore.replace` installs the *complete* answer of one successful refresh.  What
  the keyserver no longer releases is gone afterwards: revocation, retirement or a policy
  that no longer lets this cache hold a key all take effect "by absence" within one refresh.
- ``version=None`` means the latest (highest) version the store holds for that model.
- Staleness: the store remembers when the last successful refresh happened (on an injectable
  monotonic clock).  Once that is longer ago than ``max_stale`` seconds, :meth:`KeyStore.get`
  refuses every request with :class:`KeysStale` and the keys are wiped (by the first
  :meth:`KeyStore.get`, :meth:`KeyStore.list` or :meth:`KeyStore.expire` that notices).
  Before the first successful refresh the store is empty and says so.
- Leases: a key released with a keyserver-signed lease (:mod:`sealedtorch.keyserver.leases`)
  is served for at most the lease's ``lease_seconds``, counted on the store's monotonic clock
  from the moment the refresh that brought it *started* (``leased_at``), whatever happens to
  the network or the wall clock.  At lease end the key is wiped (by the first reader or
  :meth:`KeyStore.expire` that notices; the refresher wakes for it) and requests for it get
  :class:`~sealedtorch.errors.LeaseExpired`.  A later refresh renews the lease.  max-stale
  stays the outer bound over all keys; the lease is the inner, per-key one.
- Refusal: :meth:`KeyStore.refuse` wipes everything at once when the keyserver explicitly
  refused this keycache, and requests name that refusal until a refresh succeeds again.

Memory hygiene (best effort, see docs/keycache.md): secrets are kept in ``bytearray``\\ s that
are overwritten with zeros when a key is dropped (revoked, expired, replaced, shut down).
Python cannot wipe the immutable ``bytes`` objects that the HPKE library and the keyserver
client hand around briefly, nor prevent the allocator or the OS from leaving copies; the
TEE's memory encryption, not this zeroing, is what keeps keys from the host.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import crypto
from ..attest.policy import Policy
from ..errors import (
    KeysStale,
    KeyUnavailable,
    LeaseExpired,
)
from ..keys import ModelKey

if TYPE_CHECKING:
    from ..keyserver.leases import Lease

__all__ = ["Changes", "Entry", "EntryInfo", "KeyStore", "KeysStale"]

Clock = Callable[[], float]

log = logging.getLogger("sealedtorch.keycache")


@dataclass(eq=False)
class Entry:
    """One key held in memory.  ``secret`` is wiped by :meth:`wipe`; never logged."""

    model_id: str
    version: int
    policy: Policy
    secret: bytearray = field(repr=False)
    fetched_at: float  # store clock: when this key was first fetched
    wall_fetched_at: float  # Unix time of the same moment, for humans
    lease_until: float | None = None  # store clock: end of the current lease (None: none)
    lease: Lease | None = field(default=None, repr=False)

    def seal_to(self, recipient_public_key: bytes, *, info: bytes) -> bytes:
        """HPKE-seal the key to ``recipient_public_key``.  Raises KeyUnavailable if wiped."""
        if not any(self.secret):
            raise KeyUnavailable(
                f"key {self.model_id!r} version {self.version} was dropped while in use")
        # bytes(...) is an immutable copy that lives until the HPKE call returns.
        return crypto.hpke_seal(recipient_public_key, bytes(self.secret), info=info)

    def wipe(self) -> None:
        crypto.zero(self.secret)


@dataclass(frozen=True)
class EntryInfo:
    """What may be shown about a held key: never the key."""

    model_id: str
    version: int
    latest: bool
    age_s: float
    fetched_at: float  # Unix time
    policy_digest: str
    lease_left_s: float | None = None  # None: held without a lease
    lease_id: str | None = None


@dataclass(frozen=True)
class Changes:
    """What one :meth:`KeyStore.replace` changed, for the log."""

    added: tuple[tuple[str, int], ...] = ()
    removed: tuple[tuple[str, int], ...] = ()
    policy_changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.policy_changed)


class KeyStore:
    """Model keys in memory, replaced wholesale by each successful refresh.

    Thread-safe: writers take a lock and publish a new immutable index; readers look up the
    current index without locking.
    """

    def __init__(self, *, max_stale: float, clock: Clock = time.monotonic,
                 wall_clock: Clock = time.time) -> None:
        if max_stale <= 0:
            raise ValueError("max_stale must be positive")
        self.max_stale = float(max_stale)
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], Entry] = {}
        self._latest: dict[str, int] = {}
        self._last_ok: float | None = None
        self._wall_last_ok: float | None = None
        self._expired = False
        self._refusal: str | None = None
        self.lease_expiries = 0  # keys wiped because their lease ended
        #: keys whose lease ended and that no refresh has renewed or withdrawn since
        self._lease_ended: dict[tuple[str, int], float] = {}

    # --- writers ----------------------------------------------------------------------

    def replace(self, released: Iterable[tuple[Any, ...]], *,
                leased_at: float | None = None) -> Changes:
        """Install the complete result of one successful refresh and restart the staleness
        clock.  Keys absent from ``released`` are wiped and dropped.

        Each item is ``(ModelKey, Policy)`` or ``(ModelKey, Policy, Lease | None)``; a lease
        runs from ``leased_at`` (store clock; default now), which the caller sets to when it
        *sent* the request, so network delay only ever shortens a lease."""
        now, wall = self._clock(), self._wall()
        start = now if leased_at is None else min(float(leased_at), now)
        incoming: dict[tuple[str, int], tuple[ModelKey, Policy, float | None, Any]] = {}
        for item in released:
            key, policy = item[0], item[1]
            lease = item[2] if len(item) > 2 else None
            if not isinstance(key, ModelKey) or not isinstance(policy, Policy):
                raise TypeError("released keys must be (ModelKey, Policy) pairs")
            until = None if lease is None else start + float(lease.seconds)
            incoming[(key.model_id, key.version)] = (key, policy, until, lease)
        with self._lock:
            old = self._entries
            new: dict[tuple[str, int], Entry] = {}
            added, policy_changed, doomed = [], set(), []
            for ident, (key, policy, until, lease) in incoming.items():
                entry = old.get(ident)
                if entry is not None and crypto.constant_time_equal(bytes(entry.secret),
                                                                    key.secret):
                    if entry.policy != policy:
                        entry = Entry(entry.model_id, entry.version, policy, entry.secret,
                                      entry.fetched_at, entry.wall_fetched_at)
                        policy_changed.add(ident[0])
                    entry.lease_until, entry.lease = until, lease  # renewed (or unleased)
                    new[ident] = entry
                    continue
                if entry is not None:  # same id and version, different bytes: take the new one
                    doomed.append(entry)
                new[ident] = Entry(key.model_id, key.version, policy, bytearray(key.secret),
                                   now, wall, until, lease)
                added.append(ident)
            removed = [ident for ident in old if ident not in new]
            doomed.extend(old[ident] for ident in removed)
            self._publish(new)
            self._last_ok, self._wall_last_ok = now, wall
            self._expired = False
            self._refusal = None
            self._lease_ended = {}  # each ended lease is now renewed or withdrawn
        for entry in doomed:
            entry.wipe()
        return Changes(tuple(sorted(added)), tuple(sorted(removed)),
                       tuple(sorted(policy_changed)))

    def expire(self) -> bool:
        """Wipe every key if the store is stale, and every key whose lease ended.  Returns
        True if it wiped anything."""
        ended = self.expire_leases()
        if not self.is_stale() or not self._entries:
            return bool(ended)
        self.clear(expired=True)
        return True

    def expire_leases(self) -> list[tuple[str, int]]:
        """Wipe and drop every key whose lease has ended; return their ids."""
        now = self._clock()
        if not any(e.lease_until is not None and now >= e.lease_until
                   for e in self._entries.values()):
            return []
        with self._lock:
            ended = self._sweep_locked(now)
        return self._wipe_ended(ended)

    def _sweep_locked(self, now: float) -> list[Entry]:
        """Drop (not yet wipe) the entries whose lease ended; the caller holds the lock."""
        old = self._entries
        ended = [e for e in old.values() if e.lease_until is not None and now >= e.lease_until]
        if ended:
            gone = {(e.model_id, e.version) for e in ended}
            self._publish({i: e for i, e in old.items() if i not in gone})
            for ident in gone:
                self._lease_ended[ident] = now
        return ended

    def _wipe_ended(self, ended: list[Entry]) -> list[tuple[str, int]]:
        for entry in ended:
            entry.wipe()
            self.lease_expiries += 1
            log.error("keycache: lease on %s version %d ended without renewal; key wiped "
                      "(served again once a refresh from the keyserver renews it)",
                      entry.model_id, entry.version)
        return sorted((e.model_id, e.version) for e in ended)

    def refuse(self, reason: str) -> int:
        """The keyserver explicitly refused this keycache: wipe every key now; requests
        name ``reason`` until a refresh succeeds.  Returns how many keys were wiped."""
        held = len(self._entries)
        self.clear()
        self._refusal = reason
        return held

    @property
    def refusal(self) -> str | None:
        """Why the keyserver refused this keycache at the last refresh (None: it did not)."""
        return self._refusal

    def next_lease_end(self) -> float | None:
        """Store-clock time at which the first held lease ends (None: no leased key)."""
        ends = [e.lease_until for e in self._entries.values() if e.lease_until is not None]
        return min(ends) if ends else None

    def next_renewal(self) -> float | None:
        """Store-clock time by which a refresh should renew leases: two thirds into the
        shortest held lease, so one or two failed attempts still leave time to renew."""
        due = [e.lease_until - e.lease.seconds / 3 for e in self._entries.values()
               if e.lease_until is not None and e.lease is not None]
        return min(due) if due else None

    def clear(self, *, expired: bool = False) -> None:
        """Wipe and drop every key (shutdown, or the keyserver refusing this cache)."""
        with self._lock:
            old = self._entries
            self._publish({})
            if expired:
                self._expired = True
        for entry in old.values():
            entry.wipe()

    def _publish(self, entries: dict[tuple[str, int], Entry]) -> None:
        latest: dict[str, int] = {}
        for model_id, version in entries:
            latest[model_id] = max(version, latest.get(model_id, 0))
        self._entries, self._latest = entries, latest  # readers see one or the other

    # --- readers ----------------------------------------------------------------------

    @property
    def last_refresh(self) -> float | None:
        """Store-clock time of the last successful refresh (None: never)."""
        return self._last_ok

    @property
    def last_refresh_wall(self) -> float | None:
        return self._wall_last_ok

    def refresh_age(self) -> float | None:
        """Seconds since the last successful refresh (None: never)."""
        return None if self._last_ok is None else max(0.0, self._clock() - self._last_ok)

    def is_stale(self) -> bool:
        age = self.refresh_age()
        return age is None or age > self.max_stale

    def get(self, model_id: str, version: int | None = None) -> Entry:
        """The held key for ``model_id`` (``version=None``: the latest held version).

        Raises :class:`KeysStale` when the store may not serve at all, else
        :class:`KeyUnavailable` naming what is held instead.
        """
        age = self.refresh_age()
        if age is None:
            raise KeysStale("the keycache holds no keys yet: it has not completed a fetch "
                            "from the keyserver since it started")
        if age > self.max_stale:
            self.expire()  # wipe as soon as staleness is observed, not at the next refresh
            raise KeysStale(
                f"the keycache's keys are stale: its last successful refresh from the "
                f"keyserver was {age:.0f} s ago, more than max-stale ({self.max_stale:g} s); "
                f"it serves no keys until the keyserver is reachable again")
        if self._refusal is not None:
            raise KeyUnavailable(f"the keycache holds no keys: the keyserver refused it at "
                                 f"its last refresh ({self._refusal}); keys were wiped")
        self.expire_leases()
        entry = self._lookup(model_id, version)
        if entry is not None:
            return entry
        ended: list[Entry] = []
        try:
            with self._lock:  # a miss: decide on one consistent view (no refresh half-seen)
                ended = self._sweep_locked(self._clock())
                entry = self._lookup(model_id, version)
                if entry is not None:
                    return entry
                self._raise_if_lease_ended(model_id, version)
                entries, latest = self._entries, self._latest
                if version is None or model_id not in latest:
                    raise KeyUnavailable(f"the keycache holds no key for model {model_id!r} "
                                         f"(unknown to the keyserver, revoked, or not "
                                         f"released to this keycache)")
                held = sorted(v for (m, v) in entries if m == model_id)
                raise KeyUnavailable(
                    f"the keycache holds no key for model {model_id!r} version {version} "
                    f"(revoked, retired or never released; it holds version(s) "
                    f"{', '.join(map(str, held))})")
        finally:
            self._wipe_ended(ended)

    def _lookup(self, model_id: str, version: int | None) -> Entry | None:
        """The held entry whose lease (if any) still runs, or None."""
        entries, latest = self._entries, self._latest
        if version is None:
            version = latest.get(model_id)
            if version is None:
                return None
        entry = entries.get((model_id, version))
        if entry is None or (entry.lease_until is not None
                             and self._clock() >= entry.lease_until):
            return None
        return entry

    def _raise_if_lease_ended(self, model_id: str, version: int | None) -> None:
        ended = sorted(v for (m, v) in self._lease_ended if m == model_id
                       and (version is None or v == version))
        if ended:
            raise LeaseExpired(
                f"the keycache's lease on model {model_id!r} version {ended[-1]} ended and "
                f"the keyserver has not renewed it (last successful refresh "
                f"{self.refresh_age() or 0.0:.0f} s ago); the key was wiped and is served "
                f"again only after a refresh renews its lease")

    def list(self) -> list[EntryInfo]:
        """Every held key, without secrets, sorted by model id then version."""
        self.expire()
        now = self._clock()
        entries, latest = self._entries, self._latest
        return [EntryInfo(e.model_id, e.version, latest.get(e.model_id) == e.version,
                          max(0.0, now - e.fetched_at), e.wall_fetched_at,
                          e.policy.digest(),
                          None if e.lease_until is None else max(0.0, e.lease_until - now),
                          None if e.lease is None else e.lease.lease_id)
                for _, e in sorted(entries.items())]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def expired(self) -> bool:
        """True if the keys were wiped for staleness and nothing was fetched since."""
        return self._expired
