"""Where collateral comes from: cache, then the configured source, then a stale cache entry.

Invariant: one fetch per :class:`.CollateralKey` at a time (a per-key lock), and every
decision is made at the verification time ``at``, never the wall clock.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import CollateralError
from .cache import CacheEntry, CollateralCache
from .key import CollateralKey
from .model import Collateral, _iso, load_file
from .pccs import PccsClient

if TYPE_CHECKING:
    from .. import VerifierConfig

log = logging.getLogger("sealedtorch.attest.collateral")

#: Cache entries older than this (by the verification clock) are refreshed from the source,
#: even when Intel's ``nextUpdate`` is still ahead.  Intel reissues TCB info and CRLs well
#: before ``nextUpdate`` when it publishes a TCB recovery, so a day-old copy is re-checked.
DEFAULT_REFRESH_INTERVAL = 24 * 3600


_locks_guard = threading.Lock()
_locks: dict[CollateralKey, threading.Lock] = {}


def _lock_for(key: CollateralKey) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _from_file_source(url: str, key: CollateralKey) -> Collateral:
    parsed = urllib.parse.urlparse(url)
    path = Path(urllib.parse.unquote(parsed.path))
    if path.is_dir():
        path = path / key.filename
    collateral = load_file(path)
    try:
        collateral.check_for(key)
    except CollateralError as exc:
        raise CollateralError(f"collateral file {path}: {exc}") from None
    return collateral


def _fetch(url: str, key: CollateralKey, config: VerifierConfig) -> Collateral:
    if url.startswith("file:"):
        return _from_file_source(url, key)
    if not url.startswith(("http://", "https://")):
        raise CollateralError(f"the PCCS URL (--pccs-url, pccs_url) must be an http(s):// or "
                              f"file: URL, got {url!r}")
    return PccsClient(url, timeout=config.http_timeout).fetch(key)


def obtain(key: CollateralKey, *, at: int, config: VerifierConfig,
           refresh_interval: int = DEFAULT_REFRESH_INTERVAL) -> Collateral:
    """Collateral for ``key`` at verification time ``at``, from cache or source.

    - A cache entry valid at ``at`` and fetched less than ``refresh_interval`` seconds ago
      is used as is (no network).
    - Otherwise the source (``config.pccs_url``) is asked; a usable answer is cached.
    - If the source cannot be reached or answers badly, a cache entry that is still valid at
      ``at`` is used (logged); one that has expired raises :class:`CollateralError` naming
      the expired item and the source's failure.
    The returned collateral may still be outside its window at ``at`` (e.g. the source only
    has expired collateral); the verifier's window check names the item in that case.
    """
    cache = CollateralCache(config.cache_dir) if config.cache_dir is not None else None
    url = (config.pccs_url or "").strip() or None
    if cache is None and url is None:
        raise CollateralError(
            f"no collateral for {key}: the evidence carries none and no collateral source "
            "is configured (pass --pccs-url URL and/or --cache-dir DIR; on the keyserver: "
            "pccs_url in keyserver.json)")
    with _lock_for(key):
        entry = cache.get(key) if cache is not None else None
        if entry is not None and entry.fresh(at, refresh_interval):
            return entry.collateral
        if url is None:
            if entry is not None and entry.collateral.valid_at(at):
                return entry.collateral  # stale by age, but nothing to refresh from
            return _no_source(key, entry, at, "no pccs_url is configured to refresh it")
        try:
            fetched = _fetch(url, key, config)
        except CollateralError as exc:
            if entry is not None and entry.collateral.valid_at(at):
                log.warning("using cached DCAP collateral for %s (fetched %s): refresh "
                            "failed: %s", key, _iso(entry.fetched_at), exc)
                return entry.collateral
            if entry is None:
                cached = "nothing cached and " if cache is not None else ""
                raise CollateralError(f"no collateral for {key}: {cached}fetching it "
                                      f"failed: {exc}") from None
            return _no_source(key, entry, at, f"refresh failed: {exc}")
        if entry is not None and entry.collateral.valid_at(at) and not fetched.valid_at(at):
            log.warning("source %s served DCAP collateral for %s that is not valid at %s; "
                        "keeping the cached copy", url, key, _iso(at))
            return entry.collateral
        if cache is not None and not url.startswith("file:"):
            cache.put(key, fetched, fetched_at=at, source=url)
        return fetched


def _no_source(key: CollateralKey, entry: CacheEntry | None, at: int, why: str) -> Collateral:
    if entry is None:
        raise CollateralError(f"no collateral for {key}: nothing cached and {why}")
    try:
        entry.collateral.check_valid_at(at)
    except CollateralError as exc:
        raise CollateralError(f"cached {exc} [{key}]; {why}") from None
    raise CollateralError(f"cached collateral for {key} is unusable; {why}")  # pragma: no cover
