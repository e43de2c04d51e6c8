"""Keyserver storage: the :class:`Store` protocol and its SQLite implementation.

The service logic (:mod:`.service`) talks to storage only through :class:`Store` and the
transaction object it hands out (:class:`StoreTx`), so a PostgreSQL implementation for
several keyserver replicas is a second class, not a rewrite.  Rules every implementation
keeps:

- ``transaction()`` is serialisable for writers: the audit hash chain, nonce burning and key
  state changes are decided and written inside one transaction, so a revocation that has
  committed is seen by every later release, and a nonce can be burnt once only.
- Model keys are stored *wrapped* (see :mod:`.kek`); a store never sees a plaintext key.
- The audit table is append-only (triggers enforce it; the hash chain proves it).
- Connection failures surface as :class:`~sealedtorch.errors.ServiceUnavailable` (HTTP 503),
  never as a raw driver error; the store reconnects by itself when the database is back.

The schema and its migrations are shared by every engine (:mod:`.schema`).
:class:`SqliteStore` is here; :class:`~.store_pg.PostgresStore` (several keyserver replicas
on one database) is in :mod:`.store_pg`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from .. import crypto
from ..errors import (
    ConfigError,
    IntegrityError,
    NonceError,
    StoreUnavailable,
)
from . import audit, schema, tlog

log = logging.getLogger("sealedtorch.keyserver")

#: The schema version this sealedtorch writes (see :mod:`.schema`).
SCHEMA_VERSION = schema.LATEST


_MODEL_COLUMNS = ("model_id, policy, policy_digest, created_at, updated_at, owner, owner_id, "
                  "row_mac, mac_kek")
_KEY_COLUMNS = ("model_id, version, state, wrapped, kek_id, created_at, changed_at, reason, "
                "row_mac, mac_kek")
_TOKEN_COLUMNS = ("token_id, name, role, created_at, revoked_at, principal_id, "  # noqa: S105
                  "expires_at, token_hash, rotated_from, row_mac, mac_kek")


class KeyState(StrEnum):
    ACTIVE = "active"      # released to identities the model's policy admits
    REVOKED = "revoked"    # emergency stop: never released again
    RETIRED = "retired"    # end of life: never released again, wrapped key erased


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    policy: dict[str, Any]
    policy_digest: str
    created_at: float
    updated_at: float
    #: The owner principal's name (a label) that registered the model; ``None``:
    #: registered by an admin (only admins see it).
    owner: str | None = None
    #: The owner principal's immutable id: what decides who manages the model (a new
    #: token with a revoked owner's name is another principal and never matches).
    owner_id: str | None = None
    #: MAC of the row under the KEK ``mac_kek`` (see :mod:`.rowmac`); None: not sealed.
    row_mac: bytes | None = field(default=None, repr=False)
    mac_kek: str | None = None


@dataclass(frozen=True)
class KeyRecord:
    model_id: str
    version: int
    state: KeyState
    wrapped: bytes | None = field(repr=False)
    kek_id: str | None
    created_at: float
    changed_at: float | None = None
    reason: str | None = None
    row_mac: bytes | None = field(default=None, repr=False)
    mac_kek: str | None = None


@dataclass(frozen=True)
class AdminTokenRecord:
    token_id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None
    #: The immutable identity the token belongs to (``id_…``; for identities made before
    #: migration 3, their name).  Rotation keeps it; a new token by name never gets it.
    principal_id: str | None = None
    #: Unix time after which the token is refused (None: never, only legacy test rows).
    expires_at: float | None = None
    token_hash: bytes | None = field(default=None, repr=False)
    #: the token this one replaced (``tokens rotate``)
    rotated_from: str | None = None
    row_mac: bytes | None = field(default=None, repr=False)
    mac_kek: str | None = None


class StoreTx(Protocol):
    """Operations inside one transaction.  Raising inside ``transaction()`` rolls back."""

    # nonces
    def insert_nonce(self, nonce: bytes, tee: str, issued_at: float,
                     expires_at: float) -> None: ...
    def check_nonce(self, nonce: bytes, tee: str, now: float) -> None:
        """Raise :class:`NonceError` unless the nonce was issued for ``tee``, is unexpired
        and unused."""
        ...
    def consume_nonce(self, nonce: bytes, tee: str, now: float) -> None:
        """:meth:`check_nonce`, then mark it used (atomically, inside the transaction)."""
        ...
    def burn_nonce(self, nonce: bytes, now: float) -> None:
        """Mark a nonce used whatever its state (after a failed attempt)."""
        ...
    def purge_nonces(self, expired_before: float) -> int: ...
    # models and keys
    def get_model(self, model_id: str) -> ModelRecord | None: ...
    def list_models(self, *, owner: str | None = None,
                    owner_id: str | None = None) -> list[ModelRecord]:
        """Every model, or only those of ``owner`` (a name) or ``owner_id``."""
        ...
    def insert_model(self, model: ModelRecord) -> None: ...
    def update_policy(self, model_id: str, policy: dict[str, Any], digest: str,
                      now: float, *, row_mac: bytes | None = None,
                      mac_kek: str | None = None) -> None: ...
    def key_versions(self, model_id: str) -> list[KeyRecord]: ...
    def insert_key(self, key: KeyRecord) -> None: ...
    def set_key_state(self, model_id: str, version: int, state: KeyState, now: float,
                      reason: str, *, erase: bool, row_mac: bytes | None = None,
                      mac_kek: str | None = None) -> None: ...
    # row MACs (see :mod:`.rowmac`)
    def set_row_mac(self, table: str, key: tuple[Any, ...], row_mac: bytes,
                    mac_kek: str) -> None:
        """Store the MAC of one row: ``table`` is models (key: model_id), key_versions
        (model_id, version) or admin_tokens (token_id)."""
        ...
    def all_key_versions(self) -> list[KeyRecord]: ...
    def mac_usage(self) -> dict[str | None, int]:
        """How many sealed rows (all three tables) each KEK id MACs."""
        ...
    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    # KEK rewrap (`keyserver rewrap`)
    def wrapped_keys(self, *, not_under: str | None = None,
                     limit: int | None = None) -> list[KeyRecord]:
        """Records holding a wrapped key (active or revoked; retired ones are erased),
        by model id and version; with ``not_under``, only those whose ``kek_id`` differs
        from it (or is unset)."""
        ...
    def rewrap_key(self, model_id: str, version: int, *, expected: bytes, wrapped: bytes,
                   kek_id: str) -> bool:
        """Set one record's wrapped key and KEK id if it still holds ``expected``
        (compare-and-set: a record erased or re-wrapped meanwhile is left alone); True if
        it was changed."""
        ...
    def kek_usage(self) -> dict[str | None, int]:
        """How many records each KEK id wraps (records without a wrapped key not counted)."""
        ...
    # admin tokens
    def insert_admin_token(self, record: AdminTokenRecord, token_hash: bytes) -> None: ...
    def admin_token(self, token_hash: bytes) -> AdminTokenRecord | None: ...
    def admin_token_by_id(self, token_id: str) -> AdminTokenRecord | None: ...
    def list_admin_tokens(self) -> list[AdminTokenRecord]: ...
    def revoke_admin_token(self, token_id: str, now: float, *, row_mac: bytes | None = None,
                           mac_kek: str | None = None) -> None: ...
    # audit
    def append_audit(self, entry: dict[str, Any]) -> audit.AuditRecord:
        """Append the next link of the chain.  ``entry["owner"]`` (if any) is also stored
        in the indexed ``owner`` column, which decides which owner may read the record."""
        ...
    def audit_records(self, *, model_id: str | None = None, since: float | None = None,
                      limit: int | None = None, owner: str | None = None,
                      after_seq: int | None = None) -> list[audit.AuditRecord]: ...
    def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the newest record; (0, GENESIS) for an empty log."""
        ...
    # transparency log (see .tlog)
    def audit_leaves(self, after: int, count: int) -> list[tuple[int, str]]:
        """(seq, record JSON) of up to ``count`` records with seq > ``after``."""
        ...
    def tlog_size(self) -> int:
        """Leaves in the stored Merkle tree."""
        ...
    def tlog_nodes(self, coords: Any) -> dict[tuple[int, int], bytes]:
        """Stored complete-subtree hashes by (level, index); absent ones are left out."""
        ...
    def tlog_put_nodes(self, nodes: Any) -> None: ...
    def tlog_meta(self, key: str) -> str | None: ...
    def tlog_set_meta(self, key: str, value: str) -> None: ...
    # operations
    def count_nonces(self) -> int: ...


