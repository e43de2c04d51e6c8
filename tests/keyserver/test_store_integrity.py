"""Issue 11 §1: a database writer (no KEK) cannot change who gets a key.

Each test runs a real keyserver on 127.0.0.1 (SQLite and the local PostgreSQL), lets a
second process play the attacker who can write the database, and checks that the changed
row is refused with a typed integrity error, audited, and counted in ``/metrics``."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sealedtorch import errors
from sealedtorch.attest import measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.attest.policy import load_policy
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import config, schema, server, tokens
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.kek import FileKek
from sealedtorch.keyserver.tls import client_context

# The attacker: a separate process with write access to the database and nothing else.
_ATTACKER = r"""
import json, sys
engine, target, sql, params = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
params = [bytes.fromhex(p[4:]) if isinstance(p, str) and p.startswith("hex:") else p
          for p in params]
if engine == "sqlite":
    import sqlite3
    conn = sqlite3.connect(target)
    changed = conn.execute(sql, params).rowcount
    conn.commit()
else:
    import psycopg
    with psycopg.connect(target, autocommit=True) as conn:
        changed = conn.execute(sql.replace("?", "%s"), params).rowcount
print(changed)
"""

OWNER_MEASUREMENT = measure.measurement(b"integrity-owner-runtime")
EVIL_MEASUREMENT = measure.measurement(b"integrity-attacker-runtime")


@dataclass
class Deployment:
    engine: str
    init: config.InitResult
    platform: sim.SimPlatform
    srv: server.BackgroundServer
    database: str | None

    @property
    def url(self) -> str:
        return self.srv.url

    @property
    def ca(self) -> Path:
        assert self.init.ca_file is not None
        return self.init.ca_file

    def admin(self, token: str | None = None) -> AdminClient:
        if token is not None:
            return AdminClient(self.url, self.ca, token)
        return AdminClient.from_token_file(self.url, self.ca, self.init.admin_token_file)

    def runtime(self, measurement: bytes) -> AttestedKeyClient:
        return AttestedKeyClient(self.url, self.ca, SimAttester(self.platform, measurement))

    def attack(self, sql: str, *params: Any) -> int:
        """Run one statement as the attacker, in another process; rows changed."""
        target = self.database or str(self.init.config.data_dir / "keyserver.db")
        encoded = [("hex:" + p.hex()) if isinstance(p, bytes) else p for p in params]
        done = subprocess.run([sys.executable, "-c", _ATTACKER, self.engine, target, sql,
                               json.dumps(encoded)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    def metric(self, name: str) -> float:
        with httpx.Client(base_url=self.url, verify=client_context(self.ca), timeout=10) as h:
            text = h.get("/metrics").text
        found = dict(re.findall(r"^(\S+) (\S+)$", text, re.M))
        return float(found.get(name, 0))

    def audit(self, model_id: str | None = None) -> list[dict[str, Any]]:
        with self.admin() as admin:
            records: list[dict[str, Any]] = admin.audit(model_id=model_id)["records"]
            return records


def policy_for(measurement: bytes) -> dict[str, Any]:
    return {"allow": [{"tee": "sim", "measurement": measurement.hex()}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def dep(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    database = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    init = config.init_data_dir(tmp_path / "data", now=time.time(), database=database)
    platform = sim.init_platform(tmp_path / "sim")
    srv = server.BackgroundServer.start(init.config,
                                        trust_sim_roots=[tmp_path / "sim" / sim.PUB_FILE])
    try:
        yield Deployment(request.param, init, platform, srv, database)
    finally:
        srv.stop()


INTEGRITY_METRIC = 'sealedtorch_keyserver_store_integrity_failures_total{table="%s"}'


def test_a_rewritten_policy_row_is_refused_to_the_attackers_runtime(dep):
    key = ModelKey.generate("victim-model")
    with dep.admin() as admin:
        admin.register(key, policy_for(OWNER_MEASUREMENT))
    with dep.runtime(EVIL_MEASUREMENT) as evil:  # before: the policy keeps it out
        with pytest.raises(errors.PolicyDenied):
            evil.fetch("victim-model")

    evil_policy = load_policy(policy_for(EVIL_MEASUREMENT))
    changed = dep.attack("UPDATE models SET policy = ?, policy_digest = ? WHERE model_id = ?",
                         json.dumps(evil_policy.to_json(), sort_keys=True),
                         evil_policy.digest(), "victim-model")
    assert changed == 1
    before = dep.metric(INTEGRITY_METRIC % "models")

    with dep.runtime(EVIL_MEASUREMENT) as evil:
        with pytest.raises(errors.IntegrityError):
            evil.fetch("victim-model")
        with pytest.raises(errors.IntegrityError):  # nor among "every key I may have"
            evil.fetch_all()
    last = dep.audit("victim-model")[-1]
    assert last["event"] == "release" and last["decision"] == "error"
    assert last["problem"] == "integrity"
    assert "behind the keyserver's back" in last["reasons"][0]
    assert dep.metric(INTEGRITY_METRIC % "models") >= before + 2
    with dep.runtime(OWNER_MEASUREMENT) as owner:  # fail closed for everyone
        with pytest.raises(errors.IntegrityError):
            owner.fetch("victim-model")


def test_an_inserted_admin_token_row_is_refused(dep):
    forged = tokens.new_admin_token()
    forged_hash = tokens.admin_token_hash(forged)
    now = time.time()
    # with no MAC, and with a MAC copied from the genuine initial token's row
    dep.attack("INSERT INTO admin_tokens (token_id, token_hash, name, role, created_at, "
               "principal_id, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
               tokens.admin_token_id(forged_hash), forged_hash, "evil", "admin", now, "evil",
               now + 86400)
    with dep.admin(forged) as evil:
        with pytest.raises(errors.IntegrityError):
            evil.create_token("admin", "evil-2")
    copied = tokens.new_admin_token()
    copied_hash = tokens.admin_token_hash(copied)
    dep.attack("INSERT INTO admin_tokens (token_id, token_hash, name, role, created_at, "
               "principal_id, expires_at, row_mac, mac_kek) SELECT ?, ?, name, role, "
               "created_at, principal_id, expires_at, row_mac, mac_kek FROM admin_tokens "
               "WHERE name = 'initial'", tokens.admin_token_id(copied_hash), copied_hash)
    with dep.admin(copied) as evil:
        with pytest.raises(errors.IntegrityError):
            evil.list_models()

    records = [r for r in dep.audit() if r["event"] == "admin.denied"]
    assert [r["problem"] for r in records[-2:]] == ["integrity", "integrity"]
    assert dep.metric(INTEGRITY_METRIC % "admin_tokens") >= 2
    with dep.admin() as admin:  # the genuine admin still works, and sees the forgeries
        listed = {t["token_id"]: t for t in admin.list_tokens()}
        genuine = next(t for t in listed.values() if t["name"] == "initial"
                       and t["token_id"] != tokens.admin_token_id(copied_hash))
        assert genuine["intact"] is True
        assert listed[tokens.admin_token_id(forged_hash)]["intact"] is False
        assert listed[tokens.admin_token_id(copied_hash)]["intact"] is False
        assert "evil-2" not in {t["name"] for t in listed.values()}
        # revoking a forged row takes its rights for good but never blesses it
        admin.revoke_token(tokens.admin_token_id(forged_hash))
        after = {t["token_id"]: t for t in admin.list_tokens()}
        assert after[tokens.admin_token_id(forged_hash)]["intact"] is False
        assert after[tokens.admin_token_id(forged_hash)]["revoked_at"] is not None


def test_a_revoked_key_switched_back_to_active_is_refused(dep):
    key = ModelKey.generate("revoked-model")
    with dep.admin() as admin:
        admin.register(key, policy_for(OWNER_MEASUREMENT))
        admin.revoke("revoked-model", reason="leaked")
    dep.attack("UPDATE key_versions SET state = 'active' WHERE model_id = ?", "revoked-model")
    with dep.runtime(OWNER_MEASUREMENT) as rt:
        with pytest.raises(errors.IntegrityError):
            rt.fetch("revoked-model")
    assert dep.audit("revoked-model")[-1]["problem"] == "integrity"
    assert dep.metric(INTEGRITY_METRIC % "key_versions") >= 1


def test_a_model_moved_to_another_owner_in_the_database_is_refused(dep):
    with dep.admin() as admin:
        alice = admin.create_token("owner", "alice")["token"]
        mallory = admin.create_token("owner", "mallory")["token"]
    with dep.admin(alice) as a:
        a.register(ModelKey.generate("alices-model"), policy_for(OWNER_MEASUREMENT))
    dep.attack("UPDATE models SET owner = 'mallory', owner_id = 'mallory' "
               "WHERE model_id = 'alices-model'")
    with dep.admin(mallory) as m:
        with pytest.raises(errors.IntegrityError):
            m.get_model("alices-model")
        with pytest.raises(errors.IntegrityError):
            m.set_policy("alices-model", policy_for(EVIL_MEASUREMENT))
    assert dep.metric(INTEGRITY_METRIC % "models") >= 2


def test_untouched_rows_keep_working_beside_a_tampered_one(dep):
    with dep.admin() as admin:
        good = ModelKey.generate("good-model")
        admin.register(good, policy_for(OWNER_MEASUREMENT))
        admin.register(ModelKey.generate("bad-model"), policy_for(OWNER_MEASUREMENT))
        second = policy_for(measure.measurement(b"a second runtime"))["allow"]
        admin.set_policy("good-model", {"allow": policy_for(OWNER_MEASUREMENT)["allow"]
                                        + second})  # a changed policy is sealed anew
    dep.attack("UPDATE models SET policy_digest = ? WHERE model_id = 'bad-model'", "0" * 64)
    with dep.runtime(OWNER_MEASUREMENT) as rt:
        assert [k.model_key for k in rt.fetch_all()] == [good]  # the bad one is withheld
        assert rt.fetch("good-model").model_key == good
    assert dep.audit("bad-model")[-1]["problem"] == "integrity"


# --------------------------------------------------------------------------- upgrade


def _legacy_store(path: Path, kek: FileKek, admin_token: str, key: ModelKey,
                  policy: dict[str, Any]) -> None:
    """A store as sealedtorch wrote it before migration 3 (schema 2, no MACs)."""
    conn = sqlite3.connect(path)
    conn.execute(schema.MIGRATIONS_TABLE)
    for m in schema.MIGRATIONS[:2]:
        for statement in m.sqlite:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (m.version, m.name, 1.0))
    token_hash = tokens.admin_token_hash(admin_token)
    conn.execute("INSERT INTO admin_tokens (token_id, token_hash, name, role, created_at) "
                 "VALUES (?, ?, 'initial', 'admin', ?)",
                 (tokens.admin_token_id(token_hash), token_hash, time.time()))
    p = load_policy(policy)
    conn.execute("INSERT INTO models (model_id, policy, policy_digest, created_at, "
                 "updated_at, owner) VALUES (?, ?, ?, 1.0, 1.0, NULL)",
                 (key.model_id, json.dumps(p.to_json(), sort_keys=True), p.digest()))
    conn.execute("INSERT INTO key_versions (model_id, version, state, wrapped, kek_id, "
                 "created_at) VALUES (?, 1, 'active', ?, ?, 1.0)",
                 (key.model_id, kek.wrap(key.secret, model_id=key.model_id, version=1),
                  kek.kek_id))
    conn.commit()
    conn.close()


def test_an_existing_store_is_sealed_once_at_upgrade_then_enforced(tmp_path):
    init = config.init_data_dir(tmp_path / "data", now=time.time())
    data = init.config.data_dir
    platform = sim.init_platform(tmp_path / "sim")
    roots = [tmp_path / "sim" / sim.PUB_FILE]
    for f in data.glob("keyserver.db*"):
        f.unlink()
    key = ModelKey.generate("legacy-model")
    _legacy_store(data / "keyserver.db", FileKek.load(data / "kek.json"),
                  init.admin_token_file.read_text().strip(), key, policy_for(OWNER_MEASUREMENT))
    settings = json.loads((data / "keyserver.json").read_text())
    del settings[config.ROW_MACS_SETTING]  # a data directory from before row MACs
    (data / "keyserver.json").write_text(json.dumps(settings))

    with server.BackgroundServer.start(config.load_config(data), trust_sim_roots=roots) as srv:
        with AttestedKeyClient(srv.url, init.ca_file,
                               SimAttester(platform, OWNER_MEASUREMENT)) as rt:
            assert rt.fetch("legacy-model").model_key == key
        with AdminClient.from_token_file(srv.url, init.ca_file,
                                         init.admin_token_file) as admin:
            (upgrade,) = [r for r in admin.audit()["records"]
                          if r["event"] == "store.integrity.upgrade"]
            assert upgrade["sealed_rows"] == 3  # model, key version, admin token
            (tok,) = admin.list_tokens()
            assert tok["intact"] and tok["expires_at"] is not None
    assert json.loads((data / "keyserver.json").read_text())["row_macs"] == "required"

    # a second start seals nothing again; a tampered row stays refused
    conn = sqlite3.connect(data / "keyserver.db")
    conn.execute("UPDATE models SET policy = ? WHERE model_id = 'legacy-model'",
                 (json.dumps(policy_for(EVIL_MEASUREMENT)),))
    conn.commit()
    with server.BackgroundServer.start(config.load_config(data), trust_sim_roots=roots) as srv:
        with AttestedKeyClient(srv.url, init.ca_file,
                               SimAttester(platform, EVIL_MEASUREMENT)) as rt:
            with pytest.raises(errors.IntegrityError):
                rt.fetch("legacy-model")

    # removing the marker does not get tampered rows sealed: the keyserver will not start
    conn.execute("DELETE FROM meta WHERE key = 'row_macs'")
    conn.commit()
    conn.close()
    with pytest.raises(errors.StoreIntegrityError, match="removed it"):
        server.build_keyserver(config.load_config(data), trust_sim_roots=roots)
