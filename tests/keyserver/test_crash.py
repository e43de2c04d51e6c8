"""kill -9 of a keyserver in the middle of a burst of registrations and releases, on SQLite
and on PostgreSQL: after a restart, every request that was answered 2xx is in the store and
the audit log exactly once, no key is half-written (every model has its key, every wrapped
key unwraps to what was uploaded), and the audit chain verifies."""

from __future__ import annotations

import base64
import signal
import threading
import time

import httpx
import pytest

from sealedtorch import crypto
from sealedtorch.attest import measure, sim
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import audit, config
from sealedtorch.keyserver.tls import client_context

from .conftest import (
    Keyserver,
    assert_no_plaintext_keys,
    disable_rate_limit,
    start_keyserver,
    wait_ready,
)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_kill_9_mid_burst_loses_nothing_committed(engine, tmp_path, request):
    database = request.getfixturevalue("pg_url") if engine == "postgresql" else None
    init = config.init_data_dir(tmp_path / "data", now=time.time(), database=database)
    disable_rate_limit(init.config.data_dir)
    platform = sim.init_platform(tmp_path / "sim")
    pub = platform.directory / sim.PUB_FILE
    log = open(tmp_path / "server.log", "w+")
    proc, url = start_keyserver(init.config.data_dir, pub, log, database=database)
    try:
        wait_ready(url, init.ca_file, proc)
        ks = Keyserver(url, init, None, platform, measure.measurement(b"crash"), None, None)
        base_key = ks.register("crash-base")
        admin_token = init.admin_token_file.read_text().strip()

        registered: dict[str, tuple[ModelKey, str]] = {}  # answered 201: key, request id
        attempted: dict[str, ModelKey] = {}
        released: list[str] = []  # request ids of answered releases
        stop = threading.Event()
        lock = threading.Lock()

        def registrar(t: int) -> None:
            with httpx.Client(base_url=url, verify=client_context(init.ca_file),
                              timeout=5) as http:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    key = ModelKey.generate(f"crash-{t}-{i}")
                    with lock:
                        attempted[key.model_id] = key
                    try:
                        r = http.post("/v1/admin/models", headers={
                            "Authorization": f"Bearer {admin_token}"}, json={
                            "model_id": key.model_id, "policy": ks.policy(),
                            "key": {"version": 1, "key": base64.b64encode(key.secret)
                                    .decode()}})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 201:
                        with lock:
                            registered[key.model_id] = (key, r.headers["x-request-id"])

        def releaser() -> None:
            with httpx.Client(base_url=url, verify=client_context(init.ca_file),
                              timeout=5) as http:
                while not stop.is_set():
                    kp = crypto.EphemeralKeyPair.generate()
                    try:
                        nonce = ks.challenge(http)
                        r = http.post("/v1/attest", json=ks.attest_body(nonce,
                                                                        kp.public_bytes))
                        if r.status_code != 200:
                            continue
                        r = http.get("/v1/keys/crash-base", headers={
                            "Authorization": f"Bearer {r.json()['token']}"})
                    except (httpx.HTTPError, AssertionError):
                        return
                    if r.status_code == 200:
                        with lock:
                            released.append(r.headers["x-request-id"])

        threads = [threading.Thread(target=registrar, args=(t,)) for t in range(3)] + \
            [threading.Thread(target=releaser) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while (len(registered) < 15 or len(released) < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=20)
        assert len(registered) >= 15 and len(released) >= 10, (len(registered),
                                                               len(released))

        # restart on the same store
        proc, url = start_keyserver(init.config.data_dir, pub, log, database=database)
        wait_ready(url, init.ca_file, proc)
        store = config.open_store(init.config)
        kek = config.open_kek(init.config)
        try:
            with store.snapshot() as tx:
                records = tx.audit_records()
                models = {m.model_id: m for m in tx.list_models()}
                versions = {mid: tx.key_versions(mid) for mid in models}
        finally:
            store.close()
        report = audit.verify_chain(records)
        assert report.ok, report

        by_request: dict[str, list[audit.AuditRecord]] = {}
        for rec in records:
            rid = rec.body.get("request_id")
            if rid:
                by_request.setdefault(rid, []).append(rec)
        for model_id, (_key, rid) in registered.items():
            assert model_id in models, f"{model_id}: answered 201, lost after kill -9"
            assert [(r.event, r.decision) for r in by_request[rid]] == [("register", "ok")]
        for rid in released:
            assert [(r.event, r.decision) for r in by_request[rid]] == [("release", "allow")]
        # no half-written model: each one has its key, and it unwraps to what was sent
        for model_id in models:
            (key_record,) = versions[model_id]
            expected = attempted[model_id] if model_id != "crash-base" else base_key
            assert kek.unwrap(key_record.wrapped, model_id=model_id, version=1,
                              kek_id=key_record.kek_id) == expected.secret
            register_records = [r for r in records if r.event == "register"
                                and r.model_id == model_id and r.decision == "ok"]
            assert len(register_records) == 1

        # and the restarted server serves what was committed
        some = next(iter(registered))
        ks.url = url
        with ks.client() as client:
            assert client.fetch(some).model_key == registered[some][0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    # nothing of any key in plaintext: database (dump or file), data directory, logs
    keys = [base_key, *attempted.values()]
    assert_no_plaintext_keys(keys, database, init.config.data_dir, tmp_path / "server.log")
