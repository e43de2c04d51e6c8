"""The audit chain, the CLI, and the server as a real process (``keyserver run``) with a
graceful shutdown."""

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

from sealedtorch import cli
from sealedtorch.attest import measure, sim
from sealedtorch.keys import ModelKey, read_key_file, write_key_file
from sealedtorch.keyserver import audit, config
from sealedtorch.keyserver.server import free_port
from sealedtorch.keyserver.store import SqliteStore
from sealedtorch.keyserver.tls import client_context


def _records(store: SqliteStore) -> list[audit.AuditRecord]:
    with store.snapshot() as tx:
        return tx.audit_records()


def _append(store: SqliteStore, n: int) -> None:
    for i in range(n):
        with store.transaction() as tx:
            tx.append_audit({"time": 1000.0 + i, "event": "test", "decision": "ok",
                             "model_id": f"m{i % 2}"})


def test_chain_verifies_and_names_the_first_broken_record(tmp_path):
    store = SqliteStore(tmp_path / "a.db")
    _append(store, 6)
    report = audit.verify_chain(_records(store))
    assert report.ok and report.count == 6 and report.head_seq == 6
    store.close()

    conn = sqlite3.connect(tmp_path / "a.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET decision = 'deny' WHERE seq = 3")
    conn.execute("DROP TRIGGER audit_no_update")  # an attacker with file access
    row = conn.execute("SELECT record FROM audit WHERE seq = 3").fetchone()[0]
    conn.execute("UPDATE audit SET record = ? WHERE seq = 3",
                 (row.replace('"decision":"ok"', '"decision":"allow"'),))
    conn.commit()
    conn.close()
    store = SqliteStore(tmp_path / "a.db")
    report = audit.verify_chain(_records(store))
    assert not report.ok and report.broken_at == 3 and report.count == 2
    assert "modified" in report.problem
    store.close()


def test_chain_detects_deleted_records(tmp_path):
    store = SqliteStore(tmp_path / "b.db")
    _append(store, 4)
    store.close()
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 2")
    conn.commit()
    conn.close()
    store = SqliteStore(tmp_path / "b.db")
    report = audit.verify_chain(_records(store))
    assert report.broken_at == 3 and "deleted" in report.problem
    with store.snapshot() as tx:
        assert [r.seq for r in tx.audit_records(model_id="m0")] == [1, 3]
        assert [r.seq for r in tx.audit_records(since=1002.0)] == [3, 4]
    store.close()


def _wait_ready(url: str, ca: Path, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"keyserver exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/readyz", verify=client_context(ca), timeout=1).status_code \
                    == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("keyserver did not become ready")


def test_cli_end_to_end_with_a_real_server_process(tmp_path, capsys):
    """init → run (subprocess) → keys register/rotate/list/revoke → attest fetch-key →
    audit verify/list → SIGTERM drains and exits 0.  The test is the model owner here, so
    it writes key files."""
    data, work = tmp_path / "data", tmp_path / "work"
    work.mkdir()
    assert cli.main(["keyserver", "init", "--data", str(data), "--hostname", "keys.example"]) \
        == 0
    assert (data / "admin-token").stat().st_mode & 0o777 == 0o600
    assert (data / "kek.json").stat().st_mode & 0o777 == 0o600
    platform = sim.init_platform(tmp_path / "sim")
    cfg = config.load_config(data)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sealedtorch.cli", "keyserver", "run", "--data", str(data),
         "--listen", f"127.0.0.1:{port}", "--trust-sim-root", str(platform.directory /
                                                                 sim.PUB_FILE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(url, data / "tls" / "ca.pem", proc)
        conn = ["--keyserver", url, "--ca", str(data / "tls" / "ca.pem"),
                "--token-file", str(data / "admin-token")]
        key = ModelKey.generate("cli-model")
        write_key_file(work / "key.json", key)
        (work / "policy.yaml").write_text(
            f"allow:\n  - tee: sim\n    measurement: \"{measure.measurement(b'').hex()}\"\n")
        capsys.readouterr()
        assert cli.main(["keys", "register", *conn, "--model-id", "cli-model",
                         "--key", str(work / "key.json"),
                         "--policy", str(work / "policy.yaml")]) == 0
        assert cli.main(["keys", "rotate", *conn, "--model-id", "cli-model",
                         "--key-out", str(work / "key2.json")]) == 0
        key2 = read_key_file(work / "key2.json")
        assert key2.version == 2 and key2.secret != key.secret
        capsys.readouterr()
        assert cli.main(["keys", "list", *conn, "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [v["version"] for v in listed[0]["versions"]] == [1, 2]
        assert cli.main(["keys", "revoke", *conn, "--model-id", "cli-model", "--version", "2",
                         "--reason", "test"]) == 0
        fetch = ["attest", "fetch-key", "--keyserver", url, "--ca",
                 str(data / "tls" / "ca.pem"), "--tee", "sim", "--sim-platform",
                 str(platform.directory), "--model-id", "cli-model"]
        assert cli.main([*fetch, "-o", str(work / "got.json")]) == 0
        assert read_key_file(work / "got.json") == key  # v2 revoked: v1 is the latest active
        assert cli.main([*fetch, "--version", "2", "-o", str(work / "got2.json")]) == 2
        assert "revoked" in capsys.readouterr().err
        assert not (work / "got2.json").exists()
        assert cli.main(["keys", "list", *conn]) == 0
        assert "v1 active, v2 revoked" in capsys.readouterr().out
        assert cli.main(["keys", "list", "--keyserver", url, "--ca",
                         str(data / "tls" / "ca.pem"), "--token-file",
                         str(data / "kek.json")]) == 2  # not an admin token
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "keyserver stopped" in err and "INSECURE" in err
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r.get("event") == "release" and r.get("decision") == "allow" for r in logs)
    for secret in (key.secret, key2.secret):
        assert secret.hex() not in err and base64.b64encode(secret).decode() not in err

    capsys.readouterr()
    assert cli.main(["keyserver", "audit", "verify", "--data", str(data)]) == 0
    assert "intact" in capsys.readouterr().out
    assert cli.main(["keyserver", "audit", "list", "--data", str(data), "--model",
                     "cli-model"]) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [line.split()[2:4] for line in lines]
    assert ["register", "ok"] in events and ["rotate", "ok"] in events
    assert ["revoke", "ok"] in events and ["release", "allow"] in events
    assert ["release", "deny"] in events
    assert all("cli-model" in line for line in lines)
    assert cli.main(["keyserver", "audit", "list", "--data", str(data), "--since",
                     "2999-01-01", "--json"]) == 0
    assert capsys.readouterr().out == ""

    # tamper with the database file: verify names the record and exits 1
    conn_db = sqlite3.connect(cfg.path("keyserver.db"))
    conn_db.execute("DROP TRIGGER audit_no_update")
    conn_db.execute("UPDATE audit SET decision = 'allow' WHERE seq = 2")
    conn_db.commit()
    conn_db.close()
    assert cli.main(["keyserver", "audit", "verify", "--data", str(data)]) == 1
    assert "BROKEN at record #2" in capsys.readouterr().err


def test_init_refuses_an_existing_directory(tmp_path, capsys):
    assert cli.main(["keyserver", "init", "--data", str(tmp_path / "d")]) == 0
    assert cli.main(["keyserver", "init", "--data", str(tmp_path / "d")]) == 2
    assert "refusing" in capsys.readouterr().err
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o700
