"""The keyserver's database schema and its migrations, for every store engine.

One list, :data:`MIGRATIONS`, numbered from 1; each migration carries the statements for
SQLite and for PostgreSQL side by side, so both engines always hold the same tables, columns
and rules (the dialects differ only in type names and in how the append-only audit table is
enforced).  A store applies what is missing when it opens, inside one transaction that holds
the engine's writer lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), and
records each applied version in ``schema_migrations``.  So two keyserver replicas starting at
once against one PostgreSQL database apply each migration exactly once, and a store written
by a newer sealedtorch (a version this one does not know) is refused rather than misread.

Rules for new migrations: append, never edit a published one; keep the two dialects
equivalent; a migration must be safe to run on a database that a keyserver is serving from
(additive changes), because replicas are upgraded one by one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


#: Statements that create the bookkeeping table itself (both dialects accept them).
MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
    "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
)

_BASE_SQLITE = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS models (model_id TEXT PRIMARY KEY, policy TEXT NOT NULL, "
    "policy_digest TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS key_versions ("
    "model_id TEXT NOT NULL REFERENCES models(model_id), version INTEGER NOT NULL, "
    "state TEXT NOT NULL CHECK (state IN ('active', 'revoked', 'retired')), "
    "wrapped BLOB, kek_id TEXT, created_at REAL NOT NULL, changed_at REAL, reason TEXT, "
    "PRIMARY KEY (model_id, version))",
    "CREATE TABLE IF NOT EXISTS nonces (nonce BLOB PRIMARY KEY, tee TEXT NOT NULL, "
    "issued_at REAL NOT NULL, expires_at REAL NOT NULL, used_at REAL)",
    "CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at)",
    "CREATE TABLE IF NOT EXISTS admin_tokens (token_id TEXT PRIMARY KEY, "
    "token_hash BLOB NOT NULL UNIQUE, name TEXT NOT NULL, role TEXT NOT NULL, "
    "created_at REAL NOT NULL, revoked_at REAL)",
    "CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, time REAL NOT NULL, "
    "event TEXT NOT NULL, model_id TEXT, decision TEXT NOT NULL, record TEXT NOT NULL, "
    "prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS audit_model ON audit (model_id, seq)",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (time)",
    "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
)

_BASE_POSTGRES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS models (model_id TEXT PRIMARY KEY, policy TEXT NOT NULL, "
    "policy_digest TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
    "updated_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS key_versions ("
    "model_id TEXT NOT NULL REFERENCES models(model_id), version BIGINT NOT NULL, "
    "state TEXT NOT NULL CHECK (state IN ('active', 'revoked', 'retired')), "
    "wrapped BYTEA, kek_id TEXT, created_at DOUBLE PRECISION NOT NULL, "
    "changed_at DOUBLE PRECISION, reason TEXT, PRIMARY KEY (model_id, version))",
    "CREATE TABLE IF NOT EXISTS nonces (nonce BYTEA PRIMARY KEY, tee TEXT NOT NULL, "
    "issued_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, "
    "used_at DOUBLE PRECISION)",
    "CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces (expires_at)",
    "CREATE TABLE IF NOT EXISTS admin_tokens (token_id TEXT PRIMARY KEY, "
    "token_hash BYTEA NOT NULL UNIQUE, name TEXT NOT NULL, role TEXT NOT NULL, "
    "created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)",
    "CREATE TABLE IF NOT EXISTS audit (seq BIGINT PRIMARY KEY, "
    "time DOUBLE PRECISION NOT NULL, event TEXT NOT NULL, model_id TEXT, "
    "decision TEXT NOT NULL, record TEXT NOT NULL, prev_hash TEXT NOT NULL, "
    "hash TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS audit_model ON audit (model_id, seq)",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit (time)",
    "CREATE OR REPLACE FUNCTION sealedtorch_audit_append_only() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$",
    "CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit "
    "FOR EACH ROW EXECUTE FUNCTION sealedtorch_audit_append_only()",
    "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
    "FOR EACH STATEMENT EXECUTE FUNCTION sealedtorch_audit_append_only()",
)

#: Lifetime given at upgrade (migration 3) to admin tokens made before tokens expired
#: (the 7776000 in its statements).
TOKEN_UPGRADE_LIFETIME = 90 * 86400

# Migration 3, the statements both dialects share.  ``ADD COLUMN`` without ``IF NOT EXISTS``
# is what SQLite accepts; PostgreSQL applies migrations once under its advisory lock.
_INTEGRITY_COMMON = (
    "ALTER TABLE models ADD COLUMN owner_id TEXT",
    "ALTER TABLE models ADD COLUMN mac_kek TEXT",
    "ALTER TABLE key_versions ADD COLUMN mac_kek TEXT",
    "ALTER TABLE admin_tokens ADD COLUMN principal_id TEXT",
    "ALTER TABLE admin_tokens ADD COLUMN rotated_from TEXT",
    "ALTER TABLE admin_tokens ADD COLUMN mac_kek TEXT",
)
# Identities made before migration 3 were their names: their immutable id is that name.
# Later identities get their name as id too, unless an identity with that id existed
# before (then ``NAME#2``, ``NAME#3``…; no name holds ``#``), so a new token with a revoked
# owner's name is another principal.  The owner column of audit records holds this id.
_INTEGRITY_BACKFILL = (
    "UPDATE admin_tokens SET principal_id = name WHERE principal_id IS NULL",
    "UPDATE models SET owner_id = owner WHERE owner_id IS NULL AND owner IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS models_owner_id ON models (owner_id, model_id)",
    "CREATE INDEX IF NOT EXISTS admin_tokens_principal ON admin_tokens (principal_id)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "base: models, key versions, nonces, admin tokens, audit chain",
              _BASE_SQLITE, _BASE_POSTGRES),
    Migration(
        2, "owners: models and audit records belong to an owner",
        sqlite=(
            "ALTER TABLE models ADD COLUMN owner TEXT",
            "CREATE INDEX IF NOT EXISTS models_owner ON models (owner, model_id)",
            "ALTER TABLE audit ADD COLUMN owner TEXT",
            "CREATE INDEX IF NOT EXISTS audit_owner ON audit (owner, seq)",
            "CREATE INDEX IF NOT EXISTS admin_tokens_name ON admin_tokens (name)",
        ),
        postgres=(
            "ALTER TABLE models ADD COLUMN IF NOT EXISTS owner TEXT",
            "CREATE INDEX IF NOT EXISTS models_owner ON models (owner, model_id)",
            "ALTER TABLE audit ADD COLUMN IF NOT EXISTS owner TEXT",
            "CREATE INDEX IF NOT EXISTS audit_owner ON audit (owner, seq)",
            "CREATE INDEX IF NOT EXISTS admin_tokens_name ON admin_tokens (name)",
        )),
    Migration(
        3, "integrity: row MACs under the KEK, immutable owner ids, token expiry",
        sqlite=(
            *_INTEGRITY_COMMON,
            "ALTER TABLE admin_tokens ADD COLUMN expires_at REAL",
            "ALTER TABLE admin_tokens ADD COLUMN row_mac BLOB",
            "ALTER TABLE models ADD COLUMN row_mac BLOB",
            "ALTER TABLE key_versions ADD COLUMN row_mac BLOB",
            # trust on upgrade: tokens made before expiry existed get the default lifetime
            "UPDATE admin_tokens SET expires_at = CAST(strftime('%s', 'now') AS REAL) + "
            "7776000 WHERE expires_at IS NULL",
            *_INTEGRITY_BACKFILL,
        ),
        postgres=(
            *_INTEGRITY_COMMON,
            "ALTER TABLE admin_tokens ADD COLUMN IF NOT EXISTS expires_at DOUBLE PRECISION",
            "ALTER TABLE admin_tokens ADD COLUMN IF NOT EXISTS row_mac BYTEA",
            "ALTER TABLE models ADD COLUMN IF NOT EXISTS row_mac BYTEA",
            "ALTER TABLE key_versions ADD COLUMN IF NOT EXISTS row_mac BYTEA",
            "UPDATE admin_tokens SET expires_at = extract(epoch from now()) + 7776000 "
            "WHERE expires_at IS NULL",
            *_INTEGRITY_BACKFILL,
        )),
    Migration(
        4, "transparency log: hashes of the complete subtrees of the audit Merkle tree",
        sqlite=(
            "CREATE TABLE IF NOT EXISTS tlog_nodes (level INTEGER NOT NULL, "
            "idx INTEGER NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (level, idx)) "
            "WITHOUT ROWID",
            "CREATE TRIGGER IF NOT EXISTS tlog_no_update BEFORE UPDATE ON tlog_nodes "
            "BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END",
            "CREATE TRIGGER IF NOT EXISTS tlog_no_delete BEFORE DELETE ON tlog_nodes "
            "BEGIN SELECT RAISE(ABORT, 'the transparency log is append-only'); END",
        ),
        postgres=(
            "CREATE TABLE IF NOT EXISTS tlog_nodes (level SMALLINT NOT NULL, "
            "idx BIGINT NOT NULL, hash BYTEA NOT NULL, PRIMARY KEY (level, idx))",
            "CREATE TRIGGER tlog_no_update BEFORE UPDATE OR DELETE ON tlog_nodes "
            "FOR EACH ROW EXECUTE FUNCTION sealedtorch_audit_append_only()",
            "CREATE TRIGGER tlog_no_truncate BEFORE TRUNCATE ON tlog_nodes "
            "FOR EACH STATEMENT EXECUTE FUNCTION sealedtorch_audit_append_only()",
        )),
)

#: The schema version this sealedtorch writes (the last migration).
LATEST = MIGRATIONS[-1].version


def pending(applied: set[int]) -> list[Migration]:
    """The migrations still to apply, in order."""
    return [m for m in MIGRATIONS if m.version not in applied]


def check_known(applied: set[int], where: str) -> None:
    """Refuse a store that a newer sealedtorch has migrated further than this one knows."""
    from ..errors import ConfigError

    unknown = sorted(v for v in applied if v > LATEST)
    if unknown:
        raise ConfigError(f"{where}: the store has schema version {unknown[-1]}, this "
                          f"sealedtorch understands up to {LATEST}; upgrade sealedtorch")
