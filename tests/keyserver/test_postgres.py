"""The PostgreSQL store for real, on the local server (a fresh schema per test):
migrations under concurrent starts, the shared nonce and audit chain across stores, two
`keyserver run` processes serving 32 concurrent clients (challenge at one replica, attest at
the other), the database going away and coming back, and no plaintext key anywhere in the
database dump, the data directory or the logs."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import psycopg
import pytest
from tcp_proxy import Proxy

from sealedtorch import crypto, errors
from sealedtorch.attest import measure, sim
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import audit, config, protocol, schema, server
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.store import SqliteStore
from sealedtorch.keyserver.store_pg import PostgresStore, redact_dsn
from sealedtorch.keyserver.tls import client_context

from .conftest import (
    Keyserver,
    assert_no_plaintext_keys,
    disable_rate_limit,
    schema_of,
    start_replicas,
)


def _records(store) -> list[audit.AuditRecord]:
    with store.snapshot() as tx:
        return tx.audit_records()


def test_migrations_once_under_concurrent_starts(pg_url):
    """Four replicas starting at once against an empty schema: each migration is applied
    exactly once, and all four stores work."""
    barrier = threading.Barrier(4)

    def start() -> PostgresStore:
        barrier.wait()
        return PostgresStore(pg_url)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: start(), range(4)))
    try:
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version"
                                ).fetchall()
            assert [r[0] for r in rows] == [m.version for m in schema.MIGRATIONS]
            cols = {r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = "
                "'models' AND table_schema = %s", (schema_of(pg_url),))}
            assert "owner" in cols
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute("TRUNCATE audit")
        # a store written by a newer sealedtorch is refused
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
        with pytest.raises(errors.ConfigError, match="schema version 999"):
            PostgresStore(pg_url)
    finally:
        for s in stores:
            s.close()
    assert "postgres@127.0.0.1:5432/test" in redact_dsn("postgresql://postgres:secret@"
                                                        "127.0.0.1:5432/test")
    assert "secret" not in redact_dsn("postgresql://postgres:secret@127.0.0.1/test")


def test_sqlite_store_from_before_migrations_is_upgraded(tmp_path):
    """A database made by the first release (schema v1 in `meta`, no schema_migrations)."""
    conn = sqlite3.connect(tmp_path / "old.db")
    for statement in schema.MIGRATIONS[0].sqlite:
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO models VALUES ('m', '{}', 'd', 1, 1)")
    conn.commit()
    conn.close()
    store = SqliteStore(tmp_path / "old.db")
    with store.snapshot() as tx:
        assert tx.get_model("m").owner is None
    store.close()
    conn = sqlite3.connect(tmp_path / "old.db")
    assert conn.execute("SELECT value FROM meta").fetchone()[0] == str(schema.LATEST)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == \
        [m.version for m in schema.MIGRATIONS]
    conn.close()


def test_nonce_and_chain_are_shared_between_stores(pg_url):
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        now = time.time()
        with a.transaction(durable=False) as tx:
            tx.insert_nonce(b"n" * 32, "sim", now, now + 60)
        with b.snapshot() as tx:
            tx.check_nonce(b"n" * 32, "sim", now)
        with b.transaction() as tx:
            tx.consume_nonce(b"n" * 32, "sim", now)
        with pytest.raises(errors.NonceError, match="already used"), a.transaction() as tx:
            tx.consume_nonce(b"n" * 32, "sim", now)

        # concurrent writers through both stores: one unbroken chain
        def append(store: PostgresStore, i: int) -> None:
            with store.transaction() as tx:
                tx.append_audit({"time": now + i, "event": "test", "decision": "ok"})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: append((a, b)[i % 2], i), range(200)))
        report = audit.verify_chain(_records(a))
        assert report.ok and report.count == 200
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------- two replicas

@pytest.fixture
def replicas(pg_url, tmp_path):
    """`keyserver init --database` once, then two `keyserver run` processes on it."""
    init = config.init_data_dir(tmp_path / "data", now=time.time(), database=pg_url)
    assert not (tmp_path / "data" / "keyserver.db").exists()
    with pytest.raises(errors.ConfigError, match="already holds a keyserver"):
        config.init_data_dir(tmp_path / "other", now=time.time(), database=pg_url)
    disable_rate_limit(init.config.data_dir)
    platform = sim.init_platform(tmp_path / "sim")
    log = open(tmp_path / "server.log", "w+")
    procs: list[subprocess.Popen] = []
    try:
        urls = start_replicas(procs, init.config.data_dir, platform.directory / sim.PUB_FILE,
                              log, database=pg_url, ca=init.ca_file)
        yield init, platform, urls, tmp_path / "server.log"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        log.close()


def _ks(init, platform, url) -> Keyserver:
    return Keyserver(url, init, None, platform, measure.measurement(b"pg"), None, None)


def test_two_replicas_one_truth(pg_url, replicas):
    init, platform, urls, log_path = replicas
    a, b = (_ks(init, platform, u) for u in urls)
    keys = [ModelKey.generate(f"pg-model-{i}") for i in range(3)]
    with a.admin() as admin_a, b.admin() as admin_b:
        admin_a.register(keys[0], a.policy())
        admin_b.register(keys[1], b.policy())
        owner_token = admin_a.create_token("owner", "olga")["token"]
    with AdminClient(b.url, b.ca, owner_token) as olga:  # a token made at A works at B
        olga.register(keys[2], b.policy())
        assert [m["model_id"] for m in olga.list_models()] == ["pg-model-2"]

    # challenge at A, attest at B, fetch at A; the nonce is then spent everywhere
    kp = crypto.EphemeralKeyPair.generate()
    with a.http() as ha, b.http() as hb:
        nonce = a.challenge(ha)
        body = a.attest_body(nonce, kp.public_bytes)
        r = hb.post("/v1/attest", json=body)
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        for h in (ha, hb):
            replay = h.post("/v1/attest", json=body)
            assert replay.status_code == 403 and replay.json()["problem"] == "nonce"
        r = ha.get("/v1/keys", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert sorted(k["model_id"] for k in r.json()["keys"]) == [k.model_id for k in keys]
        # a revocation committed through B is seen by the next release at A
        with b.admin() as admin_b:
            admin_b.revoke(keys[0].model_id, reason="test")
        r = ha.get(f"/v1/keys/{keys[0].model_id}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 410

    # 32 concurrent clients over both replicas, each attesting at the replica it did not
    # get its challenge from; every answered release must be in the audit log exactly once
    released: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        mine, other = (a, b) if i % 2 else (b, a)
        with mine.http() as hm, other.http() as ho:
            for _ in range(3):
                kp = crypto.EphemeralKeyPair.generate()
                nonce = mine.challenge(hm)
                r = ho.post("/v1/attest", json=mine.attest_body(nonce, kp.public_bytes))
                if r.status_code != 200:
                    with lock:
                        failures.append(r.text)
                    continue
                tok = r.json()["token"]
                r = hm.get(f"/v1/keys/{keys[1].model_id}",
                           headers={"Authorization": f"Bearer {tok}"})
                with lock:
                    if r.status_code == 200:
                        item = r.json()["keys"][0]
                        secret = kp.open(base64.b64decode(item["sealed_key"]),
                                         info=protocol.release_info(
                                             item["model_id"], 1, item["policy_digest"]))
                        assert secret == keys[1].secret
                        released.append(r.headers["x-request-id"])
                    else:
                        failures.append(r.text)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(client, range(32)))
    assert not failures, failures[:3]
    assert len(released) == 96

    store = PostgresStore(pg_url)
    try:
        records = _records(store)
    finally:
        store.close()
    report = audit.verify_chain(records)
    assert report.ok, report
    by_request: dict[str, list[dict]] = {}
    for rec in records:
        body = rec.body
        if body.get("event") == "release" and body.get("request_id"):
            by_request.setdefault(body["request_id"], []).append(body)
    for rid in released:
        assert [r["decision"] for r in by_request.get(rid, [])] == ["allow"], rid
    attests = [r for r in records if r.event == "attest" and r.decision == "ok"]
    assert len(attests) == 97

    # the CLI reads the same chain from the database named in the data directory
    out = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "keyserver", "audit", "verify",
                          "--data", str(init.config.data_dir)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and f"{report.count} records" in out.stdout, out

    assert_no_plaintext_keys(keys, pg_url, init.config.data_dir, log_path)


# ------------------------------------------------------------------------- outage

def test_database_outage_answers_503_and_recovers(pg_url, tmp_path):
    proxy = Proxy(("127.0.0.1", 5432))
    via_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    init = config.init_data_dir(tmp_path / "data", now=time.time(), database=via_proxy)
    platform = sim.init_platform(tmp_path / "sim")
    with server.BackgroundServer.start(
            init.config, trust_sim_roots=[platform.directory / sim.PUB_FILE]) as srv:
        ks = _ks(init, platform, srv.url)
        key = ks.register("outage-model")
        client = AttestedKeyClient(srv.url, ks.ca, ks.attester())
        assert client.fetch("outage-model").model_key == key

        proxy.cut()
        with ks.http() as http:
            assert http.get("/healthz").status_code == 200
            ready = http.get("/readyz")
            assert ready.status_code == 503
            for send in (lambda: http.post("/v1/attest/challenge", json={"tee": "sim"}),
                         lambda: http.get("/v1/keys/outage-model", headers={
                             "Authorization": f"Bearer {client.result.token}"}),
                         lambda: http.get("/v1/admin/models", headers={
                             "Authorization": "Bearer " + init.admin_token_file.read_text()
                             .strip()})):
                r = send()
                assert r.status_code == 503, r.text
                assert r.json()["problem"] == "unavailable" and r.headers["retry-after"]
            metrics = http.get("/metrics").text
            assert "sealedtorch_keyserver_store_up 0" in metrics
        with pytest.raises(errors.ServiceUnavailable):  # the client sees a typed error
            AttestedKeyClient(srv.url, ks.ca, ks.attester()).fetch("outage-model")

        proxy.restore()  # the database is back: no restart
        deadline = time.monotonic() + 10
        with ks.http() as http:
            while http.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        fresh = AttestedKeyClient(srv.url, ks.ca, ks.attester())
        assert fresh.fetch("outage-model").model_key == key
        with ks.admin() as admin:
            assert admin.get_model("outage-model")["versions"][0]["state"] == "active"
        fresh.close()
        client.close()
    proxy.cut()
    store = PostgresStore(pg_url)
    try:
        assert audit.verify_chain(_records(store)).ok
    finally:
        store.close()


def test_metrics_and_logs_of_a_replica_show_the_shared_store(replicas):
    init, _platform, urls, log_path = replicas
    with httpx.Client(verify=client_context(init.ca_file)) as http:
        texts = [http.get(u + "/metrics").text for u in urls]
    lengths = {line for t in texts for line in t.splitlines()
               if line.startswith("sealedtorch_keyserver_audit_chain_length ")}
    assert len(lengths) == 1  # both replicas read the same chain
    logs = [json.loads(line) for line in log_path.read_text().splitlines()
            if line.startswith("{")]
    started = [r for r in logs if r["message"].startswith("keyserver listening")]
    assert len(started) == 2 and all("PostgresStore" in r["store"] for r in started)
    assert all("password" not in r["store"] for r in started)