class Store(Protocol):
    def transaction(self, *, durable: bool = True) -> contextlib.AbstractContextManager[StoreTx]:
        """A write transaction (serialised with every other writer).  ``durable=False``
        may skip flushing to stable storage at commit (PostgreSQL: synchronous_commit off):
        only for data whose loss in a power cut is harmless, such as a fresh nonce; the
        next durable commit flushes it anyway."""
        ...

    def snapshot(self) -> contextlib.AbstractContextManager[StoreTx]:
        """A read-only, consistent view (never blocks writers)."""
        ...

    def ping(self) -> None:
        """Raise if the store cannot serve requests (readiness probe)."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- SQLite


class SqlTx:
    """:class:`StoreTx` over one DB-API connection inside a transaction: the one SQL
    implementation both engines run.  Statements are written with ``?`` placeholders;
    an engine whose driver wants another style sets :attr:`PARAM` (psycopg: ``%s``)."""

    PARAM = "?"

    def __init__(self, conn: Any) -> None:
        self._c = conn

    def _x(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> Any:
        return self._c.execute(sql if self.PARAM == "?" else sql.replace("?", self.PARAM),
                               args)

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._x(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[Any]:
        return list(self._x(sql, args).fetchall())

    def _before_audit_append(self) -> None:
        """Hook: serialise chain appends across processes (SQLite: BEGIN IMMEDIATE did)."""

    # --- nonces
    def insert_nonce(self, nonce: bytes, tee: str, issued_at: float,
                     expires_at: float) -> None:
        self._x("INSERT INTO nonces (nonce, tee, issued_at, expires_at) "
                        "VALUES (?, ?, ?, ?)", (nonce, tee, issued_at, expires_at))

    def check_nonce(self, nonce: bytes, tee: str, now: float) -> None:
        row = self._one("SELECT tee, expires_at, used_at FROM nonces WHERE nonce = ?",
                        (nonce,))
        if row is None:
            raise NonceError("nonce was never issued by this keyserver (or has long expired); "
                             "ask /v1/attest/challenge for a fresh one")
        issued_tee, expires_at, used_at = row
        if used_at is not None:
            raise NonceError(f"nonce was already used at {audit.iso(used_at)} "
                             "(replay refused; nonces are single-use)")
        if now >= expires_at:
            raise NonceError(f"nonce expired at {audit.iso(expires_at)}; ask for a fresh one "
                             "and attest promptly")
        if issued_tee != tee:
            raise NonceError(f"nonce was issued for {issued_tee} evidence, not {tee}")

    def consume_nonce(self, nonce: bytes, tee: str, now: float) -> None:
        # one statement decides and burns, whichever replica asks
        row = self._one("UPDATE nonces SET used_at = ? WHERE nonce = ? AND tee = ? "
                        "AND used_at IS NULL AND expires_at > ? RETURNING 1",
                        (now, nonce, tee, now))
        if row is None:
            self.check_nonce(nonce, tee, now)  # raises the precise reason
            raise NonceError("nonce could not be used")

    def burn_nonce(self, nonce: bytes, now: float) -> None:
        self._x("UPDATE nonces SET used_at = ? WHERE nonce = ? AND used_at IS NULL",
                        (now, nonce))

    def purge_nonces(self, expired_before: float) -> int:
        return int(self._x("DELETE FROM nonces WHERE expires_at < ?",
                                   (expired_before,)).rowcount)

    # --- models and keys
    @staticmethod
    def _model(row: tuple[Any, ...]) -> ModelRecord:
        return ModelRecord(row[0], json.loads(row[1]), row[2], row[3], row[4], row[5], row[6],
                           bytes(row[7]) if row[7] is not None else None, row[8])

    @staticmethod
    def _key(r: tuple[Any, ...]) -> KeyRecord:
        return KeyRecord(r[0], int(r[1]), KeyState(r[2]),
                         bytes(r[3]) if r[3] is not None else None, r[4], r[5], r[6], r[7],
                         bytes(r[8]) if r[8] is not None else None, r[9])

    @staticmethod
    def _token(r: tuple[Any, ...]) -> AdminTokenRecord:
        return AdminTokenRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6],
                                bytes(r[7]) if r[7] is not None else None, r[8],
                                bytes(r[9]) if r[9] is not None else None, r[10])

    def get_model(self, model_id: str) -> ModelRecord | None:
        row = self._one(f"SELECT {_MODEL_COLUMNS} FROM models WHERE model_id = ?",  # noqa: S608
                        (model_id,))
        return self._model(row) if row else None

    def list_models(self, *, owner: str | None = None,
                    owner_id: str | None = None) -> list[ModelRecord]:
        sql = f"SELECT {_MODEL_COLUMNS} FROM models"  # noqa: S608
        if owner_id is not None:
            rows = self._all(sql + " WHERE owner_id = ? ORDER BY model_id", (owner_id,))
        elif owner is not None:
            rows = self._all(sql + " WHERE owner = ? ORDER BY model_id", (owner,))
        else:
            rows = self._all(sql + " ORDER BY model_id")
        return [self._model(r) for r in rows]

    def insert_model(self, model: ModelRecord) -> None:
        self._x(f"INSERT INTO models ({_MODEL_COLUMNS}) "  # noqa: S608
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (model.model_id, json.dumps(model.policy, sort_keys=True),
                         model.policy_digest, model.created_at, model.updated_at, model.owner,
                         model.owner_id, model.row_mac, model.mac_kek))

    def update_policy(self, model_id: str, policy: dict[str, Any], digest: str,
                      now: float, *, row_mac: bytes | None = None,
                      mac_kek: str | None = None) -> None:
        self._x("UPDATE models SET policy = ?, policy_digest = ?, updated_at = ?, "
                "row_mac = ?, mac_kek = ? WHERE model_id = ?",
                (json.dumps(policy, sort_keys=True), digest, now, row_mac, mac_kek, model_id))

    def key_versions(self, model_id: str) -> list[KeyRecord]:
        rows = self._all(
            f"SELECT {_KEY_COLUMNS} FROM key_versions WHERE model_id = ? "  # noqa: S608
            "ORDER BY version", (model_id,))
        return [self._key(r) for r in rows]

    def all_key_versions(self) -> list[KeyRecord]:
        return [self._key(r) for r in self._all(
            f"SELECT {_KEY_COLUMNS} FROM key_versions ORDER BY model_id, version")]  # noqa: S608

    def insert_key(self, key: KeyRecord) -> None:
        self._x("INSERT INTO key_versions (model_id, version, state, wrapped, kek_id, "
                        "created_at, changed_at, reason, row_mac, mac_kek) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (key.model_id, key.version, key.state.value, key.wrapped, key.kek_id,
                         key.created_at, key.changed_at, key.reason, key.row_mac, key.mac_kek))

    def set_key_state(self, model_id: str, version: int, state: KeyState, now: float,
                      reason: str, *, erase: bool, row_mac: bytes | None = None,
                      mac_kek: str | None = None) -> None:
        self._x("UPDATE key_versions SET state = ?, changed_at = ?, reason = ?, "
                "wrapped = CASE WHEN ? THEN NULL ELSE wrapped END, row_mac = ?, mac_kek = ? "
                "WHERE model_id = ? AND version = ?",
                (state.value, now, reason, erase, row_mac, mac_kek, model_id, version))

    # --- row MACs
    _ROW_KEYS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "models": ("model_id",), "key_versions": ("model_id", "version"),
        "admin_tokens": ("token_id",)}

    def set_row_mac(self, table: str, key: tuple[Any, ...], row_mac: bytes,
                    mac_kek: str) -> None:
        columns = self._ROW_KEYS[table]  # a fixed name, never the caller's text
        where = " AND ".join(f"{c} = ?" for c in columns)
        self._x(f"UPDATE {table} SET row_mac = ?, mac_kek = ? WHERE {where}",  # noqa: S608
                (row_mac, mac_kek, *key))

    def mac_usage(self) -> dict[str | None, int]:
        usage: dict[str | None, int] = {}
        for table in self._ROW_KEYS:
            for kek_id, n in self._all(f"SELECT mac_kek, count(*) FROM {table} "  # noqa: S608
                                       "WHERE row_mac IS NOT NULL GROUP BY mac_kek"):
                usage[kek_id] = usage.get(kek_id, 0) + int(n)
        return usage

    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._x("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value", (key, value))

    # --- KEK rewrap
    def wrapped_keys(self, *, not_under: str | None = None,
                     limit: int | None = None) -> list[KeyRecord]:
        sql = f"SELECT {_KEY_COLUMNS} FROM key_versions WHERE wrapped IS NOT NULL"  # noqa: S608
        args: list[Any] = []
        if not_under is not None:
            sql += " AND (kek_id IS NULL OR kek_id <> ?)"
            args.append(not_under)
        sql += " ORDER BY model_id, version"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [self._key(r) for r in self._all(sql, args)]

    def rewrap_key(self, model_id: str, version: int, *, expected: bytes, wrapped: bytes,
                   kek_id: str) -> bool:
        cur = self._x("UPDATE key_versions SET wrapped = ?, kek_id = ? "
                              "WHERE model_id = ? AND version = ? AND wrapped = ?",
                              (wrapped, kek_id, model_id, version, expected))
        return bool(cur.rowcount == 1)

    def kek_usage(self) -> dict[str | None, int]:
        return {r[0]: int(r[1]) for r in self._all(
            "SELECT kek_id, count(*) FROM key_versions WHERE wrapped IS NOT NULL "
            "GROUP BY kek_id")}

    # --- admin tokens
    def insert_admin_token(self, record: AdminTokenRecord, token_hash: bytes) -> None:
        self._x("INSERT INTO admin_tokens (token_id, token_hash, name, role, "
                "created_at, revoked_at, principal_id, expires_at, rotated_from, row_mac, "
                "mac_kek) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.token_id, token_hash, record.name, record.role,
                 record.created_at, record.revoked_at, record.principal_id, record.expires_at,
                 record.rotated_from, record.row_mac, record.mac_kek))

    def admin_token(self, token_hash: bytes) -> AdminTokenRecord | None:
        row = self._one(f"SELECT {_TOKEN_COLUMNS} FROM admin_tokens "  # noqa: S608
                        "WHERE token_hash = ?", (token_hash,))
        return self._token(row) if row else None

    def admin_token_by_id(self, token_id: str) -> AdminTokenRecord | None:
        row = self._one(f"SELECT {_TOKEN_COLUMNS} FROM admin_tokens "  # noqa: S608
                        "WHERE token_id = ?", (token_id,))
        return self._token(row) if row else None

    def list_admin_tokens(self) -> list[AdminTokenRecord]:
        rows = self._all(f"SELECT {_TOKEN_COLUMNS} FROM admin_tokens "  # noqa: S608
                         "ORDER BY created_at, token_id")
        return [self._token(r) for r in rows]

    def revoke_admin_token(self, token_id: str, now: float, *, row_mac: bytes | None = None,
                           mac_kek: str | None = None) -> None:
        self._x("UPDATE admin_tokens SET revoked_at = ?, row_mac = ?, mac_kek = ? "
                "WHERE token_id = ? AND revoked_at IS NULL", (now, row_mac, mac_kek, token_id))

    # --- audit
    def audit_head(self) -> tuple[int, str]:
        row = self._one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (int(row[0]), str(row[1])) if row else (0, audit.GENESIS)

    def append_audit(self, entry: dict[str, Any]) -> audit.AuditRecord:
        self._before_audit_append()
        seq, prev = self.audit_head()
        rec = audit.seal_record(entry, seq=seq + 1, prev_hash=prev)
        self._x("INSERT INTO audit (seq, time, event, model_id, decision, record, "
                        "prev_hash, hash, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rec.seq, rec.time, rec.event, rec.model_id, rec.decision,
                         rec.record_json, rec.prev_hash, rec.hash, rec.owner))
        self._tlog_append(rec)
        return rec

    # --- transparency log (the audit records as Merkle leaves; see .tlog)
    def _tlog_append(self, rec: audit.AuditRecord) -> None:
        """The record's leaf and the subtrees it completes, in this same transaction (so
        under the same writer lock as the chain append)."""
        size = self.tlog_size()
        if size < rec.seq - 1:  # a store from before the log: build the missing leaves
            added = tlog.catch_up(self, self.audit_leaves, rec.seq - 1)
            log.info("transparency log: added %d leaves for older audit records", added)
        elif size > rec.seq - 1:
            raise IntegrityError(
                f"the transparency log has {size} leaves but the audit log only "
                f"{rec.seq - 1} records: audit records were deleted")
        tlog.append_leaf(self, rec.seq - 1, crypto.merkle_leaf_hash(rec.record_json.encode()))

    def audit_leaves(self, after: int, count: int) -> list[tuple[int, str]]:
        """(seq, record JSON) of up to ``count`` records after ``seq`` = ``after``."""
        return [(int(r[0]), str(r[1])) for r in self._all(
            "SELECT seq, record FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, count))]

    def tlog_size(self) -> int:
        row = self._one("SELECT max(idx) FROM tlog_nodes WHERE level = 0")
        return 0 if row is None or row[0] is None else int(row[0]) + 1

    def tlog_nodes(self, coords: Any) -> dict[tuple[int, int], bytes]:
        coords = list(coords)
        out: dict[tuple[int, int], bytes] = {}
        for start in range(0, len(coords), 200):
            part = coords[start:start + 200]
            # a join with the wanted coordinates: one primary-key lookup each (an OR list
            # of this length costs PostgreSQL more to plan than to run)
            wanted = ", ".join(["(?, ?)"] * len(part))
            args = [v for c in part for v in c]
            for r in self._all(f"WITH w (l, i) AS (VALUES {wanted}) "  # noqa: S608
                               "SELECT n.level, n.idx, n.hash FROM w JOIN tlog_nodes n "
                               "ON n.level = w.l AND n.idx = w.i", args):
                out[(int(r[0]), int(r[1]))] = bytes(r[2])
        return out

    def tlog_put_nodes(self, nodes: Any) -> None:
        nodes = list(nodes)
        values = ", ".join(["(?, ?, ?)"] * len(nodes))
        self._x(f"INSERT INTO tlog_nodes (level, idx, hash) VALUES {values}",  # noqa: S608
                [v for n in nodes for v in n])

    def tlog_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def tlog_set_meta(self, key: str, value: str) -> None:
        self._x("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))

    def audit_records(self, *, model_id: str | None = None, since: float | None = None,
                      limit: int | None = None, owner: str | None = None,
                      after_seq: int | None = None) -> list[audit.AuditRecord]:
        sql, args = audit_query(model_id=model_id, since=since, limit=limit, owner=owner,
                                after_seq=after_seq)
        return [audit.AuditRecord(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8])
                for r in self._all(sql, args)]

    # --- operations
    def count_nonces(self) -> int:
        return int(self._one("SELECT count(*) FROM nonces")[0])


def audit_query(*, model_id: str | None, since: float | None, limit: int | None,
                owner: str | None, after_seq: int | None) -> tuple[str, list[Any]]:
    """The SELECT behind ``audit_records`` (shared by the engines; values are parameters)."""
    sql = ("SELECT seq, time, event, model_id, decision, record, prev_hash, hash, owner "
           "FROM audit")
    where, args = [], []
    for column, op, value in (("model_id", "=", model_id), ("time", ">=", since),
                              ("owner", "=", owner), ("seq", ">", after_seq)):
        if value is not None:
            where.append(f"{column} {op} ?")
            args.append(value)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return sql, args


class SqliteStore:
    """SQLite in WAL mode, one connection per thread, ``synchronous=FULL``: every commit
    (including each audit record) is on disk before the response leaves."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL",
                 busy_timeout_ms: int = 10_000) -> None:
        self.path = Path(path)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError("sqlite synchronous must be FULL, NORMAL or EXTRA")
        self._synchronous = synchronous.upper()
        self._busy = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        conn = self._conn()
        try:
            with self._write(conn):
                self._migrate(conn)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot create the store schema in {self.path}: {exc}") from None

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply missing migrations (inside BEGIN IMMEDIATE: one process at a time)."""
        conn.execute(schema.MIGRATIONS_TABLE)
        applied = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
        legacy = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                              "AND name = 'meta'").fetchone()
        if not applied and legacy:  # written before schema_migrations existed
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) != 1:
                raise ConfigError(f"{self.path}: store schema version {row[0]}, this "
                                  f"sealedtorch understands up to {SCHEMA_VERSION}")
        schema.check_known(applied, str(self.path))
        for m in schema.pending(applied):
            for statement in m.sqlite:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                         (m.version, m.name, time.time()))
            log.info("store %s: applied migration %d (%s)", self.path, m.version, m.name)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) "
                     "DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise ConfigError("store is closed")
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self._busy / 1000)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open store {self.path}: {exc}") from None
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ConfigError(f"{self.path}: cannot switch SQLite to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA secure_delete = ON")  # retired (erased) keys leave no free page
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[StoreTx]:
        try:
            conn = self._conn()
            if durable:
                with self._write(conn):
                    yield SqlTx(conn)
                return
            # WAL frames of this commit are not fsynced; the next FULL commit fsyncs them.
            conn.execute("PRAGMA synchronous = OFF")
            try:
                with self._write(conn):
                    yield SqlTx(conn)
            finally:
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, I/O error
            raise self._unavailable(exc) from None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[StoreTx]:
        try:
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield SqlTx(conn)
            finally:
                conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        log.error("store %s unavailable: %s", self.path, exc)
        return StoreUnavailable(f"the keyserver's database is unavailable ({exc})")

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1 FROM meta LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
