"""The service commands against real processes: a `sealedtorch keyserver run` on 127.0.0.1
and `sealedtorch keycache run` on a real Unix socket (issue 12 §2 and §3): TLS mistakes
named as such, addresses in use refused before any work, scripts' --json, key rotation
from the CLI, private store files, fast shutdown, and who got which key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from waiting import wait_for as _wait

from sealedtorch.attest import measure, sim
from sealedtorch.cli import main
from sealedtorch.keyserver.server import free_port
from sealedtorch.keyserver.tls import client_context

from .test_cli_mistakes import one_error_line, run_cli

HOLDER_CONFIG = b"cli-services: keycache configuration"
RUNTIME_CONFIG = b"cli-services: runtime configuration"


@dataclass
class Ks:
    url: str
    port: int
    data: Path
    sim_dir: Path
    proc: subprocess.Popen[str]

    @property
    def ca(self) -> Path:
        return self.data / "tls" / "ca.pem"

    @property
    def token(self) -> Path:
        return self.data / "admin-token"

    def conn(self) -> list[str]:
        return ["--keyserver", self.url, "--ca", str(self.ca), "--token-file", str(self.token)]

    def audit(self) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self.data / 'keyserver.db'}?mode=ro", uri=True)
        try:
            return [json.loads(r[0]) for r in db.execute("SELECT record FROM audit")]
        finally:
            db.close()


def _start_keyserver(data: Path, sim_dir: Path, port: int, log: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sealedtorch.cli", "keyserver", "run", "--data", str(data),
         "--listen", f"127.0.0.1:{port}", "--trust-sim-root", str(sim_dir / sim.PUB_FILE),
         "--log-format", "text"], stdout=log, stderr=log, text=True)


def _ready(url: str, ca: Path, proc: subprocess.Popen[str]) -> None:
    def ok() -> bool:
        assert proc.poll() is None, f"keyserver exited with {proc.returncode}"
        return httpx.get(url + "/readyz", verify=client_context(ca), timeout=2).status_code \
            == 200

    _wait(ok, 60, "keyserver ready")


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ks]:
    tmp = tmp_path_factory.mktemp("cli-services")
    assert main(["keyserver", "init", "--data", str(tmp / "data")]) == 0
    sim.init_platform(tmp / "sim")
    port = free_port()
    with (tmp / "keyserver.log").open("w") as log:
        proc = _start_keyserver(tmp / "data", tmp / "sim", port, log)
        try:
            _ready(f"https://127.0.0.1:{port}", tmp / "data" / "tls" / "ca.pem", proc)
            yield Ks(f"https://127.0.0.1:{port}", port, tmp / "data", tmp / "sim", proc)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    holder = measure.measurement(HOLDER_CONFIG).hex()
    runtime = measure.measurement(RUNTIME_CONFIG).hex()
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"allow": [{"tee": "sim", "measurement": runtime}],
                                "holders": [{"tee": "sim", "measurement": holder}]}))
    return path


def _register(ks: Ks, tmp_path: Path, model_id: str, policy: Path) -> Path:
    key = tmp_path / f"{model_id.replace('/', '_')}.key"
    assert main(["keys", "new", "--model-id", model_id, "-o", str(key)]) == 0
    assert main(["keys", "register", *ks.conn(), "--model-id", model_id, "--key", str(key),
                 "--policy", str(policy)]) == 0
    return key


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SEALEDTORCH_KEYSERVER", "SEALEDTORCH_KEYSERVER_CA",
                 "SEALEDTORCH_ADMIN_TOKEN_FILE", "SEALEDTORCH_KEYCACHE_SOCKET"):
        monkeypatch.delenv(name, raising=False)


# --- TLS mistakes -------------------------------------------------------------------------

def test_missing_ca_says_tls_verification_failed_naming_the_flag_and_file(ks):
    proc = run_cli("keys", "list", "--keyserver", ks.url, "--token-file", str(ks.token))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "TlsVerificationError" in line and "TLS verification" in line
    assert "--ca" in line and "tls/ca.pem" in line and "unreachable" not in line


def test_wrong_ca_names_the_file_that_did_not_verify(ks, tmp_path):
    assert main(["keyserver", "init", "--data", str(tmp_path / "other")]) == 0
    other_ca = tmp_path / "other" / "tls" / "ca.pem"
    proc = run_cli("keys", "list", "--keyserver", ks.url, "--ca", str(other_ca),
                   "--token-file", str(ks.token))
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert f"the --ca file {other_ca} does not verify it" in line and "tls/ca.pem" in line


def test_keys_command_with_an_http_url_says_it_must_be_https(ks):
    proc = run_cli("keys", "list", "--keyserver", f"http://127.0.0.1:{ks.port}", "--ca",
                   str(ks.ca), "--token-file", str(ks.token))
    assert proc.returncode == 2
    assert "--keyserver: the URL must start with https://" in one_error_line(proc)


def test_keycache_with_an_http_keyserver_url_says_it_must_be_https(ks, tmp_path):
    sock_dir = Path(tempfile.mkdtemp(prefix="st-h-", dir="/tmp"))
    try:
        proc = run_cli("keycache", "run", "--keyserver", f"http://127.0.0.1:{ks.port}",
                       "--ca", str(ks.ca), "--socket", str(sock_dir / "k.sock"), "--tee",
                       "sim", "--sim-platform", str(ks.sim_dir))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert proc.returncode == 2
    assert "must start with https://" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_keycache_with_the_wrong_ca_reports_tls_verification_not_an_outage(ks, tmp_path,
                                                                           sock_dir, capsys):
    assert main(["keyserver", "init", "--data", str(tmp_path / "other")]) == 0
    other_ca = tmp_path / "other" / "tls" / "ca.pem"
    sock = sock_dir / "k.sock"
    with (tmp_path / "kc.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sealedtorch.cli", "keycache", "run", "--keyserver",
             ks.url, "--ca", str(other_ca), "--socket", str(sock), "--tee", "sim",
             "--sim-platform", str(ks.sim_dir)], stdout=log, stderr=log, text=True)
        try:
            error = _wait(lambda: _status_json(sock, capsys)["refresh"]["last_error"], 60,
                          "a failed refresh")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert error.startswith("TLS verification of keyserver")
    assert f"the --ca file {other_ca} does not verify it" in error and "tls/ca.pem" in error
    assert "unreachable" not in error


# --- addresses in use ---------------------------------------------------------------------

def test_keyserver_on_a_port_in_use_fails_before_logging_listening(ks):
    proc = run_cli("keyserver", "run", "--data", str(ks.data), "--listen",
                   f"127.0.0.1:{ks.port}", "--log-format", "text")
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert f"cannot listen on 127.0.0.1:{ks.port}: Address already in use" in line
    assert ks.proc.poll() is None  # the first one is unaffected


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="st-h-", dir="/tmp"))  # socket paths: <= 107 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def keycache(ks: Ks, tmp_path: Path, sock_dir: Path) -> Iterator[Path]:
    """A `keycache run` process serving on a real socket; yields the socket path."""
    conf = tmp_path / "kc.conf"
    conf.write_bytes(HOLDER_CONFIG)
    sock = sock_dir / "run" / "keycache.sock"
    log = (tmp_path / "keycache.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sealedtorch.cli", "keycache", "run", "--keyserver", ks.url,
         "--ca", str(ks.ca), "--socket", str(sock), "--tee", "sim", "--sim-platform",
         str(ks.sim_dir), "--runtime-config", str(conf), "--refresh", "60s"],
        stdout=log, stderr=log, text=True)
    try:
        _wait(lambda: proc.poll() is None and sock.exists(), 60, "keycache socket")
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_second_keycache_on_a_socket_in_use_fails_before_fetching_any_key(
        ks, tmp_path, policy_file, keycache, capsys):
    _register(ks, tmp_path, "cli-svc/second", policy_file)
    os.kill(_keycache_pid(keycache), signal.SIGHUP)  # refresh now
    _wait(lambda: any(k["model_id"] == "cli-svc/second" for k in
                      _status_json(keycache, capsys)["keys"]), 60, "the first keycache serving")
    before = ks.audit()
    proc = run_cli("keycache", "run", "--keyserver", ks.url, "--ca", str(ks.ca), "--socket",
                   str(keycache), "--tee", "sim", "--sim-platform", str(ks.sim_dir),
                   "--log-format", "text")
    assert proc.returncode == 2
    assert f"cannot listen on {keycache}: Address already in use" in \
        proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    after = ks.audit()
    assert [r for r in after if r not in before] == []  # no attest, no release audited
    assert keycache.exists()  # the first keycache's socket is untouched


def test_keycache_status_shows_which_runtime_got_which_key(ks, tmp_path, policy_file,
                                                           keycache, capsys):
    from sealedtorch.keycache import KeycacheClient

    _register(ks, tmp_path, "cli-svc/status", policy_file)
    os.kill(_keycache_pid(keycache), signal.SIGHUP)  # refresh now
    _wait(lambda: any(k["model_id"] == "cli-svc/status" for k in
                      _status_json(keycache, capsys)["keys"]), 60, "key held")
    with KeycacheClient(keycache, tee="sim", sim_platform=ks.sim_dir,
                        runtime_config=RUNTIME_CONFIG,
                        keycache_rules=_trusted_keycache(ks)) as client:
        assert client.get_key("cli-svc/status").model_id == "cli-svc/status"
    rows = [r for r in _status_json(keycache, capsys)["releases"]
            if r["model_id"] == "cli-svc/status"]
    meas = measure.measurement(RUNTIME_CONFIG).hex()
    assert len(rows) == 1
    assert rows[0]["pid"] == os.getpid() and rows[0]["uid"] == os.getuid()
    assert rows[0]["measurement"] == meas and rows[0]["version"] == 1
    assert rows[0]["count"] == 1 and rows[0]["last_at"] >= rows[0]["first_at"] > 0
    assert main(["keycache", "status", "--socket", str(keycache)]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.strip().startswith("cli-svc/status v1"))
    assert str(os.getpid()) in line and meas[:16] in line


def _trusted_keycache(ks: Ks) -> tuple[Any, ...]:
    """The `keycache` rule a runtime is measured with: the `keycache run` above (its
    measurement covers HOLDER_CONFIG) on this test's sim platform (mutual attestation)."""
    from sealedtorch.runtime.config import RuntimeConfig

    platform = sim.SimPlatform.load(ks.sim_dir)
    return RuntimeConfig.model_validate({"keycache": [{
        "tee": "sim", "measurement": measure.measurement(HOLDER_CONFIG).hex(),
        "platform_key": platform.public_key.hex()}]}).keycache or ()


