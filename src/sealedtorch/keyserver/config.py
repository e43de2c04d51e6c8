"""The keyserver's data directory: what ``keyserver init`` creates and ``run`` reads.

Layout (all secrets mode 0600, the directory 0700)::

    DIR/keyserver.json        settings; names the store and KEK providers by type
    DIR/keyserver.db          SQLite store (WAL): models, wrapped keys, nonces, audit log
    DIR/kek.json              the file KEK (AES-256 key-encryption key)
    DIR/token-signing.key     Ed25519 key that signs attestation-result tokens
    DIR/tlog-signing.key      Ed25519 key that signs the transparency log's checkpoints
    DIR/tls/ca.pem, ca.key    the deployment's private CA (give ca.pem to clients)
    DIR/tls/server.pem, .key  the server certificate (127.0.0.1, localhost, --hostname)
    DIR/admin-token           the first admin token, written once (only its hash is stored)

``store`` and ``kek`` in keyserver.json carry a ``type`` so that PostgreSQL and PKCS#11
providers slot in beside ``sqlite`` and ``file`` without changing this layout.  With
``init --database postgresql://…`` the store is ``{"type": "postgresql", "dsn": …}`` and
there is no ``keyserver.db``; replicas share the database and a copy of this directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import crypto, secretfile
from ..atomicfile import write_atomically
from ..attest.policy import DeploymentPolicy, load_deployment_policy
from ..errors import ConfigError, PolicyError
from . import tlog, tls, tokens
from .kek import FileKek, open_ring
from .kek_base import KekProvider
from .store import AdminTokenRecord, SqliteStore, Store

CONFIG_FILE = "keyserver.json"
CONFIG_FORMAT = "sealedtorch-keyserver/v1"
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 (a file name)
#: Per-client limit on the attestation endpoints: (requests per second, burst).
DEFAULT_RATE_LIMIT = (50.0, 200.0)
#: ``"required"``: this directory's store is sealed with row MACs (see :mod:`.rowmac`), so a
#: store without its marker is refused instead of sealed again (trust on upgrade, once).
ROW_MACS_SETTING = "row_macs"


@dataclass(frozen=True)
class KeyserverConfig:
    data_dir: Path
    store: dict[str, Any]
    kek: dict[str, Any]
    tls_cert: Path
    tls_key: Path
    tls_ca: Path | None
    token_signing_key: Path
    nonce_ttl: float = 60.0
    token_ttl: float = 300.0
    max_body: int = 1 << 20
    pccs_url: str | None = None
    kds_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: (rate per second, burst) per client address on the attestation endpoints; None: off
    rate_limit: tuple[float, float] | None = DEFAULT_RATE_LIMIT
    #: ``attestation_policy``: checked on every evidence before a token is issued.
    attestation_policy: DeploymentPolicy = field(default_factory=DeploymentPolicy)

    def path(self, value: str | Path) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.data_dir / p


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` exclusively with ``mode`` (never overwrites, never widens)."""
    secretfile.write_new(path, data, what="a keyserver file", mode=mode)


def load_config(data_dir: Path | str) -> KeyserverConfig:
    d = Path(data_dir)
    path = d / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{d} is not a keyserver data directory (no {CONFIG_FILE}); "
                          f"create one with `sealedtorch keyserver init --data {d}`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != CONFIG_FORMAT:
        raise ConfigError(f"{path}: not a {CONFIG_FORMAT} configuration")
    try:
        tls_conf = raw["tls"]
        cfg = KeyserverConfig(
            data_dir=d, store=dict(raw["store"]), kek=dict(raw["kek"]),
            tls_cert=Path(tls_conf["cert"]), tls_key=Path(tls_conf["key"]),
            tls_ca=Path(tls_conf["ca"]) if tls_conf.get("ca") else None,
            token_signing_key=Path(raw["token_signing_key"]),
            nonce_ttl=float(raw.get("nonce_ttl", 60.0)),
            token_ttl=float(raw.get("token_ttl", 300.0)),
            max_body=int(raw.get("max_body", 1 << 20)),
            pccs_url=raw.get("pccs_url"), kds_url=raw.get("kds_url"), extra=raw,
            rate_limit=_rate_limit(raw),
            attestation_policy=load_deployment_policy(raw.get("attestation_policy")))
    except PolicyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: missing or invalid setting: {exc}") from None
    if not 1 <= cfg.nonce_ttl <= 3600 or not 1 <= cfg.token_ttl <= 86400:
        raise ConfigError(f"{path}: nonce_ttl must be 1..3600 s and token_ttl 1..86400 s")
    return cfg


