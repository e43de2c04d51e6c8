"""One real keyserver per test module: TLS on 127.0.0.1 with its generated CA, a sim
platform it trusts, and a clock the tests can move.  Tests use distinct model ids, so they
share the server (starting one per test would dominate the run time)."""

from __future__ import annotations

import base64
import itertools
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sealedtorch.attest import binding, measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import config, server
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.config import InitResult
from sealedtorch.keyserver.tls import client_context


class FakeClock:
    """A settable clock (seconds since the epoch); starts at the real time."""

    def __init__(self) -> None:
        self._t = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds

    def set(self, t: float) -> None:
        with self._lock:
            self._t = t


@dataclass
class Keyserver:
    url: str
    init: InitResult
    clock: FakeClock
    platform: sim.SimPlatform
    measurement: bytes
    srv: server.BackgroundServer
    tmp: Path

    @property
    def ca(self) -> Path:
        assert self.init.ca_file is not None
        return self.init.ca_file

    @property
    def db(self) -> Path:
        return self.init.config.data_dir / "keyserver.db"

    def admin(self) -> AdminClient:
        return AdminClient.from_token_file(self.url, self.ca, self.init.admin_token_file)

    def attester(self, measurement: bytes | None = None, **kw: Any) -> SimAttester:
        return SimAttester(self.platform, measurement or self.measurement, **kw)

    def client(self, role: str = "runtime", attester: Any = None) -> AttestedKeyClient:
        return AttestedKeyClient(self.url, self.ca, attester or self.attester(), role=role)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=client_context(self.ca), timeout=10)

    def policy(self, measurement: bytes | None = None, **extra: Any) -> dict[str, Any]:
        return {"allow": [{"tee": "sim",
                           "measurement": (measurement or self.measurement).hex()}], **extra}

    def register(self, model_id: str, policy: dict[str, Any] | None = None) -> ModelKey:
        key = ModelKey.generate(model_id)
        with self.admin() as admin:
            admin.register(key, policy or self.policy())
        return key

    # --- direct looks at the store (read-only) -----------------------------------------
    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def audit_count(self) -> int:
        return int(self._query("SELECT count(*) FROM audit")[0][0])

    def last_audit(self) -> dict[str, Any]:
        import json

        return dict(json.loads(self._query(
            "SELECT record FROM audit ORDER BY seq DESC LIMIT 1")[0][0]))

    def state(self) -> list[tuple[Any, ...]]:
        """Models and key versions: what a refused request must leave unchanged."""
        return self._query("SELECT * FROM models ORDER BY model_id") + \
            self._query("SELECT * FROM key_versions ORDER BY model_id, version")

    # --- low-level protocol steps --------------------------------------------------------
    def challenge(self, http: httpx.Client, tee: str = "sim") -> bytes:
        import base64

        r = http.post("/v1/attest/challenge", json={"tee": tee})
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["nonce"])

    def attest_body(self, nonce: bytes, public_key: bytes, *,
                    bind_key: bytes | None = None, attester: SimAttester | None = None,
                    role: str = "runtime") -> dict[str, Any]:
        import base64

        rd = binding.report_data(nonce, bind_key or public_key)
        ev = (attester or self.attester()).evidence(rd)
        return {"nonce": base64.b64encode(nonce).decode(), "tee": "sim",
                "evidence": base64.b64encode(ev.data).decode(),
                "public_key": base64.b64encode(public_key).decode(), "role": role}


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyserver]:
    tmp = tmp_path_factory.mktemp("keyserver")
    clock = FakeClock()
    init = config.init_data_dir(tmp / "data", now=clock())
    platform = sim.init_platform(tmp / "sim")
    srv = server.BackgroundServer.start(init.config, clock=clock,
                                        trust_sim_roots=[tmp / "sim" / sim.PUB_FILE])
    try:
        yield Keyserver(srv.url, init, clock, platform, measure.measurement(b"keyserver-tests"),
                        srv, tmp)
    finally:
        srv.stop()


_ids = itertools.count()


