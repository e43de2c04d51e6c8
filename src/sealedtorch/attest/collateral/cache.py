"""The on-disk DCAP collateral cache: one JSON file per :class:`.CollateralKey`.

Invariant: entries are replaced atomically, so a reader sees an old or a new entry, never
half of one; an entry that cannot be read or does not match its key counts as absent.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ...atomicfile import write_atomically
from ...errors import CollateralError
from .key import CollateralKey
from .model import FIELDS, Collateral, parse

log = logging.getLogger("sealedtorch.attest.collateral")

CACHE_FORMAT = "sealedtorch.dcap-collateral/1"


@dataclass(frozen=True)
class CacheEntry:
    key: CollateralKey
    collateral: Collateral
    fetched_at: int
    source: str

    def fresh(self, at: int, refresh_interval: int) -> bool:
        """Usable without asking the source again: valid now and recently fetched."""
        return self.collateral.valid_at(at) and 0 <= at - self.fetched_at < refresh_interval


class CollateralCache:
    """Collateral files under ``<cache_dir>/dcap/``, one per :class:`CollateralKey`.

    Files are JSON, written atomically (temporary file in the same directory, fsync,
    rename), so concurrent readers see either the old or the new entry, never half a file.
    An unreadable or mismatched entry is treated as absent (and logged).
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(cache_dir) / "dcap"

    def path(self, key: CollateralKey) -> Path:
        return self.directory / key.filename

    def get(self, key: CollateralKey) -> CacheEntry | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring unreadable DCAP collateral cache entry %s: %s", path, exc)
            return None
        try:
            obj = json.loads(data)
            if obj.get("format") != CACHE_FORMAT:
                raise CollateralError(f"unknown cache format {obj.get('format')!r}")
            entry_key = CollateralKey(obj["tee"], obj["fmspc"], obj["ca"])
            if entry_key != key:
                raise CollateralError(f"entry is for {entry_key}, not {key}")
            collateral = parse(obj["collateral"])
            collateral.check_for(key)
            fetched_at = obj["fetched_at"]
            if not isinstance(fetched_at, int):
                raise CollateralError("fetched_at is not an integer")
            return CacheEntry(key, collateral, fetched_at, str(obj.get("source", "")))
        except (CollateralError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring corrupt DCAP collateral cache entry %s: %s", path, exc)
            return None

    def put(self, key: CollateralKey, collateral: Collateral, *, fetched_at: int,
            source: str) -> Path:
        path = self.path(key)
        body = json.dumps({
            "format": CACHE_FORMAT, "tee": key.tee.value, "fmspc": key.fmspc, "ca": key.ca,
            "fetched_at": int(fetched_at), "source": source,
            "collateral": {k: collateral.fields[k] for k in FIELDS},
        }, indent=1).encode()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(path, body)
        except OSError as exc:
            # A cache that cannot be written costs a round trip next time, nothing more.
            log.warning("cannot write DCAP collateral cache entry %s: %s", path, exc)
        return path
