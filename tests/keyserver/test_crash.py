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


class _Burst:
    """Registrations (3 threads) and releases (3 threads) against one keyserver, recording
    which were answered 2xx (and with which request id)."""

    def __init__(self, ks: Keyserver, url: str, ca_file, admin_token: str) -> None:
        self.ks, self.url, self.ca_file, self.admin_token = ks, url, ca_file, admin_token
        self.registered: dict[str, tuple[ModelKey, str]] = {}  # answered 201: key, request id
        self.attempted: dict[str, ModelKey] = {}
        self.released: list[str] = []  # request ids of answered releases
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.registrar, args=(t,)) for t in range(3)] + \
            [threading.Thread(target=self.releaser) for _ in range(3)]

    def _http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=client_context(self.ca_file), timeout=5)

    def registrar(self, t: int) -> None:
        with self._http() as http:
            for i in range(10_000):
                if self.stop.is_set():
                    return
                key = ModelKey.generate(f"crash-{t}-{i}")
                with self.lock:
                    self.attempted[key.model_id] = key
                try:
                    r = http.post("/v1/admin/models", headers={
                        "Authorization": f"Bearer {self.admin_token}"}, json={
                        "model_id": key.model_id, "policy": self.ks.policy(),
                        "key": {"version": 1, "key": base64.b64encode(key.secret)
                                .decode()}})
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    with self.lock:
                        self.registered[key.model_id] = (key, r.headers["x-request-id"])

    def releaser(self) -> None:
        with self._http() as http:
            while not self.stop.is_set():
                kp = crypto.EphemeralKeyPair.generate()
                try:
                    nonce = self.ks.challenge(http)
                    r = http.post("/v1/attest", json=self.ks.attest_body(nonce,
                                                                         kp.public_bytes))
                    if r.status_code != 200:
                        continue
                    r = http.get("/v1/keys/crash-base", headers={
                        "Authorization": f"Bearer {r.json()['token']}"})
                except (httpx.HTTPError, AssertionError):
                    return
                if r.status_code == 200:
                    with self.lock:
                        self.released.append(r.headers["x-request-id"])

    def run_until_killed(self, proc) -> None:
        """Start the burst, kill -9 the server once enough was answered, join."""
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + 20
        while (len(self.registered) < 15 or len(self.released) < 10) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
        proc.wait(timeout=10)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=20)


def _read_store(init):
    """The audit records, models and key versions of the store, read directly."""
    store = config.open_store(init.config)
    try:
        with store.snapshot() as tx:
            records = tx.audit_records()
            models = {m.model_id: m for m in tx.list_models()}
            versions = {mid: tx.key_versions(mid) for mid in models}
    finally:
        store.close()
    return records, models, versions


def _by_request(records) -> dict[str, list[audit.AuditRecord]]:
    by_request: dict[str, list[audit.AuditRecord]] = {}
    for rec in records:
        rid = rec.body.get("request_id")
        if rid:
            by_request.setdefault(rid, []).append(rec)
    return by_request


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

        burst = _Burst(ks, url, init.ca_file, admin_token)
        burst.run_until_killed(proc)
        registered, attempted, released = burst.registered, burst.attempted, burst.released
        assert len(registered) >= 15 and len(released) >= 10, (len(registered),
                                                               len(released))

        # restart on the same store
        proc, url = start_keyserver(init.config.data_dir, pub, log, database=database)
        wait_ready(url, init.ca_file, proc)
        kek = config.open_kek(init.config)
        records, models, versions = _read_store(init)
        report = audit.verify_chain(records)
        assert report.ok, report

        by_request = _by_request(records)
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