@pytest.fixture
def model_id(request: pytest.FixtureRequest) -> str:
    """A model id unique to the test."""
    return f"{request.node.name[:80]}-{next(_ids)}".replace("[", "-").replace("]", "")


# --- PostgreSQL (the local server: 127.0.0.1:5432, trust auth, database "test") ---------

PG_BASE = os.environ.get("SEALEDTORCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(PG_BASE, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def pg_base() -> str:
    """The test database's URL.  Starts the local cluster if it is installed but down;
    fails (never skips) when PostgreSQL cannot be had: these tests are the only check of
    the replicated store."""
    if not _pg_reachable():
        clusters = Path("/etc/postgresql")
        if clusters.is_dir():
            for version in sorted(p.name for p in clusters.iterdir()):
                subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main",
                                "start"], check=False, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while not _pg_reachable():
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL is not reachable at {PG_BASE} (set "
                            f"SEALEDTORCH_TEST_PG to another test database)")
            time.sleep(0.5)
    return PG_BASE


@pytest.fixture
def pg_url(pg_base: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped after the test."""
    import psycopg

    schema = f"st_test_{os.getpid()}_{next(_ids)}_{os.urandom(3).hex()}"
    with psycopg.connect(pg_base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_base else "?"
    try:
        yield f"{pg_base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(pg_base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def schema_of(url: str) -> str:
    return url.rsplit("search_path%3D", 1)[1]


def wait_ready(url: str, ca: Path, proc: subprocess.Popen | None = None,
               timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"keyserver exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", verify=client_context(ca), timeout=2).status_code \
                    == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("keyserver did not become ready")


def start_keyserver(data: Path, sim_pub: Path, log: Any, *, database: str | None = None,
                    port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`sealedtorch keyserver run` as a real process; returns it and its URL (not waited)."""
    port = port or server.free_port()
    cmd = [sys.executable, "-m", "sealedtorch.cli", "keyserver", "run", "--data", str(data),
           "--listen", f"127.0.0.1:{port}", "--trust-sim-root", str(sim_pub)]
    if database:
        cmd += ["--database", database]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    return proc, f"https://127.0.0.1:{port}"


def start_replicas(procs: list[subprocess.Popen], data: Path, sim_pub: Path, log: Any, *,
                   database: str, ca: Path, count: int = 2) -> list[str]:
    """``count`` keyserver processes on one database, appended to ``procs`` as they start
    (so the caller's cleanup stops them even if a later one fails); returns their URLs once
    every one is ready."""
    urls = []
    for _ in range(count):
        proc, url = start_keyserver(data, sim_pub, log, database=database)
        procs.append(proc)
        urls.append(url)
    for proc, url in zip(procs[-count:], urls, strict=True):
        wait_ready(url, ca, proc)
    return urls


def disable_rate_limit(data: Path) -> None:
    import json

    path = data / "keyserver.json"
    settings = json.loads(path.read_text())
    settings["rate_limit"] = None
    path.write_text(json.dumps(settings))


def _encodings(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode(),
            base64.b64encode(secret), base64.b64encode(secret).rstrip(b"="),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]


def assert_no_plaintext_keys(keys: list[ModelKey], pg_url: str | None, data_dir: Path,
                              log_path: Path) -> None:
    """No model key, raw or encoded, in a dump of the schema, any file under the data
    directory, or the servers' logs."""
    blobs: dict[str, bytes] = {}
    if pg_url is not None:
        dump = subprocess.run(["pg_dump", "--no-owner", "-n", schema_of(pg_url),
                               PG_BASE], capture_output=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert b"audit" in dump.stdout and len(dump.stdout) > 10_000
        blobs["pg_dump"] = dump.stdout
    for path in data_dir.rglob("*"):
        if path.is_file():
            blobs[str(path)] = path.read_bytes()
    blobs["log"] = log_path.read_bytes()
    assert len(blobs["log"]) > 1000
    for key in keys:
        for enc in _encodings(key.secret):
            for where, blob in blobs.items():
                assert enc not in blob, f"model key {key.model_id} found in {where}"
