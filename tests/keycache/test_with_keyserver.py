"""The keycache against the real keyserver, both as real processes (`sealedtorch keyserver
run`, `sealedtorch keycache run`), with the test as model owner and as runtime.

One scenario, in order (each step depends on the state the previous one left):
start → serve → rotation picked up → revocation gone within a refresh → a runtime the policy
does not allow → keyserver killed: keys still served, then refused after max-stale →
keyserver back: served again → keycache restarted: attests again, serves again.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from waiting import wait_for as _wait

import sealedtorch
from sealedtorch import cli
from sealedtorch.attest import measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import KeyUnavailable, PolicyDenied
from sealedtorch.keycache import KeycacheClient, KeysStale
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver.client import AdminClient
from sealedtorch.keyserver.config import CONFIG_FILE
from sealedtorch.keyserver.server import free_port
from sealedtorch.keyserver.tls import client_context

from .conftest import OTHER_MEASUREMENT, RUNTIME_MEASUREMENT, keycache_rules

KEYCACHE_CONFIG = b"keycache-e2e: holder configuration"
REFRESH = 0.3
MAX_STALE = 4.0

pytestmark = pytest.mark.slow


class Procs:
    def __init__(self, logs: Path) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.logs = logs
        self._stderr: dict[int, Path] = {}

    def start(self, *args: str) -> subprocess.Popen[str]:
        # Output goes to files, not pipes: nobody reads a pipe while the test runs, and a
        # service whose pipe is full blocks on its next log line (and stops answering).
        err = self.logs / f"proc-{len(self.procs)}.err"
        with err.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "sealedtorch.cli", *args],
                                    stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        self.procs.append(proc)
        self._stderr[proc.pid] = err
        return proc

    def errors(self, proc: subprocess.Popen[str]) -> str:
        """Everything ``proc`` wrote to stderr so far."""
        return self._stderr[proc.pid].read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path_factory):
    p = Procs(tmp_path_factory.mktemp("logs"))
    try:
        yield p
    finally:
        p.stop_all()


def _holder_attests(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT record FROM audit").fetchall()
    finally:
        conn.close()
    records = [json.loads(r[0]) for r in rows]
    return sum(1 for r in records if r.get("event") == "attest" and r.get("role") == "holder"
               and r.get("decision", "allow") != "deny")


def test_keycache_with_a_real_keyserver(tmp_path, short_dir, procs, capsys):
    # --- the keyserver (owner's site) ----------------------------------------------------
    data = tmp_path / "ks"
    assert cli.main(["keyserver", "init", "--data", str(data)]) == 0
    settings = json.loads((data / CONFIG_FILE).read_text())
    settings["token_ttl"] = 12  # tokens end every ~2 s (clients renew 10 s early)
    (data / CONFIG_FILE).write_text(json.dumps(settings))
    capsys.readouterr()
    platform = sim.init_platform(tmp_path / "sim")
    ca = data / "tls" / "ca.pem"
    port = free_port()
    url = f"https://127.0.0.1:{port}"

    def start_keyserver() -> subprocess.Popen[str]:
        proc = procs.start("keyserver", "run", "--data", str(data), "--listen",
                           f"127.0.0.1:{port}", "--trust-sim-root",
                           str(platform.directory / sim.PUB_FILE))
        _wait(lambda: proc.poll() is None and httpx.get(
            url + "/readyz", verify=client_context(ca), timeout=1).status_code == 200,
            20, "keyserver ready")
        return proc

    keyserver = start_keyserver()
    holder_m = measure.measurement(KEYCACHE_CONFIG)
    policy = {"allow": [{"tee": "sim", "measurement": RUNTIME_MEASUREMENT.hex()}],
              "holders": [{"tee": "sim", "measurement": holder_m.hex()}]}
    key_a, key_b = ModelKey.generate("e2e/alpha"), ModelKey.generate("e2e/beta")
    hidden = ModelKey.generate("e2e/hidden")
    with AdminClient.from_token_file(url, ca, data / "admin-token") as admin:
        admin.register(key_a, policy)
        admin.register(key_b, policy)
        # holders default to allow rules, which this keycache does not match: never released
        admin.register(hidden, {"allow": [{"tee": "sim",
                                           "measurement": OTHER_MEASUREMENT.hex()}]})

    # --- the keycache (TEE host) -------------------------------------------------------------
    (tmp_path / "kc.conf").write_bytes(KEYCACHE_CONFIG)
    sock = short_dir / "run" / "keycache.sock"
    kc_args = ["keycache", "run", "--keyserver", url, "--ca", str(ca), "--socket", str(sock),
               "--tee", "sim", "--sim-platform", str(platform.directory),
               "--runtime-config", str(tmp_path / "kc.conf"), "--refresh", f"{REFRESH}s",
               "--max-stale", f"{MAX_STALE}s", "--log-format", "json"]
    keycache = procs.start(*kc_args)
    trusted = keycache_rules(platform, holder_m)  # the runtimes' measured keycache rule
    client = KeycacheClient(sock, attester=SimAttester(platform, RUNTIME_MEASUREMENT),
                            keycache_rules=trusted)

    def serving() -> bool:
        assert keycache.poll() is None, procs.errors(keycache)
        return bool(sock.exists() and client.status()["serving"])

    _wait(serving, 20, "keycache serving")
    assert oct(sock.stat().st_mode & 0o777) == oct(0o660)

    # --- a runtime loads a sealed model with keys from the keycache ---------------------------
    state = {"layer.weight": torch.randn(8, 8)}
    sealedtorch.seal(state, tmp_path / "alpha.sealed", key=key_a)
    loaded = sealedtorch.load_state_dict(tmp_path / "alpha.sealed", key=client)
    assert torch.equal(loaded["layer.weight"], state["layer.weight"])
    assert client.get_key("e2e/beta") == key_b
    with pytest.raises(KeyUnavailable, match="e2e/hidden"):
        client.get_key("e2e/hidden")
    st = client.status()
    assert sorted((k["model_id"], k["version"]) for k in st["keys"]) == \
        [("e2e/alpha", 1), ("e2e/beta", 1)]
    capsys.readouterr()
    assert cli.main(["keycache", "status", "--socket", str(sock)]) == 0
    out = capsys.readouterr().out
    assert f"keyserver: {url} (attestation token renews in" in out
    assert "e2e/alpha" in out and "e2e/beta" in out and key_a.secret.hex() not in out

    # --- rotation picked up, revocation gone within one refresh ----------------------------
    with AdminClient.from_token_file(url, ca, data / "admin-token") as admin:
        version, key_a2 = admin.rotate("e2e/alpha")
        assert version == 2 and key_a2 is not None
        _wait(lambda: client.get_key("e2e/alpha") == key_a2, 5, "rotated key served")
        assert client.get_key("e2e/alpha", 1) == key_a
        admin.revoke("e2e/beta", reason="test")
        revoked_at = time.monotonic()

    def beta_gone() -> bool:
        try:
            client.get_key("e2e/beta")
        except KeyUnavailable:
            return True
        return False

    _wait(beta_gone, 5, "revoked key dropped", step=0.02)
    assert time.monotonic() - revoked_at < REFRESH + 1.5  # one refresh (+ slack for 2 cores)

    # --- a runtime whose measurement the policy does not allow -------------------------------
    intruder = KeycacheClient(sock, attester=SimAttester(platform, OTHER_MEASUREMENT),
                            keycache_rules=trusted)
    with pytest.raises(PolicyDenied) as denied:
        intruder.get_key("e2e/alpha")
    assert any("measurement" in r for r in denied.value.reasons)

    # --- the token expires: the keycache attests again on its own ------------------------------
    db = data / "keyserver.db"
    before = _holder_attests(db)
    _wait(lambda: _holder_attests(db) > before, 10, "re-attestation after token expiry")

    # --- keyserver killed: keep serving, then refuse after max-stale ---------------------------
    keyserver.send_signal(signal.SIGKILL)
    keyserver.wait(timeout=10)
    killed_at = time.monotonic()
    assert client.get_key("e2e/alpha") == key_a2
    _wait(lambda: client.status()["keyserver_reachable"] is False, 5, "outage noticed")
    assert client.get_key("e2e/alpha") == key_a2  # still served during the outage
    assert client.status()["serving"] is True

    def refused() -> bool:
        try:
            client.get_key("e2e/alpha")
        except KeysStale:
            return True
        return False

    _wait(refused, MAX_STALE + 5, "refusal after max-stale", step=0.1)
    assert time.monotonic() - killed_at >= MAX_STALE - REFRESH - 0.5
    with pytest.raises(KeysStale, match="max-stale"):
        client.get_key("e2e/alpha")
    st = client.status()
    assert st["stale"] is True and st["keys"] == [] and st["refresh"]["last_error"]

    # --- keyserver back: refresh resumes --------------------------------------------------
    keyserver = start_keyserver()
    _wait(lambda: client.get_key("e2e/alpha") == key_a2, 10, "service resumed")
    assert client.status()["keyserver_reachable"] is True

    # --- keycache restarted: it attests again and serves again -----------------------------
    attests = _holder_attests(db)
    keycache.send_signal(signal.SIGTERM)
    keycache.wait(timeout=20)
    err = procs.errors(keycache)
    assert keycache.returncode == 0, err
    assert not sock.exists()
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("dropped e2e/beta version 1" in r["message"] for r in logs)
    assert any("refresh failed" in r["message"] for r in logs)
    assert any("released e2e/alpha" in r["message"] and f"pid={os.getpid()}" in r["message"]
               for r in logs)
    for k in (key_a, key_a2, key_b, hidden):
        assert k.secret.hex() not in err and base64.b64encode(k.secret).decode() not in err

    keycache = procs.start(*kc_args)
    fresh = KeycacheClient(sock, attester=SimAttester(platform, RUNTIME_MEASUREMENT),
                            keycache_rules=trusted)
    _wait(lambda: keycache.poll() is None and sock.exists() and fresh.status()["serving"],
          20, "keycache serving after restart")
    assert fresh.get_key("e2e/alpha") == key_a2
    assert _holder_attests(db) > attests
    # the old client's cached nonce died with the old process; it recovers by itself
    assert client.get_key("e2e/alpha") == key_a2
    for c in (client, fresh, intruder):
        c.close()
