"""The KEK ring (active + read-only fallbacks, resolved per record) and ``keyserver rewrap``
between file KEKs: no HSM needed here (the PKCS#11 side is in test_kek_pkcs11.py)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from sealedtorch import cli, crypto
from sealedtorch.attest import measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import ConfigError, IntegrityError, KekUnavailable, ServiceUnavailable
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import config, problems, server
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.kek import FileKek, KekRing, open_ring, parse_target
from sealedtorch.keyserver.rewrap import LOCK_FILE, rewrap, write_kek_section
from sealedtorch.keyserver.store import KeyRecord, KeyState, ModelRecord, SqliteStore


def _data_dir(tmp_path: Path) -> config.KeyserverConfig:
    return config.init_data_dir(tmp_path / "data", now=time.time()).config


def _seed(cfg: config.KeyserverConfig, n: int) -> dict[tuple[str, int], bytes]:
    kek = FileKek.load(cfg.data_dir / "kek.json")
    store = SqliteStore(cfg.data_dir / "keyserver.db")
    secrets = {}
    try:
        for i in range(n):
            model_id = f"m{i:03d}"
            secret = crypto.generate_key()
            secrets[model_id, 1] = secret
            with store.transaction() as tx:
                tx.insert_model(ModelRecord(model_id, {"allow": []}, "d" * 64, 1.0, 1.0))
                tx.insert_key(KeyRecord(model_id, 1, KeyState.ACTIVE,
                                        kek.wrap(secret, model_id=model_id, version=1),
                                        kek.kek_id, 1.0))
    finally:
        store.close()
    return secrets


def _rows(cfg: config.KeyserverConfig) -> list[KeyRecord]:
    store = SqliteStore(cfg.data_dir / "keyserver.db")
    try:
        with store.snapshot() as tx:
            return [k for m in tx.list_models() for k in tx.key_versions(m.model_id)]
    finally:
        store.close()


def test_the_ring_unwraps_each_record_under_the_kek_it_names(tmp_path):
    a, b = FileKek.create(tmp_path / "a.json"), FileKek.create(tmp_path / "b.json")
    ring = KekRing({"type": "file", "path": "a.json",
                    "fallback": [{"type": "file", "path": "b.json", "kek_id": b.kek_id}]},
                   base_dir=tmp_path)
    secret = crypto.generate_key()
    under_b = b.wrap(secret, model_id="m", version=1)
    assert ring.unwrap(under_b, model_id="m", version=1, kek_id=b.kek_id) == secret
    wrapped, kek_id = ring.wrap_with_id(secret, model_id="m", version=2)
    assert kek_id == a.kek_id == ring.kek_id
    assert a.unwrap(wrapped, model_id="m", version=2) == secret
    assert ring.fallback_ids == [b.kek_id]
    # a record naming no KEK is tried under each (AES-GCM tells them apart)
    assert ring.unwrap(under_b, model_id="m", version=1) == secret
    with pytest.raises(IntegrityError, match="every configured KEK"):
        ring.unwrap(under_b, model_id="m", version=9)
    # a record under a KEK nobody configured is refused, by name
    with pytest.raises(KekUnavailable, match=r"file:0000.*not configured"):
        ring.unwrap(under_b, model_id="m", version=1, kek_id="file:0000")
    # the right KEK id on the wrong record still fails authentication
    with pytest.raises(IntegrityError):
        ring.unwrap(under_b, model_id="other", version=1, kek_id=b.kek_id)
    ring.close()

    # a fallback whose file now holds another key is caught before it is trusted
    swapped = KekRing({"type": "file", "path": "a.json",
                       "fallback": [{"type": "file", "path": "a.json", "kek_id": b.kek_id}]},
                      base_dir=tmp_path)
    with pytest.raises(KekUnavailable, match="configuration says"):
        swapped.unwrap(under_b, model_id="m", version=1, kek_id=b.kek_id)
    with pytest.raises(ConfigError, match="unknown KEK provider"):
        KekRing({"type": "vault"}, base_dir=tmp_path)


def test_a_ring_follows_its_configuration_file(tmp_path):
    cfg = _data_dir(tmp_path)
    ring = open_ring(cfg.kek, data_dir=cfg.data_dir,
                     config_file=cfg.data_dir / config.CONFIG_FILE)
    first = ring.kek_id
    second = FileKek.create(cfg.data_dir / "second.json")
    secret = crypto.generate_key()
    # staged as a fallback: the ring learns it when a record names it
    write_kek_section(cfg, {**cfg.kek, "fallback": [
        {"type": "file", "path": "second.json", "kek_id": second.kek_id}]})
    moved = second.wrap(secret, model_id="m", version=1)
    assert ring.unwrap(moved, model_id="m", version=1, kek_id=second.kek_id) == secret
    assert ring.kek_id == first
    # switched: the next wrap uses the new active KEK, and says so
    write_kek_section(cfg, {"type": "file", "path": "second.json", "kek_id": second.kek_id,
                            "fallback": [{**cfg.kek, "kek_id": first}]})
    _, used = ring.wrap_with_id(secret, model_id="m", version=2)
    assert used == second.kek_id == ring.kek_id and ring.fallback_ids == [first]
    # a broken file is logged and ignored: the ring keeps what it had
    (cfg.data_dir / config.CONFIG_FILE).write_text("{not json")
    assert ring.wrap_with_id(secret, model_id="m", version=3)[1] == second.kek_id
    ring.close()
    assert (cfg.data_dir / config.CONFIG_FILE).stat().st_mode & 0o777 == 0o600


def test_rewrap_between_file_keks_and_the_cli(tmp_path, capsys):
    cfg = _data_dir(tmp_path)
    secrets = _seed(cfg, 5)
    old = FileKek.load(cfg.data_dir / "kek.json").kek_id
    new_path = tmp_path / "outside" / "new-kek.json"
    new_path.parent.mkdir()
    assert cli.main(["keyserver", "rewrap", "--data", str(cfg.data_dir),
                     "--to", f"file:{new_path}"]) == 0
    out = capsys.readouterr().out
    new = FileKek.load(new_path)
    assert f"[5/5] m004 v1: {old} -> {new.kek_id}" in out
    assert "5 moved" in out and "now the active KEK" in out
    assert oct(new_path.stat().st_mode & 0o777) == "0o600"
    section = json.loads((cfg.data_dir / config.CONFIG_FILE).read_text())["kek"]
    assert section["path"] == str(new_path)  # outside the data directory: absolute
    for rec in _rows(cfg):
        assert rec.kek_id == new.kek_id and rec.wrapped is not None
        assert new.unwrap(rec.wrapped, model_id=rec.model_id, version=1) == \
            secrets[rec.model_id, 1]

    assert cli.main(["keyserver", "kek", "status", "--data", str(cfg.data_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(s["role"], s["kek_id"], s["records"]) for s in status] == [
        ("active", new.kek_id, 5), ("fallback", old, 0)]
    assert cli.main(["keyserver", "rewrap", "--data", str(cfg.data_dir), "--to",
                     f"file:{new_path}", "--prune", "--quiet"]) == 0
    assert f"pruned unused fallback KEK {old}" in capsys.readouterr().out

    assert cli.main(["keyserver", "rewrap", "--data", str(cfg.data_dir),
                     "--to", "vault:x"]) == 2
    assert "file:PATH or a pkcs11: URI" in capsys.readouterr().err


def test_stage_only_adds_a_read_only_kek(tmp_path):
    cfg = _data_dir(tmp_path)
    _seed(cfg, 2)
    report = rewrap(cfg.data_dir, "file:" + str(cfg.data_dir / "next.json"), stage_only=True)
    assert report.staged and report.moved == 0
    section = json.loads((cfg.data_dir / config.CONFIG_FILE).read_text())["kek"]
    assert section["path"] == "kek.json"
    assert section["fallback"] == [{"type": "file", "path": "next.json",
                                    "kek_id": report.target}]
    again = rewrap(cfg.data_dir, "file:" + str(cfg.data_dir / "next.json"), stage_only=True)
    assert not again.staged


def test_a_key_retired_during_a_rewrap_stays_erased(tmp_path):
    cfg = _data_dir(tmp_path)
    _seed(cfg, 4)
    store = SqliteStore(cfg.data_dir / "keyserver.db")

    def retire_the_next(done: int, total: int, rec: KeyRecord, *_: object) -> None:
        if rec.model_id == "m000":  # m001 is already read, in the same batch
            with store.transaction() as tx:
                tx.set_key_state("m001", 1, KeyState.RETIRED, 2.0, "test", erase=True)

    try:
        report = rewrap(cfg.data_dir, "file:" + str(cfg.data_dir / "k2.json"),
                        progress=retire_the_next)
    finally:
        store.close()
    assert report.moved == 3 and report.skipped == 1
    retired = next(r for r in _rows(cfg) if r.model_id == "m001")
    assert retired.wrapped is None and retired.state is KeyState.RETIRED
    assert report.usage == {report.target: 3}


def test_the_store_swaps_a_wrapped_key_only_if_unchanged(tmp_path):
    cfg = _data_dir(tmp_path)
    _seed(cfg, 1)
    store = SqliteStore(cfg.data_dir / "keyserver.db")
    try:
        with store.snapshot() as tx:
            (rec,) = tx.wrapped_keys()
            assert tx.wrapped_keys(not_under=rec.kek_id) == []
            assert tx.kek_usage() == {rec.kek_id: 1}
        assert rec.wrapped is not None
        with store.transaction() as tx:
            assert not tx.rewrap_key("m000", 1, expected=b"stale", wrapped=b"x" * 60,
                                     kek_id="file:new")
            assert tx.rewrap_key("m000", 1, expected=rec.wrapped, wrapped=b"x" * 60,
                                 kek_id="file:new")
        with store.snapshot() as tx:
            assert tx.kek_usage() == {"file:new": 1}
            assert [r.model_id for r in tx.wrapped_keys(not_under=rec.kek_id)] == ["m000"]
    finally:
        store.close()


def test_one_rewrap_at_a_time(tmp_path):
    cfg = _data_dir(tmp_path)
    fd = os.open(cfg.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another rewrap is running"):
            rewrap(cfg.data_dir, "file:" + str(cfg.data_dir / "k2.json"))
    finally:
        os.close(fd)


def test_a_record_under_an_unconfigured_kek_is_reported(tmp_path, capsys):
    cfg = _data_dir(tmp_path)
    _seed(cfg, 1)
    store = SqliteStore(cfg.data_dir / "keyserver.db")
    try:
        with store.snapshot() as tx:
            (rec,) = tx.wrapped_keys()
        assert rec.wrapped is not None
        with store.transaction() as tx:
            tx.rewrap_key("m000", 1, expected=rec.wrapped, wrapped=rec.wrapped,
                          kek_id="file:gone")
    finally:
        store.close()
    assert cli.main(["keyserver", "kek", "status", "--data", str(cfg.data_dir)]) == 1
    assert "unconfigured file:gone  1 record(s)" in capsys.readouterr().out
    assert cli.main(["keyserver", "rewrap", "--data", str(cfg.data_dir), "--to",
                     "file:" + str(cfg.data_dir / "k2.json")]) == 2
    assert "file:gone, which is not configured" in capsys.readouterr().err


def test_a_server_answers_503_for_a_key_under_an_unconfigured_kek(tmp_path):
    init = config.init_data_dir(tmp_path / "data", now=time.time())
    platform = sim.init_platform(tmp_path / "sim")
    measurement = measure.measurement(b"kek-ring-tests")
    policy = {"allow": [{"tee": "sim", "measurement": measurement.hex()}]}
    with server.BackgroundServer.start(init.config,
                                       trust_sim_roots=[tmp_path / "sim" / sim.PUB_FILE]) as srv:
        with AdminClient.from_token_file(srv.url, init.ca_file,
                                         init.admin_token_file) as admin:
            for model_id in ("fine", "orphan"):
                admin.register(ModelKey.generate(model_id), policy)
        store = SqliteStore(init.config.data_dir / "keyserver.db")
        try:
            with store.snapshot() as tx:
                (rec,) = tx.key_versions("orphan")
            assert rec.wrapped is not None
            with store.transaction() as tx:
                tx.rewrap_key("orphan", 1, expected=rec.wrapped, wrapped=rec.wrapped,
                              kek_id="pkcs11:00000000")
        finally:
            store.close()
        with AttestedKeyClient(srv.url, init.ca_file,
                               SimAttester(platform, measurement)) as client:
            assert client.fetch("fine").model_key.model_id == "fine"
            with pytest.raises(ServiceUnavailable, match="not configured"):
                client.fetch("orphan")
    assert problems.http_status(KekUnavailable("x")) == 503


def test_rewrap_on_a_postgresql_store_resumes_after_a_crash(tmp_path, pg_url, capsys):
    """The same rewrap over the replicated store: a second data directory (another
    replica) stages the target first, reads moved keys throughout, then switches."""
    init = config.init_data_dir(tmp_path / "one", now=time.time(), database=pg_url)
    other = config.init_data_dir(tmp_path / "two", now=time.time())  # another replica
    kek = FileKek.load(init.config.data_dir / "kek.json")
    # the second replica shares the first one's KEK (copied, as an operator would)
    (other.config.data_dir / "kek.json").write_bytes(
        (init.config.data_dir / "kek.json").read_bytes())
    store = config.open_store(init.config)
    secrets = {}
    try:
        for i in range(6):
            model_id = f"pg{i}"
            secret = crypto.generate_key()
            secrets[model_id] = secret
            with store.transaction() as tx:
                tx.insert_model(ModelRecord(model_id, {"allow": []}, "d" * 64, 1.0, 1.0))
                tx.insert_key(KeyRecord(model_id, 1, KeyState.ACTIVE,
                                        kek.wrap(secret, model_id=model_id, version=1),
                                        kek.kek_id, 1.0))
    finally:
        store.close()
    target = "file:" + str(tmp_path / "shared-kek.json")
    staged = rewrap(other.config.data_dir, target, stage_only=True, database=pg_url)
    assert staged.staged and staged.usage == {kek.kek_id: 6}

    class Crash(Exception):
        pass

    def crash(done: int, *_: object) -> None:
        if done == 4:
            raise Crash

    with pytest.raises(Crash):
        rewrap(init.config.data_dir, target, progress=crash)
    # replica two, not switched yet, reads keys under both KEKs
    ring = open_ring(config.load_config(other.config.data_dir).kek,
                     data_dir=other.config.data_dir, config_file=None)
    store = config.open_store(init.config)
    try:
        with store.snapshot() as tx:
            records = tx.wrapped_keys()
        assert {r.kek_id for r in records} == {kek.kek_id, staged.target}
        for r in records:
            assert r.wrapped is not None
            assert ring.unwrap(r.wrapped, model_id=r.model_id, version=1,
                               kek_id=r.kek_id) == secrets[r.model_id]
    finally:
        store.close()
        ring.close()
    done = rewrap(init.config.data_dir, target)
    assert done.moved == 2 and done.usage == {staged.target: 6}
    # replica two: nothing left to move; its own configuration switches
    assert cli.main(["keyserver", "rewrap", "--data", str(other.config.data_dir), "--to",
                     target, "--database", pg_url]) == 0
    assert "0 moved" in capsys.readouterr().out
    assert cli.main(["keyserver", "kek", "status", "--data", str(other.config.data_dir),
                     "--database", pg_url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(s["role"], s["kek_id"], s["records"]) for s in status] == [
        ("active", staged.target, 6), ("fallback", kek.kek_id, 0)]


def test_targets_parse(tmp_path):
    assert parse_target(f"file:{tmp_path}/d/k.json", data_dir=tmp_path / "d") == \
        {"type": "file", "path": "k.json"}
    with pytest.raises(ConfigError):
        parse_target("file:", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="pin-value"):
        parse_target("pkcs11:token=t;object=k?module-path=/x.so&pin-value=1",
                     data_dir=tmp_path)
