"""``keyserver rewrap``: move every wrapped model key to a new KEK while servers run.

Steps, each safe to interrupt (a rerun with the same target picks up where it stopped):

1. **stage** — the target KEK joins ``keyserver.json`` as a read-only fallback, so a
   running server can unwrap records once they move (its :class:`~.kek.KekRing` re-reads
   the file when it meets a KEK id it does not know);
2. **move** — for each record not yet under the target: unwrap under the KEK its
   ``kek_id`` names, wrap under the target, and swap the record in one transaction with
   its audit record, compare-and-set on the old wrapped bytes (a record retired or moved
   meanwhile is left alone, never resurrected or wrapped twice);
3. **switch** — the target becomes the active KEK; the previous one stays a read-only
   fallback.  Running servers wrap new keys under the target from their next wrap on;
4. **sweep** — records written under the old KEK by a server between 2 and 3 are moved;
   then every row MAC (:mod:`.rowmac`: models, key versions, admin tokens, the store's
   marker) that verifies under an old KEK is made again under the target (a row that does
   not verify is left alone, never blessed, and stays refused);
5. **prune** (``--prune``) — fallbacks that no record references any more are dropped
   from the configuration (their keys or files are not destroyed: that is the owner's
   call).

Only one rewrap runs per data directory at a time (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomicfile import write_atomically
from ..errors import ConfigError, ConflictError, SealedTorchError
from .audit import ERROR, OK
from .config import CONFIG_FILE, KeyserverConfig, load_config, open_store, with_database
from .kek import (
    FileKek,
    KekProvider,
    KekRing,
    describe_spec,
    open_provider,
    open_ring,
    parse_target,
)
from .rowmac import META_KEY, RowIntegrity, seal_all
from .store import KeyRecord

LOCK_FILE = "rewrap.lock"

#: progress(done, total, record, from_kek_id, to_kek_id) after each moved record
Progress = Callable[[int, int, KeyRecord, str | None, str], None]


@dataclass
class RewrapReport:
    target: str                       # kek id
    moved: int = 0
    skipped: int = 0                  # changed meanwhile (retired, moved by someone else)
    staged: bool = False              # the target was added to the configuration now
    switched: bool = False            # the target became the active KEK now
    pruned: list[str] = field(default_factory=list)
    remacced: int = 0                 # row MACs moved to the target
    usage: dict[str | None, int] = field(default_factory=dict)  # records per kek id at the end


@dataclass(frozen=True)
class KekStatus:
    role: str            # active | fallback | unconfigured
    kek_id: str | None
    where: str
    records: int


# --------------------------------------------------------------------------- config file

def _read_raw(cfg: KeyserverConfig) -> dict[str, Any]:
    path = cfg.data_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("kek"), dict):
        raise ConfigError(f"{path}: no kek section")
    return raw


def write_kek_section(cfg: KeyserverConfig, section: dict[str, Any]) -> None:
    """Replace the ``kek`` section of ``keyserver.json`` atomically (temp file, fsync,
    rename, fsync of the directory); every other setting is kept as it is."""
    raw = _read_raw(cfg)
    raw["kek"] = section
    write_atomically(cfg.data_dir / CONFIG_FILE, (json.dumps(raw, indent=2) + "\n").encode(),
                     sync_dir=True)


def _with_id(spec: dict[str, Any], kek_id: str) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k != "fallback"}
    out["kek_id"] = kek_id
    return out


def _staged(section: dict[str, Any], active_id: str, target: dict[str, Any]) -> dict[str, Any]:
    """``section`` with ``target`` among the fallbacks (unless it is there or active)."""
    if target["kek_id"] == active_id:
        return section
    fallbacks = list(section.get("fallback") or [])
    if any(f.get("kek_id") == target["kek_id"] for f in fallbacks):
        return section
    return {**section, "fallback": [*fallbacks, target]}


def _switched(section: dict[str, Any], active_id: str,
              target: dict[str, Any]) -> dict[str, Any]:
    """``target`` active; the previous active KEK first among the fallbacks."""
    if target["kek_id"] == active_id:
        return section
    previous = _with_id(section, active_id)
    rest = [f for f in section.get("fallback") or []
            if f.get("kek_id") not in (target["kek_id"], active_id)]
    return {**target, "fallback": [previous, *rest]}


@contextlib.contextmanager
def _exclusive(cfg: KeyserverConfig) -> Iterator[None]:
    path = cfg.data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another rewrap is running on {cfg.data_dir}") from None
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- rewrap

def _open_target(text: str, cfg: KeyserverConfig) -> tuple[dict[str, Any], KekProvider]:
    spec = parse_target(text, data_dir=cfg.data_dir)
    if spec["type"] == "file" and not cfg.path(spec["path"]).exists():
        FileKek.create(cfg.path(spec["path"]))
    provider = open_provider(spec, base_dir=cfg.data_dir)
    spec["kek_id"] = provider.kek_id
    return spec, provider


def rewrap(data_dir: Path | str, target: str, *, progress: Progress | None = None,
           stage_only: bool = False, prune: bool = False, batch: int = 64,
           database: str | None = None,
           clock: Callable[[], float] = time.time) -> RewrapReport:
    """Move every wrapped key of the keyserver in ``data_dir`` under ``target``
    (``file:PATH`` or a ``pkcs11:`` URI); see the module docstring for the steps.
    ``database``: a PostgreSQL URL replacing the store named in the data directory."""
    cfg = with_database(load_config(data_dir), database)
    with _exclusive(cfg):
        spec, new = _open_target(target, cfg)
        ring = open_ring(cfg.kek, data_dir=cfg.data_dir, config_file=cfg.data_dir / CONFIG_FILE)
        store = open_store(cfg)
        try:
            return _rewrap(cfg, spec, new, ring, store, progress=progress,
                           stage_only=stage_only, prune=prune, batch=batch, clock=clock)
        finally:
            store.close()
            ring.close()
            new.close()


def _rewrap(cfg: KeyserverConfig, spec: dict[str, Any], new: KekProvider, ring: KekRing,
            store: Any, *, progress: Progress | None, stage_only: bool, prune: bool,
            batch: int, clock: Callable[[], float]) -> RewrapReport:
    report = RewrapReport(target=new.kek_id)
    section = _read_raw(cfg)["kek"]
    staged = _staged(section, ring.kek_id, spec)
    if staged is not section:
        write_kek_section(cfg, staged)
        report.staged = True
    if stage_only:
        with store.snapshot() as tx:
            report.usage = tx.kek_usage()
        return report

    def audit(event: str, decision: str = OK, **fields: Any) -> None:
        with store.transaction() as tx:
            tx.append_audit({"time": clock(), "event": event, "decision": decision,
                             "actor": "local", **fields})

    with store.snapshot() as tx:
        before = tx.kek_usage()
    total = sum(n for k, n in before.items() if k != new.kek_id)
    audit("kek.rewrap.start", to=new.kek_id, pending=total,
          usage={str(k): n for k, n in before.items()})
    try:
        _move_all(store, ring, new, report, total, progress, batch, clock)
        section = _read_raw(cfg)["kek"]
        switched = _switched(section, ring.kek_id, spec)
        if switched is not section:
            write_kek_section(cfg, switched)
            ring.reload()
            report.switched = True
        _move_all(store, ring, new, report, total, progress, batch, clock)  # the sweep
        if report.switched or ring.kek_id == new.kek_id:
            report.remacced = _remac(store, ring)
    except SealedTorchError as exc:
        audit("kek.rewrap.done", ERROR, to=new.kek_id, moved=report.moved,
              problem=exc.problem_type, reasons=[str(exc)])
        raise
    with store.snapshot() as tx:
        report.usage = tx.kek_usage()
    if prune:
        section = _read_raw(cfg)["kek"]
        with store.snapshot() as tx:
            macs = tx.mac_usage()
            marker = tx.get_meta(META_KEY) or ""
        keep = [f for f in section.get("fallback") or []
                if report.usage.get(f.get("kek_id")) or macs.get(f.get("kek_id"))
                or marker.startswith(f"{f.get('kek_id')} ")]
        report.pruned = [str(f.get("kek_id")) for f in section.get("fallback") or []
                         if f not in keep]
        if report.pruned:
            pruned = {k: v for k, v in section.items() if k != "fallback"}
            if keep:
                pruned["fallback"] = keep
            write_kek_section(cfg, pruned)
    audit("kek.rewrap.done", to=new.kek_id, moved=report.moved, skipped=report.skipped,
          remacced=report.remacced,
          switched=report.switched, pruned=report.pruned,
          usage={str(k): n for k, n in report.usage.items()})
    return report


def _move_all(store: Any, ring: KekRing, new: KekProvider, report: RewrapReport, total: int,
              progress: Progress | None, batch: int, clock: Callable[[], float]) -> None:
    idle = 0
    while True:
        with store.snapshot() as tx:
            records = tx.wrapped_keys(not_under=new.kek_id, limit=batch)
        if not records:
            return
        if idle >= 3:
            raise ConflictError("records keep changing while rewrap moves them; run it "
                                "again")
        changed = 0
        for rec in records:
            assert rec.wrapped is not None
            try:
                secret = ring.unwrap(rec.wrapped, model_id=rec.model_id, version=rec.version,
                                     kek_id=rec.kek_id)
                wrapped = new.wrap(secret, model_id=rec.model_id, version=rec.version)
            except SealedTorchError as exc:
                raise type(exc)(f"model {rec.model_id!r} version {rec.version} (KEK "
                                f"{rec.kek_id}): {exc}") from None
            with store.transaction() as tx:
                done = tx.rewrap_key(rec.model_id, rec.version, expected=rec.wrapped,
                                     wrapped=wrapped, kek_id=new.kek_id)
                if done:
                    tx.append_audit({"time": clock(), "event": "kek.rewrap", "decision": OK,
                                     "actor": "local", "model_id": rec.model_id,
                                     "version": rec.version, "from": rec.kek_id,
                                     "to": new.kek_id})
            if done:
                report.moved += 1
                changed += 1
                if progress is not None:
                    progress(report.moved, max(total, report.moved), rec, rec.kek_id,
                             new.kek_id)
            else:
                report.skipped += 1
        idle = 0 if changed else idle + 1  # all changed under us: look again


def _remac(store: Any, ring: KekRing) -> int:
    """Row MACs and the store's marker under the ring's (new) active KEK; rows that do not
    verify under the KEK they name are not touched."""
    rows = RowIntegrity(ring)
    with store.transaction() as tx:
        n = seal_all(tx, rows, only_unsealed=False)
        marker = tx.get_meta(META_KEY)
        if marker is not None and not marker.startswith(ring.kek_id + " ") \
                and rows.marker_ok(marker):
            tx.set_meta(META_KEY, rows.marker())
    return n


# --------------------------------------------------------------------------- status

def kek_status(data_dir: Path | str, *, database: str | None = None) -> list[KekStatus]:
    """The configured KEKs and how many records each wraps (plus record KEK ids that are
    not configured at all: those records cannot be released)."""
    cfg = with_database(load_config(data_dir), database)
    section = cfg.kek
    ring = open_ring(section, data_dir=cfg.data_dir, config_file=None)
    try:
        store = open_store(cfg)
        try:
            with store.snapshot() as tx:
                usage = tx.kek_usage()
        finally:
            store.close()
        out = [KekStatus("active", ring.kek_id, describe_spec(section),
                         usage.pop(ring.kek_id, 0))]
        for spec in section.get("fallback") or []:
            kek_id = spec.get("kek_id")
            out.append(KekStatus("fallback", kek_id, describe_spec(spec),
                                 usage.pop(kek_id, 0)))
        out.extend(KekStatus("unconfigured", k, "-", n) for k, n in sorted(
            usage.items(), key=lambda kv: str(kv[0])))
        return out
    finally:
        ring.close()
