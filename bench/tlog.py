"""Transparency-log benchmark: the audit Merkle tree at N leaves, in the real stores.

Builds a tree of N leaves in a fresh store (SQLite file; PostgreSQL schema with
``--pg-url``): the first N-1 leaves in bulk (complete-subtree rows written in batches, the
same rows the append path writes), then measures, on top of it, with the store's own code:

1. append: one leaf appended by :func:`tlog.append_leaf` inside a write transaction (the
   extra cost every audit record pays), and a whole durable ``append_audit`` (record + chain
   + leaf + commit, FULL sync on SQLite);
2. inclusion proof generation (random leaf, tree size N) and verification;
3. consistency proof generation (random earlier size to N) and verification;
4. checkpoint (root from stored nodes + Ed25519 signature) and its verification, and a
   whole release receipt (checkpoint, one inclusion proof, one consistency proof);
5. bytes per leaf: the tlog_nodes table's size / N (SQLite: dbstat, or file growth;
   PostgreSQL: pg_total_relation_size).

Printed, not asserted (p50 / p99 over ``--samples``).  Develop with ``--leaves 10000``;
the figure the issue asks for is ``--leaves 1000000`` (run it once, ``nice -n 10``).

    python bench/tlog.py [--leaves 1000000] [--samples 300] [--pg-url postgresql://…/test]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sealedtorch import crypto
from sealedtorch.keyserver import tlog
from sealedtorch.keyserver.store import SqliteStore


def _bulk_build(store: Any, n: int, batch: int = 20_000) -> float:
    """Write the tree of leaves 0..n-1 (leaf data: b"leaf-<i>") in batches."""
    start = time.perf_counter()
    stack: list[tuple[int, bytes]] = []
    rows: list[tuple[int, int, bytes]] = []
    for i in range(n):
        acc = crypto.merkle_leaf_hash(b"leaf-%d" % i)
        rows.append((0, i, acc))
        level, idx = 0, i
        while stack and stack[-1][0] == level:
            acc = crypto.merkle_node_hash(stack.pop()[1], acc)
            level, idx = level + 1, idx >> 1
            rows.append((level, idx, acc))
        stack.append((level, acc))
        if len(rows) >= batch:
            _flush(store, rows)
            rows = []
    if rows:
        _flush(store, rows)
    return time.perf_counter() - start


def _flush(store: Any, rows: list[tuple[int, int, bytes]]) -> None:
    with store.transaction(durable=False) as tx:
        for part in range(0, len(rows), 300):
            tx.tlog_put_nodes(rows[part:part + 300])


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return f"p50 {statistics.median(xs) * 1e6:9.1f} µs   p99 {p99 * 1e6:9.1f} µs"


def _timed(fn: Any, samples: int) -> tuple[list[float], list[Any]]:
    times, results = [], []
    for _ in range(samples):
        t = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t)
    return times, results


def run(store: Any, label: str, n: int, samples: int,
        table_bytes: Any) -> None:
    print(f"== {label}: building {n:,} leaves …", flush=True)
    built = _bulk_build(store, n - 1)
    print(f"   bulk build of {n - 1:,} leaves: {built:.1f} s", flush=True)
    rng = random.Random(1)
    log = tlog.TransparencyLog(tlog.Signer.generate("bench.example/log"))

    # 1. append of leaf n-1 through the append path (rolled back: measure, don't grow)
    def one_append() -> None:
        try:
            with store.transaction() as tx:
                tlog.append_leaf(tx, n - 1, crypto.merkle_leaf_hash(b"next"))
                raise _Rollback
        except _Rollback:
            pass

    t_append, _ = _timed(one_append, samples)
    with store.transaction() as tx:
        tlog.append_leaf(tx, n - 1, crypto.merkle_leaf_hash(b"leaf-%d" % (n - 1)))

    with store.snapshot() as tx:
        size = tx.tlog_size()
        assert size == n, (size, n)
        root = tlog.root(tx, n)

        idx = [rng.randrange(n) for _ in range(samples)]
        it = iter(idx)
        t_inc, proofs = _timed(lambda: tlog.inclusion_proof(tx, next(it), n), samples)
        firsts = [rng.randrange(1, n) for _ in range(samples)]
        it2 = iter(firsts)
        t_con, cproofs = _timed(lambda: tlog.consistency_proof(tx, next(it2), n), samples)
        first_roots = {}
        for f in firsts[:samples]:
            first_roots[f] = tlog.root(tx, f)
        t_cp, notes = _timed(lambda: log.checkpoint(tx), samples)
        record = '{"decision":"allow","event":"release"}'
        it5 = iter(zip(idx, firsts, strict=True))

        def one_receipt() -> dict[str, Any]:
            i, f = next(it5)
            return log.receipt(tx, [(i, record)], since=f)

        t_receipt, _ = _timed(one_receipt, samples)

    leaves = {i: crypto.merkle_leaf_hash(b"leaf-%d" % i) for i in idx}
    it3 = iter(zip(idx, proofs, strict=True))

    def verify_inc() -> None:
        i, p = next(it3)
        tlog.verify_inclusion(i, n, leaves[i], p, root)

    t_vinc, _ = _timed(verify_inc, samples)
    it4 = iter(zip(firsts, cproofs, strict=True))

    def verify_con() -> None:
        f, p = next(it4)
        tlog.verify_consistency(f, n, first_roots[f], root, p)

    t_vcon, _ = _timed(verify_con, samples)
    note = notes[-1][1]
    t_vcp, _ = _timed(lambda: tlog.open_checkpoint(note, log.verifier), samples)
    text = tlog.Checkpoint(log.signer.name, n, root).text()
    t_sign, _ = _timed(lambda: log.signer.sign_note(text), samples)

    print(f"   append one leaf (in a write tx) {_stats(t_append)}")
    print(f"   inclusion proof: generate       {_stats(t_inc)}   "
          f"({statistics.mean(len(p) for p in proofs):.1f} hashes)")
    print(f"   inclusion proof: verify         {_stats(t_vinc)}")
    print(f"   consistency proof: generate     {_stats(t_con)}   "
          f"({statistics.mean(len(p) for p in cproofs):.1f} hashes)")
    print(f"   consistency proof: verify       {_stats(t_vcon)}")
    print(f"   checkpoint: root (sig cached)   {_stats(t_cp)}")
    print(f"   checkpoint: sign (new size)     {_stats(t_sign)}")
    print(f"   checkpoint: verify signature    {_stats(t_vcp)}")
    print(f"   release receipt (checkpoint + inclusion + consistency) {_stats(t_receipt)}")
    total = table_bytes()
    print(f"   storage: {total / n:.1f} bytes per leaf (tlog_nodes incl. index, "
          f"{total / 1e6:.1f} MB for {n:,} leaves)", flush=True)


class _Rollback(Exception):
    pass


def audit_append(store: Any, samples: int) -> None:
    """Durable append_audit (record + chain + leaf + commit) on a store whose audit table
    and tree agree (after ``samples`` warm-up records)."""
    for _ in range(50):
        with store.transaction() as tx:
            tx.append_audit({"time": time.time(), "event": "bench", "decision": "ok"})

    def one() -> None:
        with store.transaction() as tx:
            tx.append_audit({"time": time.time(), "event": "bench", "decision": "ok",
                             "model_id": "bench-model", "reasons": ["benchmark record"]})

    times, _ = _timed(one, samples)
    print(f"   durable append_audit (record + chain + leaf + commit) {_stats(times)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--leaves", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--pg-url", help="also run on PostgreSQL (a fresh schema is created)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlog-bench-") as tmp:
        path = Path(tmp) / "bench.db"
        store = SqliteStore(path)
        try:
            def sqlite_bytes() -> int:
                with store.snapshot() as tx:
                    try:
                        row = tx._one("SELECT sum(pgsize) FROM dbstat WHERE name IN "
                                      "('tlog_nodes')")
                        if row and row[0]:
                            return int(row[0])
                    except Exception:  # dbstat not compiled in: whole file
                        pass
                return os.path.getsize(path)

            run(store, "SQLite (WAL, synchronous=FULL)", args.leaves, args.samples,
                sqlite_bytes)
        finally:
            store.close()
        store = SqliteStore(Path(tmp) / "audit.db")
        try:
            print("== SQLite: audit appends with the tree (small log)")
            audit_append(store, args.samples)
        finally:
            store.close()
    if args.pg_url:
        _pg(args)


def _pg(args: argparse.Namespace) -> None:
    import psycopg

    from sealedtorch.keyserver.store_pg import PostgresStore

    schemas = [f"tlog_bench_{os.getpid()}_tree", f"tlog_bench_{os.getpid()}_audit"]
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in args.pg_url else "?"
    urls = [f"{args.pg_url}{sep}options=-csearch_path%3D{schema}" for schema in schemas]
    try:
        store = PostgresStore(urls[0])
        try:
            def pg_bytes() -> int:
                with store.snapshot() as tx:
                    return int(tx._one("SELECT pg_total_relation_size('tlog_nodes')")[0])

            run(store, "PostgreSQL (one replica)", args.leaves, args.samples, pg_bytes)
        finally:
            store.close()
        store = PostgresStore(urls[1])
        try:
            print("== PostgreSQL: audit appends with the tree (small log)")
            audit_append(store, args.samples)
        finally:
            store.close()
    finally:
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
