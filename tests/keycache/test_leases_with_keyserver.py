"""Leases and revocation with real processes: `sealedtorch keyserver run`, `sealedtorch
keycache run` (behind a TCP proxy the test can cut) and `sealedtorch serve`.

- network cut → the keycache stops serving at lease end (not at max-stale);
- explicit refusal by the keyserver → every key wiped at once (long before lease end);
- revocation → a running runtime stops serving within the bound (refresh + key watch);
- rotation → the served version changes with no failed request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tcp_proxy import Proxy
from waiting import wait_for as _wait

import sealedtorch
from sealedtorch import cli
from sealedtorch.attest import measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import KeyUnavailable, LeaseExpired
from sealedtorch.keycache import KeycacheClient, KeysStale
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver.client import AdminClient
from sealedtorch.keyserver.config import CONFIG_FILE
from sealedtorch.keyserver.server import free_port
from sealedtorch.keyserver.tls import client_context
from sealedtorch.runtime.architectures import mlp
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.server import SubprocessServer

from .conftest import RUNTIME_MEASUREMENT, keycache_rules

pytestmark = pytest.mark.slow

KEYCACHE_CONFIG = b"lease-e2e: holder configuration"
HOLDER_MEASUREMENT = measure.measurement(KEYCACHE_CONFIG)
#: CPU slack on a contended 2-core machine: added to every bound, never a timing claim.
SLACK = 4.0


@dataclass
class Site:
    """A keyserver process (the owner's site) and keycache processes (the TEE host)."""

    tmp: Path
    short: Path
    data: Path
    platform: sim.SimPlatform
    port: int
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    proxy: Proxy | None = None
    keyserver: subprocess.Popen[str] | None = None
    keycache: subprocess.Popen[str] | None = None
    stderr: dict[int, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.data / "tls" / "ca.pem"

    def start(self, *args: str) -> subprocess.Popen[str]:
        # Output goes to files, not pipes: nobody reads a pipe while the test runs, and a
        # service whose pipe is full blocks on its next log line (and stops answering).
        err = self.tmp / f"proc-{len(self.procs)}.err"
        with err.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "sealedtorch.cli", *args],
                                    stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        self.procs.append(proc)
        self.stderr[proc.pid] = err
        return proc

    def errors(self, proc: subprocess.Popen[str]) -> str:
        """Everything ``proc`` wrote to stderr so far."""
        return self.stderr[proc.pid].read_text()

    def start_keyserver(self, trust_root: Path | None = None) -> None:
        root = trust_root or self.platform.directory / sim.PUB_FILE
        proc = self.start("keyserver", "run", "--data", str(self.data), "--listen",
                          f"127.0.0.1:{self.port}", "--trust-sim-root", str(root))
        _wait(lambda: proc.poll() is None and httpx.get(
            self.url + "/readyz", verify=client_context(self.ca), timeout=1).status_code
            == 200, 30, "keyserver ready")
        self.keyserver = proc

    def stop_keyserver(self) -> None:
        assert self.keyserver is not None
        self.keyserver.send_signal(signal.SIGKILL)
        self.keyserver.wait(timeout=10)

    def admin(self) -> AdminClient:
        return AdminClient.from_token_file(self.url, self.ca, self.data / "admin-token")

    def register(self, key: ModelKey, *, allow: bytes = RUNTIME_MEASUREMENT,
                 lease_seconds: int) -> None:
        with self.admin() as admin:
            admin.register(key, {"allow": [{"tee": "sim", "measurement": allow.hex()}],
                                 "holders": [{"tee": "sim",
                                              "measurement": HOLDER_MEASUREMENT.hex()}],
                                 "lease_seconds": lease_seconds})

    @property
    def socket(self) -> Path:
        return self.short / "run" / "keycache.sock"

    def start_keycache(self, *, refresh: str, max_stale: str = "1h",
                       via_proxy: bool = False) -> None:
        target = self.url
        if via_proxy:
            self.proxy = Proxy(("127.0.0.1", self.port))
            target = f"https://127.0.0.1:{self.proxy.port}"
        (self.tmp / "kc.conf").write_bytes(KEYCACHE_CONFIG)
        self.keycache = self.start(
            "keycache", "run", "--keyserver", target, "--ca", str(self.ca), "--socket",
            str(self.socket), "--tee", "sim", "--sim-platform", str(self.platform.directory),
            "--runtime-config", str(self.tmp / "kc.conf"), "--refresh", refresh,
            "--max-stale", max_stale, "--log-format", "json")

    @property
    def keycache_rules(self) -> tuple[Any, ...]:
        """The `keycache` rule runtimes are measured with: the `keycache run` process (its
        measurement covers KEYCACHE_CONFIG) on this host's sim platform."""
        return keycache_rules(self.platform, HOLDER_MEASUREMENT)

    def client(self, measurement: bytes = RUNTIME_MEASUREMENT) -> KeycacheClient:
        return KeycacheClient(self.socket, attester=SimAttester(self.platform, measurement),
                              keycache_rules=self.keycache_rules)

    def wait_serving(self, client: KeycacheClient) -> None:
        def serving() -> bool:
            assert self.keycache is not None
            assert self.keycache.poll() is None, self.errors(self.keycache)
            return bool(self.socket.exists() and client.status()["serving"])

        _wait(serving, 30, "keycache serving")

    def keycache_log(self) -> list[dict[str, Any]]:
        assert self.keycache is not None
        self.keycache.send_signal(signal.SIGTERM)
        self.keycache.wait(timeout=30)
        err = self.errors(self.keycache)
        return [json.loads(line) for line in err.splitlines() if line.startswith("{")]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.cut()


@pytest.fixture
def site(tmp_path: Path, short_dir: Path, capsys: pytest.CaptureFixture[str]
         ) -> Iterator[Site]:
    data = tmp_path / "ks"
    assert cli.main(["keyserver", "init", "--data", str(data)]) == 0
    capsys.readouterr()
    s = Site(tmp_path, short_dir, data, sim.init_platform(tmp_path / "sim"), free_port())
    try:
        yield s
    finally:
        s.stop_all()


def _set_token_ttl(site: Site, seconds: int) -> None:
    settings = json.loads((site.data / CONFIG_FILE).read_text())
    settings["token_ttl"] = seconds
    (site.data / CONFIG_FILE).write_text(json.dumps(settings))


# --- the keycache -----------------------------------------------------------------------------

def test_a_cut_network_stops_the_keycache_at_lease_end_not_at_max_stale(site):
    lease = 6  # renewed every 4 s: room for a slow refresh on a loaded machine
    site.start_keyserver()
    key = ModelKey.generate("lease/cut")
    site.register(key, lease_seconds=lease)
    site.start_keycache(refresh="60s", max_stale="1h", via_proxy=True)
    client = site.client()
    site.wait_serving(client)
    _wait(lambda: client.get_key("lease/cut") == key, 30, "the key served")
    (held,) = client.status()["keys"]
    assert 0 < held["lease_left_s"] <= lease and held["lease_id"]
    time.sleep(lease + 1)  # past the first lease: renewed before it ended (refresh is 60 s)
    assert client.get_key("lease/cut") == key

    assert site.proxy is not None
    site.proxy.cut()
    cut_at = time.monotonic()

    def stopped() -> bool:
        try:
            client.get_key("lease/cut")
        except LeaseExpired:
            return True
        return False

    _wait(stopped, lease + 30, "the keycache to stop at lease end", step=0.1)
    # the last renewal was sent before the cut, so the lease ended within `lease` of it
    assert time.monotonic() - cut_at <= lease + SLACK
    st = client.status()
    assert st["keys"] == [] and st["stale"] is False  # the lease stopped it, not max-stale
    assert st["refresh"]["lease_expiries"] >= 1 and st["keyserver_reachable"] is False

    site.proxy.restore()
    _wait(lambda: client.get_key("lease/cut") == key, 30, "service after the network is back")
    client.close()
    logs = site.keycache_log()
    assert any("lease on lease/cut version 1 ended" in r["message"] for r in logs)
    assert all(key.secret.hex() not in json.dumps(r) for r in logs)


def test_an_explicit_refusal_by_the_keyserver_wipes_every_key_at_once(site, tmp_path):
    lease = 600
    _set_token_ttl(site, 12)  # the keycache re-attests every ~2 s (tokens renew 10 s early)
    site.start_keyserver()
    key = ModelKey.generate("lease/refused")
    site.register(key, lease_seconds=lease)
    site.start_keycache(refresh="0.5s", max_stale="1h")
    client = site.client()
    site.wait_serving(client)
    assert client.get_key("lease/refused") == key

    # the keyserver now trusts another sim platform: this keycache's evidence is refused
    site.stop_keyserver()
    other = sim.init_platform(tmp_path / "other-sim")
    site.start_keyserver(trust_root=other.directory / sim.PUB_FILE)
    restarted = time.monotonic()

    def refused() -> KeyUnavailable | None:
        try:
            client.get_key("lease/refused")
        except KeyUnavailable as exc:
            if "refused" in str(exc):
                return exc
        return None

    exc = _wait(refused, 60, "the keycache to wipe its keys after the refusal", step=0.1)
    assert not isinstance(exc, LeaseExpired | KeysStale) and "AttestationError" in str(exc)
    assert time.monotonic() - restarted < lease / 10  # at once, not at lease end
    st = client.status()
    assert st["keys"] == [] and st["serving"] is False
    assert st["refresh"]["refused"].startswith("AttestationError")
    client.close()
    logs = site.keycache_log()
    assert any("wiped 1 key(s) at once" in r["message"] for r in logs)


# --- a running runtime ---------------------------------------------------------------------

WATCH = 0.5
REFRESH = 0.5
MLP_ARCH = "sealedtorch.runtime.architectures:mlp"
MLP_KWARGS = {"in_features": 4, "out_features": 3, "hidden": [8]}


def _runtime_config(site: Site) -> RuntimeConfig:
    """The served runtime's configuration; its `keycache` rule names the site's keycache, so
    the runtime (loads and key-watch re-checks) takes keys only from that keycache."""
    return RuntimeConfig(key_watch_s=WATCH, key_watch_grace_s=5, key_retries=2,
                         key_retry_delay_s=0.05, keycache=site.keycache_rules)


def _seal(module: torch.nn.Module, key: ModelKey, path: Path) -> None:
    tmp = path.with_name(path.name + f".v{key.version}")
    sealedtorch.seal(module, tmp, key=key, metadata={"arch": MLP_ARCH,
                                                     "arch_kwargs": MLP_KWARGS})
    os.replace(tmp, path)  # how a host puts a new version in place: one atomic rename


def _serve(site: Site, model_path: Path, config: RuntimeConfig) -> SubprocessServer:
    cfg = site.tmp / "runtime.json"
    cfg.write_bytes(config.canonical_bytes())
    return SubprocessServer.start(
        ["--model", f"tiny={model_path}", "--keycache", str(site.socket), "--listen",
         "127.0.0.1:0", "--tee", "sim", "--sim-platform", str(site.platform.directory),
         "--config", str(cfg)])


def _infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                        "data": [0.1, 0.2, 0.3, 0.4]}]}