def _status_json(sock: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    main(["keycache", "status", "--socket", str(sock), "--json"])
    return dict(json.loads(capsys.readouterr().out))


def _keycache_pid(sock: Path) -> int:
    import socket as socketlib
    import struct

    s = socketlib.socket(socketlib.AF_UNIX)
    try:
        s.connect(str(sock))
        creds = s.getsockopt(socketlib.SOL_SOCKET, socketlib.SO_PEERCRED,
                             struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    finally:
        s.close()


# --- scripts: --json ----------------------------------------------------------------------

def test_keyserver_init_json(tmp_path, capsys):
    assert main(["keyserver", "init", "--data", str(tmp_path / "d"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ca_file"] == str(tmp_path / "d" / "tls" / "ca.pem")
    assert doc["admin_token_file"] == str(tmp_path / "d" / "admin-token")


def test_keys_register_json(ks, tmp_path, policy_file, capsys):
    key = tmp_path / "k.key"
    main(["keys", "new", "--model-id", "cli-svc/reg", "-o", str(key)])
    capsys.readouterr()
    assert main(["keys", "register", *ks.conn(), "--model-id", "cli-svc/reg", "--key",
                 str(key), "--policy", str(policy_file), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_id"] == "cli-svc/reg" and [v["version"] for v in doc["versions"]] == [1]


def test_keys_policy_show_prints_the_policy_usable_as_a_file(ks, tmp_path, policy_file,
                                                             capsys):
    _register(ks, tmp_path, "cli-svc/show", policy_file)
    capsys.readouterr()
    assert main(["keys", "policy", "show", *ks.conn(), "--model-id", "cli-svc/show"]) == 0
    captured = capsys.readouterr()
    shown = tmp_path / "shown.json"
    shown.write_text(captured.out)
    from sealedtorch.attest.policy import load_policy

    assert load_policy(shown).digest() == load_policy(policy_file).digest()
    assert load_policy(policy_file).digest() in captured.err
    assert main(["keys", "policy", "show", *ks.conn(), "--model-id", "cli-svc/show",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["policy_digest"] == load_policy(policy_file).digest()


def test_keys_policy_set_json(ks, tmp_path, policy_file, capsys):
    _register(ks, tmp_path, "cli-svc/set", policy_file)
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"allow": [{"tee": "sim", "measurement": "11" * 48}]}))
    capsys.readouterr()
    assert main(["keys", "policy", "set", *ks.conn(), "--model-id", "cli-svc/set",
                 "--policy", str(new), "--json"]) == 0
    from sealedtorch.attest.policy import load_policy

    assert json.loads(capsys.readouterr().out)["policy_digest"] == load_policy(new).digest()


def test_keys_new_with_a_higher_version_rotates_with_keys_rotate_key(ks, tmp_path,
                                                                     policy_file, capsys):
    _register(ks, tmp_path, "cli-svc/rot", policy_file)
    v2 = tmp_path / "v2.key"
    assert main(["keys", "new", "--model-id", "cli-svc/rot", "--version", "2", "-o",
                 str(v2)]) == 0
    capsys.readouterr()
    assert main(["keys", "rotate", *ks.conn(), "--model-id", "cli-svc/rot", "--key", str(v2),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"model_id": "cli-svc/rot", "key_version": 2, "key_file": str(v2),
                   "generated_by_keyserver": False}


def test_keys_revoke_and_retire_json(ks, tmp_path, policy_file, capsys):
    _register(ks, tmp_path, "cli-svc/rev", policy_file)
    capsys.readouterr()
    assert main(["keys", "revoke", *ks.conn(), "--model-id", "cli-svc/rev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"model_id": "cli-svc/rev", "changed": [1],
                                                   "state": "revoked"}
    assert main(["keys", "retire", *ks.conn(), "--model-id", "cli-svc/rev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "retired"


def test_tokens_create_json_to_a_file_keeps_the_token_off_stdout(ks, tmp_path, capsys):
    out = tmp_path / "owner-token"
    assert main(["keyserver", "tokens", "create", *ks.conn(), "--role", "owner", "--name",
                 "alice", "-o", str(out), "--json"]) == 0
    text = capsys.readouterr().out
    doc = json.loads(text)
    token = out.read_text().strip()
    assert doc["role"] == "owner" and doc["name"] == "alice"
    assert doc["token_file"] == str(out) and token not in text
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_keys_command_with_an_invalid_model_id_names_the_flag(ks, capsys):
    assert main(["keys", "revoke", *ks.conn(), "--model-id", "no spaces"]) == 2
    assert "--model-id: invalid model id" in one_error_line(capsys.readouterr().err)


def test_audit_list_piped_into_head_exits_quietly(ks, tmp_path, policy_file):
    _register(ks, tmp_path, "cli-svc/audit", policy_file)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is already gone, as after `| head`
    proc = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "keyserver", "audit",
                           "list", "--data", str(ks.data)], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == ""


# --- store files and shutdown -------------------------------------------------------------

def test_every_store_file_is_0600(ks, tmp_path, policy_file):
    _register(ks, tmp_path, "cli-svc/perm", policy_file)  # a write: -wal and -shm exist
    files = [ks.data / f"keyserver.db{s}" for s in ("", "-wal", "-shm")]
    assert all(p.exists() for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == \
        {p.name: 0o600 for p in files}


def test_keyserver_stops_without_waiting_for_an_idle_keep_alive_connection(tmp_path):
    assert main(["keyserver", "init", "--data", str(tmp_path / "d")]) == 0
    sim.init_platform(tmp_path / "sim")
    port = free_port()
    url, ca = f"https://127.0.0.1:{port}", tmp_path / "d" / "tls" / "ca.pem"
    with (tmp_path / "ks.log").open("w") as log:
        proc = _start_keyserver(tmp_path / "d", tmp_path / "sim", port, log)
        try:
            _ready(url, ca, proc)
            with httpx.Client(verify=client_context(ca), timeout=10) as idle:
                assert idle.get(url + "/healthz").status_code == 200  # kept alive, unread
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = (tmp_path / "ks.log").read_text()
    assert "keyserver stopped" in text
    # before the fix, uvicorn waited out its graceful timeout for the idle TLS connection
    assert "timeout graceful shutdown exceeded" not in text and "Traceback" not in text
