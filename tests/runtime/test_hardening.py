"""The runtime resists the host and its users: a hardened serve process, large bodies with
bounded memory, attestation evidence under its own domain label with a rate limit, and the
origin of the TLS key inside what the TEE signs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from sealedtorch import crypto
from sealedtorch.attest import VerifierConfig, binding, verify
from sealedtorch.attest.policy import load_policy
from sealedtorch.attest.sim import load_platform_keys
from sealedtorch.errors import BindingError, PolicyDenied
from sealedtorch.format import seal
from sealedtorch.keys import ModelKey
from sealedtorch.runtime.architectures import mlp
from sealedtorch.runtime.attestation import (
    ATTESTATION_BURST,
    RateLimiter,
    attestation_domain,
    encode_nonce,
    verify_document,
)
from sealedtorch.runtime.client import AttestedClient
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.tls import peer_spki

from .conftest import trusting_keycache_socket

MLP_ARCH = "sealedtorch.runtime.architectures:mlp"
WIDE = 1 << 20          # input features of the wide model (one row of JSON is ~4 MiB)
ROWS = 15               # 15 rows of "0.5," ~ 60 MiB of JSON: just under max_request_bytes
#: Peak RSS growth allowed for four concurrent ~60 MiB JSON bodies (docs/runtime.md).
RSS_BUDGET_MIB = 512


def _allow(config: RuntimeConfig) -> Any:
    return load_policy({"allow": [{"tee": "sim",
                                   "measurement": runtime_measurement(config).hex()}]})


def _serve_args(tmp: Path, sim_dir: Path, model: Path, sock: Path, config: RuntimeConfig,
                name: str = "tiny") -> list[str]:
    cfg = tmp / "runtime.json"
    cfg.write_bytes(config.canonical_bytes())
    return ["serve", "--model", f"{name}={model}", "--keycache", str(sock),
            "--listen", "127.0.0.1:0", "--tee", "sim", "--sim-platform", str(sim_dir),
            "--config", str(cfg)]


class ServeProcess:
    """``sealedtorch serve`` in a child whose own thread reports, once it listens, what
    the kernel says about it (PR_GET_DUMPABLE, RLIMIT_CORE): the keycache test's method,
    on the real serve code path."""

    _WRAPPER = textwrap.dedent("""
        import ctypes, json, os, resource, sys, threading, time
        from pathlib import Path
        announce, report = Path(sys.argv[1]), Path(sys.argv[2])
        def watch():
            while not announce.exists():
                time.sleep(0.02)
            libc = ctypes.CDLL(None)
            report.write_text(json.dumps({"dumpable": libc.prctl(3, 0, 0, 0, 0),
                                          "core": list(resource.getrlimit(resource.RLIMIT_CORE))}))
        threading.Thread(target=watch, daemon=True).start()
        from sealedtorch.cli import main
        raise SystemExit(main(sys.argv[3:] + ["--announce", str(announce)]))
    """)

    def __init__(self, args: list[str]) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="serve-hard-"))
        self.announce = self.work / "announce.json"
        self.report = self.work / "report.json"
        self.log = (self.work / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", self._WRAPPER, str(self.announce), str(self.report),
             *args], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.report.exists():
            assert self.process.poll() is None, self.log_text()
            assert time.monotonic() < deadline, self.log_text()
            time.sleep(0.05)
        self.url = json.loads(self.announce.read_text())["url"]

    def log_text(self) -> str:
        return (self.work / "serve.log").read_text(errors="replace")

    def status(self, field: str) -> int:
        """A ``kB`` field of /proc/PID/status, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"{field} not in /proc/{self.process.pid}/status")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def serve_process() -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(args: list[str]) -> ServeProcess:
        proc = ServeProcess(args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, verify=False, timeout=30) as http:
        while http.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)


# --- process hardening ------------------------------------------------------------------

@pytest.mark.slow
def test_the_serve_process_is_not_dumpable_and_writes_no_core_files(
        keycache_socket, tiny, sim_dir, tmp_path, serve_process):
    config = trusting_keycache_socket(sim_dir)
    sock = keycache_socket([(tiny.key, _allow(config))])
    proc = serve_process(_serve_args(tmp_path, sim_dir, tiny.path, sock, config))
    report = json.loads(proc.report.read_text())
    assert report == {"dumpable": 0, "core": [0, 0]}
    limits = Path(f"/proc/{proc.process.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    records = [json.loads(line) for line in proc.log_text().splitlines()
               if line.startswith("{")]
    listening = next(r for r in records if r["message"].startswith("runtime listening"))
    assert listening["hardened"] is True


