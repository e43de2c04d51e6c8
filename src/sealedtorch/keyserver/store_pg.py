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
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError
from . import schema
from .store import SqlTx, StoreTx, StoreUnavailable

log = logging.getLogger("sealedtorch.keyserver")


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


class _PgTx(SqlTx):
    """The shared SQL with psycopg's placeholders, plus the cross-replica writer lock."""

    PARAM = "%s"

    def __init__(self, conn: Any, lock_key: int, *, locked: bool) -> None:
        super().__init__(conn)
        self._lock_key = lock_key
        self._locked = locked

    def _before_audit_append(self) -> None:
        if not self._locked:  # durable transactions hold it from their first statement
            self._c.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            self._locked = True



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
