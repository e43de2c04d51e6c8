"""PostgreSQL store: several keyserver replicas, one database, one truth.

A second implementation of :class:`~.store.Store` (the service does not know which one it
talks to).  What makes replicas safe:

- **One writer at a time, in the database.**  Every durable write transaction starts by
  taking a transaction-scoped advisory lock (``pg_advisory_xact_lock``) keyed by the
  schema, so write transactions of every replica are serialised exactly like SQLite's
  ``BEGIN IMMEDIATE``: the audit chain head, nonce burning and key-state changes are decided
  under that lock, and the audit chain stays one unbroken chain whatever the number of
  processes.  The lock is released by COMMIT/ROLLBACK, or by PostgreSQL itself when a
  replica dies mid-transaction (``kill -9``): nothing half-written survives.
- **Nonces are shared** and burnt with a conditional ``UPDATE … WHERE used_at IS NULL``, so a
  client may take its challenge from one replica and attest at another, and a nonce is
  spent once across all of them.  Nonce issue commits with ``synchronous_commit = off``
  (the only non-durable write), without the writer lock.
- **Reads** use ``REPEATABLE READ READ ONLY`` snapshots and never block writers.
- **Migrations** (:mod:`.schema`) run under the same advisory lock, so two replicas starting
  at once apply each exactly once.
- **Outages**: a lost or refused connection becomes
  :class:`~sealedtorch.errors.ServiceUnavailable` (HTTP 503); broken connections are thrown
  away and new ones opened on the next request, so the keyserver recovers by itself when
  the database comes back.  A connection found dead before its transaction started is
  replaced once, silently.

The database is chosen by a libpq URL (``postgresql://user@host:5432/db``); put
``?options=-csearch_path%3DNAME`` in it to use a schema other than ``public`` (the schema
must exist).  Requires ``psycopg`` 3 (``pip install 'sealedtorch[postgres]'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError, NonceError
from . import audit, schema
from .store import (
    AdminTokenRecord,
    KeyRecord,
    KeyState,
    ModelRecord,
    StoreTx,
    StoreUnavailable,
    audit_query,
)

log = logging.getLogger("sealedtorch.keyserver")

_MODEL_COLUMNS = "model_id, policy, policy_digest, created_at, updated_at, owner"
_TOKEN_COLUMNS = "token_id, name, role, created_at, revoked_at"  # noqa: S105


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("the PostgreSQL store needs psycopg 3: "
                          "pip install 'sealedtorch[postgres]'") from None
    return psycopg


def redact_dsn(dsn: str) -> str:
    """``host:port/dbname`` (and the user) of a libpq URL or key=value string, without the
    password: what may appear in logs."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "postgresql://(unparsable)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    return (f"postgresql://{user}{parts.get('host', '')}:{parts.get('port', 5432)}/"
            f"{parts.get('dbname', '')}")