def _running(site: Site, lease: int) -> tuple[ModelKey, torch.nn.Module, Path,
                                               SubprocessServer, httpx.Client]:
    config = _runtime_config(site)
    site.start_keyserver()
    key = ModelKey.generate("lease/tiny")
    site.register(key, allow=runtime_measurement(config), lease_seconds=lease)
    torch.manual_seed(0)
    module = mlp(**MLP_KWARGS).eval()
    path = site.tmp / "tiny.sealed"
    _seal(module, key, path)
    site.start_keycache(refresh=f"{REFRESH}s")
    with site.client(runtime_measurement(config)) as probe:
        site.wait_serving(probe)
    srv = _serve(site, path, config)
    http = httpx.Client(base_url=srv.url, verify=False, timeout=60)
    _wait(lambda: http.get("/v2/health/ready").status_code == 200, 90,
          "runtime ready", step=0.2)
    return key, module, path, srv, http


def test_a_revoked_key_stops_the_running_runtime_within_the_bound(site):
    key, _module, _path, srv, http = _running(site, lease=30)
    with srv:
        assert http.post("/v2/models/tiny/infer", json=_infer_body()).status_code == 200
        with site.admin() as admin:
            admin.revoke(key.model_id, reason="compromised host")
        revoked_at = time.monotonic()
        _wait(lambda: http.get("/v2/models/tiny/ready").status_code == 503, 60,
              "the runtime to unload the revoked model", step=0.1)
        # bound: one keycache refresh + one watch interval (+ CPU slack)
        assert time.monotonic() - revoked_at <= REFRESH + WATCH + SLACK
        ready = http.get("/v2/models/tiny/ready").json()
        assert ready["ready"] is False and ready["state"] == "unloaded"
        r = http.post("/v2/models/tiny/infer", json=_infer_body())
        assert r.status_code == 503
        assert "was unloaded: the keycache no longer holds its key" in r.json()["error"]
        assert http.get("/v2/health/ready").status_code == 503
        metrics = http.get("/metrics").text
        assert 'sealedtorch_runtime_model_unloads_total{model="tiny",reason="KeyUnavailable"} 1' \
            in metrics
        assert 'sealedtorch_runtime_model_ready{model="tiny"} 0' in metrics
        http.close()
    records = [json.loads(line) for line in srv.log_text().splitlines()
               if line.startswith("{")]
    assert any(r.get("event") == "model_unload" and r.get("key_version") == 1
               for r in records)
    assert key.secret.hex() not in srv.log_text()


