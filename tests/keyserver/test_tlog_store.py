"""The transparency log inside the real stores: written in the audit append's transaction,
consistent when several PostgreSQL replicas append at once, rebuilt for a store from before
the log, and a replica with another log key refused."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import time
from pathlib import Path

import pytest

from sealedtorch import crypto
from sealedtorch.errors import ConfigError
from sealedtorch.keyserver import tlog
from sealedtorch.keyserver.store import SqliteStore
from sealedtorch.keyserver.store_pg import PostgresStore


def _append(store, n: int, tag: str) -> None:
    for i in range(n):
        with store.transaction() as tx:
            tx.append_audit({"time": time.time(), "event": "test", "decision": "ok",
                             "details": f"{tag}-{i}"})


def _check_tree_matches_records(store) -> int:
    with store.snapshot() as tx:
        records = tx.audit_records()
        report = tlog.verify_log(tx, records)
    assert report.ok, report.problems
    assert report.leaves == len(records)
    return report.leaves


def test_sqlite_appends_build_the_tree_of_the_records(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ks.db")
    try:
        _append(store, 37, "a")
        assert _check_tree_matches_records(store) == 37
    finally:
        store.close()


def test_a_failed_transaction_leaves_no_leaf(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ks.db")
    try:
        _append(store, 3, "a")
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.append_audit({"time": time.time(), "event": "test", "decision": "ok"})
            raise RuntimeError("rolled back")
        with store.snapshot() as tx:
            assert tx.tlog_size() == 3
        _append(store, 1, "b")
        assert _check_tree_matches_records(store) == 4
    finally:
        store.close()


def test_postgres_replicas_appending_at_once_keep_one_tree(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(3)]
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: _append(stores[i % 3], 15, f"r{i}"), range(6)))
        assert _check_tree_matches_records(stores[0]) == 90
    finally:
        for s in stores:
            s.close()


def test_a_store_from_before_the_log_gets_its_leaves_built(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ks.db")
    _append(store, 20, "old")
    store.close()
    conn = sqlite3.connect(tmp_path / "ks.db", isolation_level=None)
    conn.execute("DROP TRIGGER tlog_no_delete")
    conn.execute("DELETE FROM tlog_nodes")  # what a pre-migration-4 store looks like
    conn.close()
    store = SqliteStore(tmp_path / "ks.db")
    try:
        log = tlog.open_log(store, tmp_path)
        assert (tmp_path / tlog.SIGNER_FILE).stat().st_mode & 0o777 == 0o600
        with store.snapshot() as tx:
            cp, _ = log.checkpoint(tx)
        assert cp.size == 20
        _append(store, 2, "new")
        assert _check_tree_matches_records(store) == 22
    finally:
        store.close()


def test_a_replica_with_another_log_key_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ks.db")
    try:
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
        tlog.open_log(store, tmp_path / "first")
        with pytest.raises(ConfigError, match=r"copy tlog-signing\.key"):
            tlog.open_log(store, tmp_path / "second")
    finally:
        store.close()


def test_the_leaf_is_the_record_as_stored(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ks.db")
    try:
        with store.transaction() as tx:
            rec = tx.append_audit({"time": 1.0, "event": "test", "decision": "ok"})
        with store.snapshot() as tx:
            assert tlog.root(tx, 1) == crypto.merkle_leaf_hash(rec.record_json.encode())
    finally:
        store.close()


def test_init_writes_the_log_signing_key_0600_and_records_its_verifier(tmp_path: Path) -> None:
    from sealedtorch.keyserver import config

    init = config.init_data_dir(tmp_path / "data", now=time.time())
    key_file = init.config.data_dir / tlog.SIGNER_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    store = config.open_store(init.config)
    try:
        with store.snapshot() as tx:
            assert tx.tlog_meta(tlog.META_VKEY) == tlog.read_verifier(init.config.data_dir).vkey
            assert tx.tlog_size() == 1  # the keyserver.init record is leaf 0
    finally:
        store.close()


def test_first_run_of_a_data_dir_from_before_the_log_creates_its_key(tmp_path: Path) -> None:
    from sealedtorch.keyserver import config, server

    init = config.init_data_dir(tmp_path / "data", now=time.time())
    (init.config.data_dir / tlog.SIGNER_FILE).unlink()
    conn = sqlite3.connect(init.config.data_dir / "keyserver.db", isolation_level=None)
    conn.execute("DELETE FROM meta WHERE key = ?", (tlog.META_VKEY,))
    conn.close()
    service = server.build_keyserver(init.config)
    try:
        assert (init.config.data_dir / tlog.SIGNER_FILE).stat().st_mode & 0o777 == 0o600
        assert service.tlog.verifier == tlog.read_verifier(init.config.data_dir)
    finally:
        service.store.close()


def test_two_replica_processes_keep_one_log_a_witness_can_follow(pg_url: str,
                                                                 tmp_path: Path) -> None:
    """Two `keyserver run` processes on one PostgreSQL schema, clients releasing through
    both at once; one witness following the checkpoints of both replicas sees one
    consistent log, and `keyserver audit verify` finds the tree equal to the records."""
    import subprocess
    import sys
    import threading

    from sealedtorch.attest import measure, sim
    from sealedtorch.attest.attesters import SimAttester
    from sealedtorch.keys import ModelKey
    from sealedtorch.keyserver import config
    from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient

    from .conftest import disable_rate_limit, start_replicas

    init = config.init_data_dir(tmp_path / "data", now=time.time(), database=pg_url)
    disable_rate_limit(init.config.data_dir)
    platform = sim.init_platform(tmp_path / "sim")
    m = measure.measurement(b"tlog-replicas")
    log = open(tmp_path / "server.log", "w+")
    procs: list = []
    try:
        urls = start_replicas(procs, init.config.data_dir, platform.directory / sim.PUB_FILE,
                              log, database=pg_url, ca=init.ca_file)
        with AdminClient.from_token_file(urls[0], init.ca_file, init.admin_token_file) as a:
            a.register(ModelKey.generate("replicated"),
                       {"allow": [{"tee": "sim", "measurement": m.hex()}]})
        witness = tlog.Witness()
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                for j in range(4):
                    url = urls[(i + j) % 2]
                    with AttestedKeyClient(url, init.ca_file, SimAttester(platform, m),
                                           witness=witness) as c:
                        c.fetch("replicated")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert witness.size is not None and witness.size >= 6 * 4 * 2
        out = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "keyserver", "audit",
                              "verify", "--data", str(init.config.data_dir), "--database",
                              pg_url], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "transparency log intact" in out.stdout
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        log.close()