class _PgTx:
    """:class:`StoreTx` over one psycopg connection inside a transaction."""

    def __init__(self, conn: Any, lock_key: int, *, locked: bool) -> None:
        self._c = conn
        self._lock_key = lock_key
        self._locked = locked

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._c.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[Any]:
        return list(self._c.execute(sql, args).fetchall())

    # --- nonces
    def insert_nonce(self, nonce: bytes, tee: str, issued_at: float,
                     expires_at: float) -> None:
        self._c.execute("INSERT INTO nonces (nonce, tee, issued_at, expires_at) "
                        "VALUES (%s, %s, %s, %s)", (nonce, tee, issued_at, expires_at))

    def check_nonce(self, nonce: bytes, tee: str, now: float) -> None:
        row = self._one("SELECT tee, expires_at, used_at FROM nonces WHERE nonce = %s",
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
        row = self._one("UPDATE nonces SET used_at = %s WHERE nonce = %s AND tee = %s "
                        "AND used_at IS NULL AND expires_at > %s RETURNING 1",
                        (now, nonce, tee, now))
        if row is None:
            self.check_nonce(nonce, tee, now)  # raises the precise reason
            raise NonceError("nonce could not be used")

    def burn_nonce(self, nonce: bytes, now: float) -> None:
        self._c.execute("UPDATE nonces SET used_at = %s WHERE nonce = %s AND used_at IS NULL",
                        (now, nonce))

    def purge_nonces(self, expired_before: float) -> int:
        return int(self._c.execute("DELETE FROM nonces WHERE expires_at < %s",
                                   (expired_before,)).rowcount)

    # --- models and keys
    @staticmethod
    def _model(row: tuple[Any, ...]) -> ModelRecord:
        return ModelRecord(row[0], json.loads(row[1]), row[2], row[3], row[4], row[5])

    def get_model(self, model_id: str) -> ModelRecord | None:
        row = self._one(f"SELECT {_MODEL_COLUMNS} FROM models WHERE model_id = %s",  # noqa: S608
                        (model_id,))
        return self._model(row) if row else None

    def list_models(self, *, owner: str | None = None) -> list[ModelRecord]:
        sql = f"SELECT {_MODEL_COLUMNS} FROM models"  # noqa: S608
        if owner is not None:
            rows = self._all(sql + " WHERE owner = %s ORDER BY model_id", (owner,))
        else:
            rows = self._all(sql + " ORDER BY model_id")
        return [self._model(r) for r in rows]

    def insert_model(self, model: ModelRecord) -> None:
        self._c.execute(f"INSERT INTO models ({_MODEL_COLUMNS}) "  # noqa: S608
                        "VALUES (%s, %s, %s, %s, %s, %s)",
                        (model.model_id, json.dumps(model.policy, sort_keys=True),
                         model.policy_digest, model.created_at, model.updated_at, model.owner))

    def update_policy(self, model_id: str, policy: dict[str, Any], digest: str,
                      now: float) -> None:
        self._c.execute("UPDATE models SET policy = %s, policy_digest = %s, updated_at = %s "
                        "WHERE model_id = %s",
                        (json.dumps(policy, sort_keys=True), digest, now, model_id))

    def key_versions(self, model_id: str) -> list[KeyRecord]:
        rows = self._all(
            "SELECT model_id, version, state, wrapped, kek_id, created_at, changed_at, reason "
            "FROM key_versions WHERE model_id = %s ORDER BY version", (model_id,))
        return [KeyRecord(r[0], int(r[1]), KeyState(r[2]),
                          bytes(r[3]) if r[3] is not None else None, r[4], r[5], r[6], r[7])
                for r in rows]

    def insert_key(self, key: KeyRecord) -> None:
        self._c.execute("INSERT INTO key_versions (model_id, version, state, wrapped, kek_id, "
                        "created_at, changed_at, reason) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                        (key.model_id, key.version, key.state.value, key.wrapped, key.kek_id,
                         key.created_at, key.changed_at, key.reason))

    def set_key_state(self, model_id: str, version: int, state: KeyState, now: float,
                      reason: str, *, erase: bool) -> None:
        self._c.execute("UPDATE key_versions SET state = %s, changed_at = %s, reason = %s, "
                        "wrapped = CASE WHEN %s THEN NULL ELSE wrapped END "
                        "WHERE model_id = %s AND version = %s",
                        (state.value, now, reason, erase, model_id, version))

    # --- KEK rewrap
    def wrapped_keys(self, *, not_under: str | None = None,
                     limit: int | None = None) -> list[KeyRecord]:
        sql = ("SELECT model_id, version, state, wrapped, kek_id, created_at, changed_at, "
               "reason FROM key_versions WHERE wrapped IS NOT NULL")
        args: list[Any] = []
        if not_under is not None:
            sql += " AND (kek_id IS NULL OR kek_id <> %s)"
            args.append(not_under)
        sql += " ORDER BY model_id, version"
        if limit is not None:
            sql += " LIMIT %s"
            args.append(limit)
        return [KeyRecord(r[0], int(r[1]), KeyState(r[2]), bytes(r[3]), r[4], r[5], r[6], r[7])
                for r in self._all(sql, args)]

    def rewrap_key(self, model_id: str, version: int, *, expected: bytes, wrapped: bytes,
                   kek_id: str) -> bool:
        cur = self._c.execute("UPDATE key_versions SET wrapped = %s, kek_id = %s "
                              "WHERE model_id = %s AND version = %s AND wrapped = %s",
                              (wrapped, kek_id, model_id, version, expected))
        return bool(cur.rowcount == 1)

    def kek_usage(self) -> dict[str | None, int]:
        return {r[0]: int(r[1]) for r in self._all(
            "SELECT kek_id, count(*) FROM key_versions WHERE wrapped IS NOT NULL "
            "GROUP BY kek_id")}

    # --- admin tokens
    def insert_admin_token(self, record: AdminTokenRecord, token_hash: bytes) -> None:
        self._c.execute("INSERT INTO admin_tokens (token_id, token_hash, name, role, "
                        "created_at, revoked_at) VALUES (%s, %s, %s, %s, %s, %s)",
                        (record.token_id, token_hash, record.name, record.role,
                         record.created_at, record.revoked_at))

    def admin_token(self, token_hash: bytes) -> AdminTokenRecord | None:
        row = self._one(f"SELECT {_TOKEN_COLUMNS} FROM admin_tokens "  # noqa: S608
                        "WHERE token_hash = %s", (token_hash,))
        return AdminTokenRecord(*row) if row else None

    def admin_token_by_id(self, token_id: str) -> AdminTokenRecord | None:
        row = self._one(f"SELECT {_TOKEN_COLUMNS} FROM admin_tokens "  # noqa: S608
                        "WHERE token_id = %s", (token_id,))
        return AdminTokenRecord(*row) if row else None

    def list_admin_tokens(self) -> list[AdminTokenRecord]:
        rows = self._all(f"SELECT {_TOKEN_COLUMNS} FROM admin_tokens "  # noqa: S608
                         "ORDER BY created_at, token_id")
        return [AdminTokenRecord(*r) for r in rows]

    def revoke_admin_token(self, token_id: str, now: float) -> None:
        self._c.execute("UPDATE admin_tokens SET revoked_at = %s WHERE token_id = %s "
                        "AND revoked_at IS NULL", (now, token_id))

    # --- audit
    def audit_head(self) -> tuple[int, str]:
        row = self._one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return (int(row[0]), str(row[1])) if row else (0, audit.GENESIS)

    def append_audit(self, entry: dict[str, Any]) -> audit.AuditRecord:
        if not self._locked:  # durable transactions hold it from their first statement
            self._c.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            self._locked = True
        seq, prev = self.audit_head()
        rec = audit.seal_record(entry, seq=seq + 1, prev_hash=prev)
        self._c.execute("INSERT INTO audit (seq, time, event, model_id, decision, record, "
                        "prev_hash, hash, owner) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (rec.seq, rec.time, rec.event, rec.model_id, rec.decision,
                         rec.record_json, rec.prev_hash, rec.hash, rec.owner))
        return rec

    def audit_records(self, *, model_id: str | None = None, since: float | None = None,
                      limit: int | None = None, owner: str | None = None,
                      after_seq: int | None = None) -> list[audit.AuditRecord]:
        sql, args = audit_query(model_id=model_id, since=since, limit=limit, owner=owner,
                                after_seq=after_seq, placeholder="%s")
        return [audit.AuditRecord(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8])
                for r in self._all(sql, args)]

    # --- operations
    def count_nonces(self) -> int:
        return int(self._one("SELECT count(*) FROM nonces")[0])