def _rate_limit(raw: dict[str, Any]) -> tuple[float, float] | None:
    if "rate_limit" not in raw:
        return DEFAULT_RATE_LIMIT
    value = raw["rate_limit"]
    if value is None:
        return None
    rate, burst = float(value["rate"]), float(value["burst"])
    if rate <= 0 or burst < 1:
        raise ValueError("rate_limit: rate must be > 0 and burst >= 1")
    return rate, burst


def database_settings(url: str) -> dict[str, Any]:
    """The ``store`` section for ``--database URL`` (PostgreSQL)."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--database expects a postgresql:// URL (got {url.split(':')[0]!r}"
                          f"…); SQLite is the default store and needs no option")
    return {"type": "postgresql", "dsn": url}


def with_database(cfg: KeyserverConfig, url: str | None) -> KeyserverConfig:
    """``cfg`` with its store replaced by the PostgreSQL database at ``url`` (if given)."""
    if not url:
        return cfg
    return dataclasses.replace(cfg, store={**database_settings(url),
                                           **{k: v for k, v in cfg.store.items()
                                              if k == "max_connections"}})


#: The SQLite store and the files SQLite keeps beside it (same permissions as the store).
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def private_sqlite_files(path: Path) -> None:
    """Make the store and its -wal/-shm files 0600 (they hold wrapped keys, policies and
    the audit log: nobody else on the host has to read them).  SQLite creates -wal and -shm
    with the store file's mode, so creating the store 0600 first covers them; files an
    older version left 0644 are tightened."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError as exc:
        raise ConfigError(f"cannot open store {path}: {exc.strerror}") from None
    for suffix in SQLITE_SUFFIXES:
        p = Path(f"{path}{suffix}")
        try:
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.geteuid():
                os.chmod(p, 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot restrict {p} to mode 0600: {exc.strerror}") from None


def open_store_settings(settings: dict[str, Any], data_dir: Path) -> Store:
    kind = settings.get("type")
    if kind == "sqlite":
        p = Path(settings["path"])
        path = p if p.is_absolute() else data_dir / p
        private_sqlite_files(path)
        return SqliteStore(path, synchronous=str(settings.get("synchronous", "FULL")))
    if kind == "postgresql":
        from .store_pg import PostgresStore

        return PostgresStore(str(settings["dsn"]),
                             max_connections=int(settings.get("max_connections", 16)))
    raise ConfigError(f"unknown store type {kind!r} (this version supports: sqlite, "
                      f"postgresql)")


def open_store(cfg: KeyserverConfig) -> Store:
    return open_store_settings(cfg.store, cfg.data_dir)


def set_setting(cfg: KeyserverConfig, key: str, value: Any) -> None:
    """Set one top-level setting of ``keyserver.json`` atomically (temp file, fsync,
    rename); every other setting is kept as it is."""

    path = cfg.data_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    raw[key] = value
    write_atomically(path, (json.dumps(raw, indent=2) + "\n").encode())


def open_kek(cfg: KeyserverConfig) -> KekProvider:
    """The configured KEKs (active + read-only fallbacks, see :class:`.kek.KekRing`),
    following later changes of this directory's configuration file."""
    return open_ring(cfg.kek, data_dir=cfg.data_dir, config_file=cfg.data_dir / CONFIG_FILE)


@dataclass(frozen=True)
class InitResult:
    config: KeyserverConfig
    admin_token_file: Path
    ca_file: Path | None


def init_data_dir(data_dir: Path | str, *, hostnames: tuple[str, ...] = (),
                  tls_cert: Path | None = None, tls_key: Path | None = None,
                  now: float, database: str | None = None) -> InitResult:
    """Create a keyserver data directory.  Refuses to touch an existing configuration, or
    a ``database`` (PostgreSQL URL) that already holds a keyserver."""
    d = Path(data_dir)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if (d / CONFIG_FILE).exists():
        raise ConfigError(f"{d} already holds a keyserver ({CONFIG_FILE}); refusing to "
                          f"re-initialise it")
    store_settings: dict[str, Any] = {"type": "sqlite", "path": "keyserver.db",
                                      "synchronous": "FULL"}
    if database:
        store_settings = database_settings(database)
        probe = open_store_settings(store_settings, d)  # creates the schema
        try:
            with probe.snapshot() as tx:
                taken = bool(tx.list_admin_tokens())
        finally:
            probe.close()
        if taken:
            raise ConfigError("the database already holds a keyserver (it has admin tokens); "
                              "for another replica copy the first one's data directory "
                              "instead of running init again")
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        (d / "tls").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {d}: {exc.strerror}") from None

    ca_path: Path | None
    if tls_cert is not None and tls_key is not None:
        tls.check_server_files(tls_cert, tls_key)
        cert_path, key_path, ca_path = tls_cert.resolve(), tls_key.resolve(), None
    else:
        ca_cert, ca_key, cert, key = tls.make_ca_and_server(hostnames)
        write_new(d / "tls" / "ca.pem", ca_cert, 0o644)
        write_new(d / "tls" / "ca.key", ca_key)
        write_new(d / "tls" / "server.pem", cert, 0o644)
        write_new(d / "tls" / "server.key", key)
        cert_path, key_path, ca_path = (Path("tls/server.pem"), Path("tls/server.key"),
                                        Path("tls/ca.pem"))

    FileKek.create(d / "kek.json")
    write_new(d / "token-signing.key", crypto.SigningKey.generate().to_pem())
    signer = tlog.Signer.generate()
    write_new(d / tlog.SIGNER_FILE, (signer.skey() + "\n").encode())
    settings = {
        "format": CONFIG_FORMAT,
        "store": store_settings,
        "kek": {"type": "file", "path": "kek.json"},
        "tls": {"cert": str(cert_path), "key": str(key_path),
                "ca": str(ca_path) if ca_path else None},
        "token_signing_key": "token-signing.key",
        "nonce_ttl": 60, "token_ttl": 300, "max_body": 1 << 20,
        "rate_limit": {"rate": DEFAULT_RATE_LIMIT[0], "burst": DEFAULT_RATE_LIMIT[1]},
        ROW_MACS_SETTING: "required",
    }
    write_new(d / CONFIG_FILE, (json.dumps(settings, indent=2) + "\n").encode(), 0o600)
    cfg = load_config(d)

    from .admin_service import TOKEN_LIFETIME
    from .rowmac import META_KEY, RowIntegrity

    token = tokens.new_admin_token()
    token_hash = tokens.admin_token_hash(token)
    store = open_store(cfg)
    kek = open_kek(cfg)
    try:
        rows = RowIntegrity(kek)
        record = rows.seal_token(AdminTokenRecord(
            tokens.admin_token_id(token_hash), "initial", "admin", now,
            principal_id="initial", expires_at=now + TOKEN_LIFETIME, token_hash=token_hash))
        with store.transaction() as tx:
            tlog.check_store_key(tx, signer.verifier)
            tx.insert_admin_token(record, token_hash)
            tx.set_meta(META_KEY, rows.marker())
            tx.append_audit({"time": now, "event": "keyserver.init", "decision": "ok",
                             "actor": "local", "details": {
                                 "admin_token": tokens.admin_token_id(token_hash),
                                 "admin_token_expires_at": record.expires_at,
                                 "kek": kek.kek_id}})
    finally:
        store.close()
        kek.close()
    write_new(d / ADMIN_TOKEN_FILE, (token + "\n").encode())
    return InitResult(cfg, d / ADMIN_TOKEN_FILE, cfg.path(ca_path) if ca_path else None)
