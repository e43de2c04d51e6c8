"""The attacker of issue 11 §2, as a separate process: a store writer (database access, no
data directory, so no KEK and no log signing key) who drops the append-only triggers,
rewrites history, and recomputes the whole hash chain *and* the stored Merkle tree so that
everything inside the database is self-consistent again.

    python forge_log.py (--sqlite PATH | --postgres URL) MODE

MODE: ``rewrite`` (the first release allowed becomes a denial), ``truncate`` (the two
newest records deleted), ``reorder`` (records 2 and 3 swapped).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sealedtorch import crypto
from sealedtorch.keyserver import audit, tlog
from sealedtorch.keyserver.protocol import canonical_json


class Nodes:
    def __init__(self) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}

    def tlog_size(self) -> int:
        return sum(1 for level, _ in self.nodes if level == 0)

    def tlog_nodes(self, coords: Any) -> dict[tuple[int, int], bytes]:
        return {c: self.nodes[c] for c in coords if c in self.nodes}

    def tlog_put_nodes(self, nodes: Any) -> None:
        for level, idx, h in nodes:
            self.nodes[(level, idx)] = h


def forge(bodies: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    if mode == "rewrite":
        victim = next(b for b in bodies if b["event"] == "release" and b["decision"] == "allow")
        victim["decision"] = "deny"
        victim["reasons"] = ["policy did not match"]
    elif mode == "truncate":
        bodies = bodies[:-2]
    elif mode == "reorder":
        bodies[1], bodies[2] = bodies[2], bodies[1]
    else:
        raise SystemExit(f"unknown mode {mode}")
    return bodies


def main() -> int:
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sqlite")
    g.add_argument("--postgres")
    p.add_argument("mode")
    args = p.parse_args()
    if args.sqlite:
        import sqlite3

        conn: Any = sqlite3.connect(args.sqlite, isolation_level=None)
        ph = "?"
        drops = ["DROP TRIGGER audit_no_update", "DROP TRIGGER audit_no_delete",
                 "DROP TRIGGER tlog_no_update", "DROP TRIGGER tlog_no_delete"]
        conn.execute("BEGIN IMMEDIATE")
    else:
        import psycopg

        conn = psycopg.connect(args.postgres)
        ph = "%s"
        drops = ["DROP TRIGGER audit_no_update ON audit",
                 "DROP TRIGGER audit_no_truncate ON audit",
                 "DROP TRIGGER tlog_no_update ON tlog_nodes",
                 "DROP TRIGGER tlog_no_truncate ON tlog_nodes"]
    for statement in drops:
        conn.execute(statement)
    rows = conn.execute("SELECT record FROM audit ORDER BY seq").fetchall()
    bodies = forge([json.loads(r[0]) for r in rows], args.mode)
    conn.execute("DELETE FROM audit")
    conn.execute("DELETE FROM tlog_nodes")
    prev, nodes = audit.GENESIS, Nodes()
    for i, body in enumerate(bodies):
        body["seq"], body["prev_hash"] = i + 1, prev
        record_json = canonical_json(body).decode()
        digest = audit.chain_hash(prev, record_json)
        conn.execute(f"INSERT INTO audit (seq, time, event, model_id, decision, record, "
                     f"prev_hash, hash, owner) VALUES ({', '.join([ph] * 9)})",
                     (i + 1, body["time"], body["event"], body.get("model_id"),
                      body["decision"], record_json, prev, digest, body.get("owner")))
        tlog.append_leaf(nodes, i, crypto.merkle_leaf_hash(record_json.encode()))
        prev = digest
    for (level, idx), h in nodes.nodes.items():
        conn.execute(f"INSERT INTO tlog_nodes (level, idx, hash) VALUES ({ph}, {ph}, {ph})",
                     (level, idx, h))
    conn.execute("COMMIT") if args.sqlite else conn.commit()
    conn.close()
    print(f"forged: {args.mode}, {len(bodies)} records, chain and tree recomputed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