def test_rotation_changes_the_served_version_with_no_failed_request(site):
    key, module, path, srv, http = _running(site, lease=30)
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=srv.url, verify=False, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v2/models/tiny/infer", json=_infer_body())
                results.append((r.status_code, r.json().get("model_version")
                                if r.status_code == 200 else r.text))

    with srv:
        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        _wait(lambda: len(results) >= 5, 30, "traffic flowing")
        with site.admin() as admin:
            version, key2 = admin.rotate(key.model_id)
        assert version == 2 and key2 is not None
        _seal(module, key2, path)  # the host puts the version-2 file at the configured path
        _wait(lambda: http.get("/v2/models/tiny").json()["parameters"]["key_version"] == 2,
              60, "key version 2 served", step=0.1)
        with site.admin() as admin:  # the old version can go now: nothing serves it
            admin.revoke(key.model_id, version=1, reason="rotated")
        n = len(results)
        _wait(lambda: len(results) >= n + 5, 30, "traffic after revoking version 1")
        stop.set()
        sender.join(timeout=60)
        # the KServe version is the serving version: clients of versions/1 keep working
        assert http.get("/v2/models/tiny").json()["versions"] == ["1"]
        metrics = http.get("/metrics").text
        http.close()
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    assert {v for _, v in results} == {"1"}
    assert 'sealedtorch_runtime_model_reloads_total{model="tiny",outcome="ok"} 1' in metrics
    records = [json.loads(line) for line in srv.log_text().splitlines()
               if line.startswith("{")]
    assert any(r.get("event") == "model_reload" and r.get("key_version") == 2
               and r.get("previous_version") == 1 for r in records)