# --- large bodies -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, ModelKey]:
    """A sealed MLP taking rows of 2**20 features (4 MiB of weights)."""
    torch.manual_seed(0)
    module = mlp(in_features=WIDE, out_features=1).eval()
    key = ModelKey.generate("wide-mlp")
    path = tmp_path_factory.mktemp("wide") / "wide.sealed"
    seal(module, path, key=key, metadata={
        "arch": MLP_ARCH, "arch_kwargs": {"in_features": WIDE, "out_features": 1}})
    return path, key


def _big_json(rows: int) -> bytes:
    data = b"0.5," * (rows * WIDE)
    return (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[%d,%d],"data":['
            % (rows, WIDE)) + data[:-1] + b"]}]}"


@pytest.mark.slow
def test_four_concurrent_64_mib_json_bodies_stay_within_the_memory_budget(
        keycache_socket, wide, sim_dir, tmp_path, serve_process):
    path, key = wide
    config = trusting_keycache_socket(sim_dir)
    sock = keycache_socket([(key, _allow(config))])
    proc = serve_process(_serve_args(tmp_path, sim_dir, path, sock, config, name="wide"))
    _wait_ready(proc.url)
    body = _big_json(ROWS)
    assert 56 << 20 < len(body) <= config.max_request_bytes
    with httpx.Client(base_url=proc.url, verify=False, timeout=300) as http:  # warm up
        small = http.post("/v2/models/wide/infer", content=_big_json(1))
        assert small.status_code == 200, small.text
    before = proc.status("VmRSS")
    results: list[int] = []

    def send() -> None:
        with httpx.Client(base_url=proc.url, verify=False, timeout=600) as http:
            results.append(http.post("/v2/models/wide/infer", content=body,
                                     headers={"content-type": "application/json"}
                                     ).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    growth = proc.status("VmHWM") - before
    assert results == [200, 200, 200, 200]
    assert growth < RSS_BUDGET_MIB << 20, f"peak RSS grew by {growth >> 20} MiB"


# --- attestation: own domain label, rate limit, TLS key origin ---------------------------

def _fetch_document(url: str) -> tuple[dict[str, Any], bytes, bytes]:
    """(document, nonce, the SPKI of the connection that answered)."""
    from sealedtorch.runtime.tls import capture_context

    nonce = crypto.random_bytes(32)
    with httpx.Client(verify=capture_context(), timeout=30) as http:
        r = http.get(f"{url}/v1/attestation", params={"nonce": encode_nonce(nonce)})
        ssl_object = r.extensions["network_stream"].get_extra_info("ssl_object")
        assert r.status_code == 200, r.text
        return r.json(), nonce, peer_spki(ssl_object)


def _evidence_claims(doc: dict[str, Any], sim_dir: Path) -> Any:
    from sealedtorch.attest import Evidence, Tee

    ev = doc["evidence"]
    evidence = Evidence(Tee(ev["tee"]), base64.b64decode(ev["evidence"]),
                        base64.b64decode(ev["collateral"]) if ev.get("collateral") else None,
                        base64.b64decode(ev["certificates"]) if ev.get("certificates")
                        else None)
    return verify(evidence, config=VerifierConfig(
        sim_platform_keys=load_platform_keys([sim_dir / "platform.pub"])))


def test_attestation_evidence_is_bound_under_its_own_domain_label(start_server, tiny,
                                                                  tiny_source, sim_dir):
    srv = start_server([tiny_source], keys=tiny.keys)
    doc, nonce, spki = _fetch_document(srv.url)
    claims = _evidence_claims(doc, sim_dir)
    assert doc["tls_key_origin"] == "ephemeral"
    binding.check(claims.report_data, nonce, spki, domain=attestation_domain("ephemeral"))
    with pytest.raises(BindingError):  # never usable as key-release evidence
        binding.check(claims.report_data, nonce, spki)
    with pytest.raises(BindingError):
        binding.check(claims.report_data, nonce, spki, domain=attestation_domain("file"))


def test_attestation_is_rate_limited_per_client_with_retry_after(start_server, tiny,
                                                                 tiny_source, raw_client):
    srv = start_server([tiny_source], keys=tiny.keys)
    http = raw_client(srv.url)
    codes, limited = [], None
    for _ in range(ATTESTATION_BURST * 4):
        r = http.get("/v1/attestation", params={"nonce": "00" * 32})
        codes.append(r.status_code)
        if r.status_code == 429:
            limited = r
            break
    assert codes[:ATTESTATION_BURST] == [200] * ATTESTATION_BURST
    assert limited is not None, codes
    assert int(limited.headers["retry-after"]) >= 1
    assert "too many attestation requests" in limited.json()["error"]
    assert http.get("/v2/health/ready").status_code == 200  # only attestation is limited


def test_the_rate_limiter_refills_and_forgets_old_clients():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, max_clients=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    limiter.take("c")  # a third client: the least recently seen ("b") is forgotten
    assert set(limiter._buckets) == {"a", "c"}


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path]:
    ca_cert, ca_key = crypto.generate_tls_ca("test ca", days=1)
    cert, key = crypto.issue_tls_server_cert(ca_cert, ca_key, common_name="host",
                                             dns_names=("localhost",),
                                             ip_addresses=("127.0.0.1",), days=1)
    (tmp_path / "cert.pem").write_bytes(cert)
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(key)
    key_path.chmod(0o600)
    return tmp_path / "cert.pem", key_path


def test_a_client_refuses_a_runtime_whose_tls_key_came_from_a_file(
        start_server, tiny, tiny_source, sim_dir, tls_files, policy_for):
    cert, key = tls_files
    srv = start_server([tiny_source], keys=tiny.keys, tls_cert=cert, tls_key=key)
    with AttestedClient(srv.url, policy=policy_for(), sim_roots=[sim_dir / "platform.pub"]
                        ) as client:
        with pytest.raises(PolicyDenied, match="loaded from a file"):
            client.attest()


def test_a_client_may_explicitly_accept_a_file_tls_key(start_server, tiny, tiny_source,
                                                       sim_dir, tls_files, policy_for):
    cert, key = tls_files
    srv = start_server([tiny_source], keys=tiny.keys, tls_cert=cert, tls_key=key)
    with AttestedClient(srv.url, policy=policy_for(), sim_roots=[sim_dir / "platform.pub"],
                        allow_file_tls_key=True) as client:
        x = torch.randn(2, 4)
        with torch.inference_mode():
            assert torch.equal(client.infer("tiny", x)["output"], tiny.module(x))


def test_a_host_cannot_present_a_file_tls_key_as_ephemeral(start_server, tiny, tiny_source,
                                                           sim_dir, tls_files, policy_for):
    """The host holds the key file, terminates TLS itself and edits the document: the
    origin is inside the report_data, so the lie breaks the binding."""
    cert, key = tls_files
    srv = start_server([tiny_source], keys=tiny.keys, tls_cert=cert, tls_key=key)
    doc, nonce, spki = _fetch_document(srv.url)
    assert doc["tls_key_origin"] == "file"
    doc["tls_key_origin"] = "ephemeral"
    with pytest.raises(BindingError):
        verify_document(doc, nonce=nonce, connection_spki=spki,
                        policy=load_policy(policy_for()),
                        verifier=VerifierConfig(sim_platform_keys=load_platform_keys(
                            [sim_dir / "platform.pub"])))


def test_cli_client_infer_refuses_a_file_tls_key_unless_allowed(
        start_server, tiny, tiny_source, sim_dir, tls_files, policy_for, tmp_path, capsys):
    import numpy as np

    from sealedtorch.cli import main

    cert, key = tls_files
    srv = start_server([tiny_source], keys=tiny.keys, tls_cert=cert, tls_key=key)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(policy_for()))
    np.save(tmp_path / "x.npy", np.zeros((2, 4), dtype=np.float32))
    args = ["client", "infer", "--url", srv.url, "--policy", str(policy), "--model", "tiny",
            "--input", str(tmp_path / "x.npy"), "--sim-root", str(sim_dir / "platform.pub")]
    assert main(args) == 1
    assert "TLS key was loaded from a file" in capsys.readouterr().err
    assert main([*args, "--allow-file-tls-key"]) == 0
    printed = json.loads(capsys.readouterr().out)["outputs"]  # KServe layout: a list
    assert [(o["name"], o["shape"]) for o in printed] == [("output", [2, 3])]


def _slow_upload(url: str, path: str, length: int) -> Any:
    """A TLS connection that sends the headers and the first bytes of a ``length``-byte
    body, then stalls (the caller closes it)."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = ctx.wrap_socket(socket.create_connection((parts.hostname, parts.port), timeout=30))
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {length}\r\n\r\n".encode() + b"{")
    return conn


def test_large_bodies_in_flight_are_bounded_and_small_requests_still_pass(
        start_server, recorder, raw_client, body):
    limit = 2 << 20
    config = RuntimeConfig(max_request_bytes=limit, request_timeout_s=1.0)
    srv = start_server([recorder()], config=config)
    stalled = [_slow_upload(srv.url, "/v2/models/rec/infer", limit) for _ in range(2)]
    try:
        http = raw_client(srv.url)
        deadline = time.monotonic() + 60
        while True:  # until both stalled uploads hold their reservations (2 x the limit)
            third = http.post("/v2/models/rec/infer", content=b"{" + b" " * (limit - 1))
            if third.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "bytes of request bodies are in flight" in third.json()["error"]
        small = http.post("/v2/models/rec/infer", json=body([[1.0, 2.0]]))
        assert small.status_code == 200
    finally:
        for conn in stalled:
            conn.close()