class _Slot:
    conn: Any = None
    fresh: bool = False


class PostgresStore:
    """:class:`~.store.Store` on PostgreSQL, for one or several keyserver replicas.

    A small pool of autocommit connections (transactions are opened explicitly), at most
    ``max_connections`` at once.  ``lock_timeout_ms`` bounds the wait for the writer lock
    (then 503, like SQLite's busy timeout); ``statement_timeout_ms`` bounds any statement.
    """

    #: Round trips over the network: the HTTP layer calls this store from worker threads,
    #: not from its event loop.
    inline = False

    def __init__(self, dsn: str, *, max_connections: int = 16, connect_timeout: float = 5.0,
                 lock_timeout_ms: int = 10_000, statement_timeout_ms: int = 30_000) -> None:
        self._pg = _psycopg()
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise ConfigError("a PostgreSQL store needs a postgresql://… URL")
        self.dsn = dsn
        self.where = redact_dsn(dsn)
        self._max = max(1, int(max_connections))
        self._slots = threading.BoundedSemaphore(self._max)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._connect_timeout = connect_timeout
        self._settings = (f"SET lock_timeout = {int(lock_timeout_ms)}; "
                          f"SET statement_timeout = {int(statement_timeout_ms)}")
        self._down_until = 0.0
        try:
            conn = self._connect()
        except StoreUnavailable as exc:
            raise ConfigError(f"cannot connect to the store {self.where}: {exc}") from None
        try:
            row = conn.execute("SELECT current_schema(), hashtextextended("
                               "'sealedtorch/keyserver/writer/' || current_schema(), 0)"
                               ).fetchone()
            if row[0] is None:
                raise ConfigError(f"{self.where}: no schema selected (the search_path names "
                                  f"no existing schema); create it first")
            self.schema: str = row[0]
            self._lock_key: int = int(row[1])
            self._migrate(conn)
        except self._pg.Error as exc:
            conn.close()
            raise ConfigError(f"cannot prepare the store schema in {self.where}: "
                              f"{exc}") from None
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r}, schema={self.schema!r})"

    # ------------------------------------------------------------------ connections

    def _connect(self) -> Any:
        if self._closed:
            raise ConfigError("store is closed")
        if time.monotonic() < self._down_until:  # fail fast while the database is away
            raise StoreUnavailable("the keyserver's database is unreachable (retrying)")
        try:
            conn = self._pg.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, int(self._connect_timeout)),
                application_name="sealedtorch-keyserver", keepalives=1, keepalives_idle=10,
                keepalives_interval=5, keepalives_count=3)
            conn.execute(self._settings)
        except self._pg.Error as exc:
            self._down_until = time.monotonic() + 0.5
            log.error("store %s unreachable: %s", self.where, str(exc).strip())
            raise StoreUnavailable("the keyserver's database is unreachable") from None
        self._down_until = 0.0
        return conn

    def _healthy(self, conn: Any) -> bool:
        return not (conn.closed or conn.broken) and \
            conn.info.transaction_status == self._pg.pq.TransactionStatus.IDLE

    @contextlib.contextmanager
    def _connection(self) -> Iterator[_Slot]:
        """A connection for one transaction (back to the pool afterwards if healthy)."""
        if not self._slots.acquire(timeout=30):
            raise StoreUnavailable("every database connection of this replica is busy")
        slot = _Slot()
        try:
            with self._lock:
                slot.conn = self._idle.pop() if self._idle else None
            slot.fresh = slot.conn is None
            if slot.conn is None:
                slot.conn = self._connect()
            yield slot
        finally:
            conn = slot.conn
            if conn is not None:
                if not self._closed and self._healthy(conn):
                    with self._lock:
                        self._idle.append(conn)
                else:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._slots.release()

    def _lost(self, exc: Exception) -> StoreUnavailable:
        log.error("store %s: connection lost: %s", self.where, str(exc).strip())
        return StoreUnavailable("the keyserver's database is unavailable")

    @contextlib.contextmanager
    def _tx(self, begin: str, *, locked: bool) -> Iterator[StoreTx]:
        pg = self._pg
        try:
            with self._connection() as slot:
                conn = slot.conn
                try:
                    conn.execute(begin)
                except pg.OperationalError:
                    if slot.fresh:
                        raise
                    # a pooled connection died while idle (database restarted, network
                    # cut): nothing has happened yet, so take a new one
                    conn.close()
                    slot.conn = None
                    conn = slot.conn = self._connect()
                    conn.execute(begin)
                try:
                    yield _PgTx(conn, self._lock_key, locked=locked)
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except pg.OperationalError as exc:  # includes lock/statement timeouts
            raise self._lost(exc) from None
        except pg.InterfaceError as exc:  # the connection was closed under us
            raise self._lost(exc) from None

    # ------------------------------------------------------------------ Store

    def transaction(self, *, durable: bool = True) -> contextlib.AbstractContextManager[StoreTx]:
        if durable:
            return self._tx(f"BEGIN; SELECT pg_advisory_xact_lock({self._lock_key})",
                            locked=True)
        return self._tx("BEGIN; SET LOCAL synchronous_commit TO OFF", locked=False)

    def snapshot(self) -> contextlib.AbstractContextManager[StoreTx]:
        return self._tx("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", locked=False)

    def ping(self) -> None:
        with self.snapshot() as tx:
            tx.audit_head()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._idle = self._idle, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    # ------------------------------------------------------------------ schema

    def _migrate(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            conn.execute(schema.MIGRATIONS_TABLE)
            applied = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
            schema.check_known(applied, f"{self.where} schema {self.schema}")
            for m in schema.pending(applied):
                for statement in m.postgres:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                             (m.version, m.name, time.time()))
                log.info("store %s schema %s: applied migration %d (%s)", self.where,
                         self.schema, m.version, m.name)
            conn.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) "
                         "DO UPDATE SET value = excluded.value", (str(schema.LATEST),))
