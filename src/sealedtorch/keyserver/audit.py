"""The audit log: append-only, hash-chained records of every decision the keyserver makes.

Each record is a JSON object (time, event, client address, actor, model, evidence digest,
verified claims, policy digest, decision, reasons, ...).  Records are chained::

    hash(n) = SHA-256( hash(n-1) ‖ canonical_json(record n) )      hash(0) = 64 × "0"

and record *n* carries its own ``seq`` and ``prev_hash``, so deleting, reordering, editing or
inserting a record breaks the chain at that record.  :func:`verify_chain` names the first
broken record.  (Truncating the newest records leaves a valid, shorter chain: anchor the head
hash that ``audit verify`` prints somewhere else if that matters to you.)

Nothing secret goes into a record: no key material, no tokens (only their ids).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import crypto
from .protocol import canonical_json

GENESIS = "0" * 64

#: Decisions a record can carry.
ALLOW, DENY, OK, ERROR = "allow", "deny", "ok", "error"


def iso(t: float) -> str:
    """RFC 3339 UTC with millisecond precision."""
    dt = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: float
    event: str
    model_id: str | None
    decision: str
    record_json: str
    prev_hash: str
    hash: str
    #: The owner principal allowed to read this record (besides admins and auditors).
    owner: str | None = None

    @property
    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.record_json)
        return data


def chain_hash(prev_hash: str, record_json: str) -> str:
    return crypto.sha256(bytes.fromhex(prev_hash), record_json.encode()).hex()


def seal_record(entry: dict[str, Any], *, seq: int, prev_hash: str) -> AuditRecord:
    """Turn an audit entry into the next link of the chain (called inside the store's
    write transaction, so ``seq`` and ``prev_hash`` are the current head's)."""
    for required in ("time", "event", "decision"):
        if required not in entry:
            raise ValueError(f"audit entry lacks {required!r}")
    body = {k: v for k, v in entry.items() if v is not None}
    body["seq"] = seq
    body["prev_hash"] = prev_hash
    body["iso_time"] = iso(float(entry["time"]))
    record_json = canonical_json(body).decode()
    return AuditRecord(seq, float(entry["time"]), str(entry["event"]), entry.get("model_id"),
                       str(entry["decision"]), record_json, prev_hash,
                       chain_hash(prev_hash, record_json), entry.get("owner"))


@dataclass(frozen=True)
class ChainReport:
    """Outcome of :func:`verify_chain`.  ``broken_at`` is the first bad record's ``seq``."""

    ok: bool
    count: int
    head_seq: int
    head_hash: str
    broken_at: int | None = None
    problem: str | None = None


def verify_chain(records: Iterable[AuditRecord]) -> ChainReport:
    """Recompute the chain over ``records`` (all of them, in ``seq`` order)."""
    prev_hash, expected_seq, count = GENESIS, 1, 0
    for rec in records:
        problem = _check(rec, expected_seq, prev_hash)
        if problem is not None:
            return ChainReport(False, count, expected_seq - 1, prev_hash, rec.seq, problem)
        prev_hash, expected_seq, count = rec.hash, rec.seq + 1, count + 1
    return ChainReport(True, count, expected_seq - 1, prev_hash)


def _check(rec: AuditRecord, expected_seq: int, prev_hash: str) -> str | None:
    if rec.seq != expected_seq:
        return (f"expected record #{expected_seq} next, found #{rec.seq} "
                f"(records were deleted or inserted)")
    if rec.prev_hash != prev_hash:
        return "prev_hash does not match the previous record's hash"
    if chain_hash(prev_hash, rec.record_json) != rec.hash:
        return "record content does not match its hash (the record was modified)"
    try:
        body = json.loads(rec.record_json)
    except ValueError:
        return "record is not valid JSON"
    if canonical_json(body).decode() != rec.record_json:
        return "record is not in canonical form"
    if body.get("seq") != rec.seq or body.get("prev_hash") != rec.prev_hash:
        return "record's own seq/prev_hash disagree with its position in the chain"
    if (body.get("event") != rec.event or body.get("decision") != rec.decision
            or body.get("model_id") != rec.model_id or body.get("time") != rec.time
            or body.get("owner") != rec.owner):
        return ("indexed columns (event, decision, model_id, time, owner) disagree with the "
                "record")
    return None
