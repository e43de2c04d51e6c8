"""The PKCS#11 KEK against a real SoftHSM2 token, and ``keyserver rewrap`` onto it while a
keyserver keeps releasing keys.

SoftHSM2 reads its configuration (``SOFTHSM2_CONF``) once per process, at ``C_Initialize``,
and a token initialised later is not seen by a process that has already loaded it; so this
module makes one token directory with every token it needs before anything loads the
module (``scripts/test.sh`` installs softhsm2 with apt).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealedtorch import crypto
from sealedtorch.attest import measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import (
    ConfigError,
    IntegrityError,
    KekLoginError,
    KekObjectNotFound,
    KekTokenNotFound,
    KekUnavailable,
)
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import audit, config, server
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.kek import FileKek, open_ring
from sealedtorch.keyserver.kek_base import key_aad
from sealedtorch.keyserver.kek_pkcs11 import Pkcs11Kek, Pkcs11Uri
from sealedtorch.keyserver.rewrap import kek_status, rewrap
from sealedtorch.keyserver.store import KeyRecord, KeyState, ModelRecord, SqliteStore

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so",
                     "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
TOKEN, PIN, SO_PIN = "sealedtorch-test", "4711-user", "0815-so"
PIN_TOKEN, PIN_TOKEN_PIN = "pin-test", "right-pin"


@dataclass
class Hsm:
    module: str
    conf: Path
    pin_file: Path
    tmp: Path

    def uri(self, obj: str, *, token: str = TOKEN, pin_source: str | None = None) -> str:
        return (f"pkcs11:token={token};object={obj}?module-path={self.module}"
                f"&pin-source={pin_source or 'file:' + str(self.pin_file)}")

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}


def _softhsm_util(*args: str, conf: Path) -> None:
    subprocess.run(["softhsm2-util", *args], check=True, capture_output=True,
                   env={**os.environ, "SOFTHSM2_CONF": str(conf)})


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    module = next((m for m in MODULE_CANDIDATES if os.path.exists(m)), None)
    if module is None:
        pytest.fail("SoftHSM2 is not installed (scripts/test.sh installs it: "
                    "apt-get install softhsm2)")
    tmp = tmp_path_factory.mktemp("softhsm")
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\n"
                    f"log.level = ERROR\nslots.removable = false\n")
    for label, pin in ((TOKEN, PIN), (PIN_TOKEN, PIN_TOKEN_PIN)):
        _softhsm_util("--init-token", "--free", "--label", label, "--pin", pin,
                      "--so-pin", SO_PIN, conf=conf)
    pin_file = tmp / "user.pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    h = Hsm(module, conf, pin_file, tmp)
    for label in ("kek-a", "kek-b", "kek-threads", "kek-rows"):
        Pkcs11Kek.create(h.uri(label)).close()
    try:
        yield h
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


# --------------------------------------------------------------------------- the URI

def test_uri_parsing_is_strict_and_never_holds_a_pin():
    u = Pkcs11Uri.parse("pkcs11:token=My%20Token;object=kek;id=%01%ff"
                        "?module-path=/usr/lib/x.so&pin-source=env:HSM_PIN")
    assert (u.token, u.object, u.id, u.pin_source) == ("My Token", "kek", b"\x01\xff",
                                                        "env:HSM_PIN")
    assert Pkcs11Uri.parse(u.text()) == u
    assert u.text() == ("pkcs11:token=My%20Token;object=kek;id=%01%ff"
                        "?module-path=/usr/lib/x.so&pin-source=env:HSM_PIN")
    for bad, why in [
        ("pkcs11:token=t;object=k?module-path=/x.so&pin-value=1234", "pin-value is refused"),
        ("pkcs11:token=t;object=k", "module-path is required"),
        ("pkcs11:token=t;object=k?module-path=lib.so", "must be absolute"),
        ("pkcs11:token=t?module-path=/x.so", "object=LABEL"),
        ("pkcs11:token=t;object=k;colour=red?module-path=/x.so", "unsupported attribute"),
        ("pkcs11:token=t;object=k;type=private?module-path=/x.so", "secret-key"),
        ("pkcs11:token=t;object=k?module-path=/x.so&pin-source=file:rel/pin", "absolute"),
        ("pkcs11:token=t;object=k?module-path=/x.so&pin-source=https://x", "pin-source"),
        ("pkcs11:token=t;token=u;object=k?module-path=/x.so", "twice"),
    ]:
        with pytest.raises(ConfigError, match=why):
            Pkcs11Uri.parse(bad)


# --------------------------------------------------------------------------- the provider

def test_wrap_and_unwrap_happen_in_the_token(hsm):
    kek = Pkcs11Kek(hsm.uri("kek-a"))
    other = Pkcs11Kek(hsm.uri("kek-b"))
    try:
        secret = crypto.generate_key()
        wrapped = kek.wrap(secret, model_id="m", version=3)
        assert len(wrapped) == crypto.NONCE_SIZE + crypto.KEY_SIZE + crypto.TAG_SIZE
        assert secret not in wrapped
        assert kek.wrap(secret, model_id="m", version=3) != wrapped  # fresh IV each time
        assert kek.unwrap(wrapped, model_id="m", version=3, kek_id=kek.kek_id) == secret
        # the token's GCM is standard AES-256-GCM over the same associated data
        assert wrapped[:12] != b"\0" * 12 and len(key_aad("m", 3)) > 0
        for model_id, version in (("m", 4), ("n", 3)):  # moved onto another record
            with pytest.raises(IntegrityError):
                kek.unwrap(wrapped, model_id=model_id, version=version)
        tampered = bytearray(wrapped)
        tampered[20] ^= 1
        with pytest.raises(IntegrityError):
            kek.unwrap(bytes(tampered), model_id="m", version=3)
        with pytest.raises(IntegrityError, match="length"):
            kek.unwrap(wrapped[:-1], model_id="m", version=3)
        with pytest.raises(IntegrityError):
            other.unwrap(wrapped, model_id="m", version=3)
        with pytest.raises(KekUnavailable, match="not " + other.kek_id):
            other.unwrap(wrapped, model_id="m", version=3, kek_id=kek.kek_id)
        # ids are stable per key object and differ between keys
        again = Pkcs11Kek(hsm.uri("kek-a"))
        assert again.kek_id == kek.kek_id != other.kek_id
        assert again.kek_id.startswith("pkcs11:")
        again.close()
    finally:
        kek.close()
        other.close()


def test_the_kek_never_leaves_the_token(hsm):
    import pkcs11

    kek = Pkcs11Kek(hsm.uri("kek-a"))
    try:
        key = kek._key
        A = pkcs11.Attribute
        assert key[A.SENSITIVE] is True and key[A.EXTRACTABLE] is False
        assert key[A.NEVER_EXTRACTABLE] is True and key[A.ALWAYS_SENSITIVE] is True
        assert key[A.WRAP] is False and key[A.UNWRAP] is False
        with pytest.raises(pkcs11.AttributeSensitive):
            key[A.VALUE]
    finally:
        kek.close()


def test_an_extractable_key_is_refused(hsm):
    import pkcs11

    lib = pkcs11.lib(hsm.module)
    token = lib.get_token(token_label=TOKEN)
    kek = Pkcs11Kek(hsm.uri("kek-a"))  # logs this process in; a second login would fail
    try:
        with token.open(rw=True) as rw:
            rw.generate_key(pkcs11.KeyType.AES, 256, label="leaky", store=True,
                            template={pkcs11.Attribute.SENSITIVE: False,
                                      pkcs11.Attribute.EXTRACTABLE: True})
        with pytest.raises(KekUnavailable, match="extractable"):
            Pkcs11Kek(hsm.uri("leaky"))
    finally:
        kek.close()


def test_wrong_pin_missing_token_and_missing_key_are_typed_errors(hsm, monkeypatch):
    wrong = hsm.tmp / "wrong.pin"
    wrong.write_text("not-the-pin\n")
    wrong.chmod(0o600)
    with pytest.raises(KekLoginError, match="refused the PIN") as exc:
        Pkcs11Kek(hsm.uri("any", token=PIN_TOKEN, pin_source=f"file:{wrong}"))
    assert "not-the-pin" not in str(exc.value)
    # the right PIN then logs in (and the key is what is missing)
    monkeypatch.setenv("PIN_TOKEN_PIN", PIN_TOKEN_PIN)
    with pytest.raises(KekObjectNotFound, match="no secret key object='absent'"):
        Pkcs11Kek(hsm.uri("absent", token=PIN_TOKEN, pin_source="env:PIN_TOKEN_PIN"))
    # a token this process is logged into: a different PIN is still refused
    kek = Pkcs11Kek(hsm.uri("kek-a"))
    try:
        with pytest.raises(KekLoginError, match="differs"):
            Pkcs11Kek(hsm.uri("kek-a", pin_source=f"file:{wrong}"))
    finally:
        kek.close()
    with pytest.raises(KekTokenNotFound, match="no token matches token='nope'"):
        Pkcs11Kek(hsm.uri("kek-a", token="nope"))
    with pytest.raises(KekTokenNotFound, match="module not found"):
        Pkcs11Kek(hsm.uri("kek-a").replace(hsm.module, "/nonexistent/libhsm.so"))
    with pytest.raises(ConfigError, match="not set"):
        Pkcs11Kek(hsm.uri("kek-a", pin_source="env:SEALEDTORCH_NO_SUCH_PIN"))
    loose = hsm.tmp / "loose.pin"
    loose.write_text(PIN)
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        Pkcs11Kek(hsm.uri("kek-a", pin_source=f"file:{loose}"))
    # every one of them is a KeyUnavailable (HTTP: no key), none a crash
    assert issubclass(KekLoginError, KekUnavailable)


def test_create_refuses_an_existing_label(hsm):
    with pytest.raises(ConfigError, match="already holds"):
        Pkcs11Kek.create(hsm.uri("kek-a"))


def test_a_lost_session_is_reopened(hsm):
    kek = Pkcs11Kek(hsm.uri("kek-a"))
    try:
        wrapped = kek.wrap(b"k" * 32, model_id="m", version=1)
        kek._login.session.close()  # as if the HSM had restarted
        assert kek.unwrap(wrapped, model_id="m", version=1) == b"k" * 32
    finally:
        kek.close()


def test_concurrent_threads_share_the_token_safely(hsm):
    kek = Pkcs11Kek(hsm.uri("kek-threads"))
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(150):
                secret = crypto.generate_key()
                w = kek.wrap(secret, model_id=f"t{n}", version=i + 1)
                assert kek.unwrap(w, model_id=f"t{n}", version=i + 1) == secret
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kek.close()
    assert not errors


# --------------------------------------------------------------------------- rewrap

@dataclass
class Deployment:
    data: Path
    init: config.InitResult
    platform: sim.SimPlatform
    measurement: bytes

    def policy(self) -> dict[str, object]:
        return {"allow": [{"tee": "sim", "measurement": self.measurement.hex()}]}

    def db(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.data.glob("keyserver.db*"))

    def records(self) -> list[tuple[str, int, bytes | None, str | None]]:
        conn = sqlite3.connect(f"file:{self.data / 'keyserver.db'}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT model_id, version, wrapped, kek_id FROM key_versions "
                                "ORDER BY model_id, version").fetchall()
        finally:
            conn.close()

    def kek_section(self) -> dict[str, object]:
        return dict(json.loads((self.data / "keyserver.json").read_text())["kek"])

    def audit_records(self) -> list[audit.AuditRecord]:
        store = SqliteStore(self.data / "keyserver.db")
        try:
            with store.snapshot() as tx:
                return tx.audit_records()
        finally:
            store.close()


def _deployment(tmp: Path) -> Deployment:
    init = config.init_data_dir(tmp / "data", now=time.time())
    return Deployment(tmp / "data", init, sim.init_platform(tmp / "sim"),
                      measure.measurement(b"kek-tests"))


def _seed(dep: Deployment, n: int, prefix: str = "m") -> dict[tuple[str, int], bytes]:
    """``n`` models with two key versions each, straight into the store (fast)."""
    kek = FileKek.load(dep.data / "kek.json")
    store = SqliteStore(dep.data / "keyserver.db")
    secrets: dict[tuple[str, int], bytes] = {}
    try:
        now = time.time()
        for i in range(n):
            model_id = f"{prefix}{i:04d}"
            with store.transaction() as tx:
                tx.insert_model(ModelRecord(model_id, dep.policy(), "d" * 64, now, now))
                for version in (1, 2):
                    secret = crypto.generate_key()
                    secrets[model_id, version] = secret
                    tx.insert_key(KeyRecord(model_id, version, KeyState.ACTIVE,
                                            kek.wrap(secret, model_id=model_id,
                                                     version=version), kek.kek_id, now))
    finally:
        store.close()
    return secrets


def _check_all_unwrap(dep: Deployment, secrets: dict[tuple[str, int], bytes]) -> None:
    """Every record unwraps, under the KEK it names, to its key (a fresh ring)."""
    cfg = config.load_config(dep.data)
    ring = open_ring(cfg.kek, data_dir=dep.data, config_file=None)
    try:
        rows = dep.records()
        assert len(rows) == len(secrets)
        for model_id, version, wrapped, kek_id in rows:
            assert wrapped is not None
            assert ring.unwrap(wrapped, model_id=model_id, version=version,
                               kek_id=kek_id) == secrets[model_id, version]
    finally:
        ring.close()


def _kek_moves(dep: Deployment) -> list[tuple[str, int]]:
    return [(r.body["model_id"], r.body["version"]) for r in dep.audit_records()
            if r.event == "kek.rewrap"]


def test_rewrap_file_to_pkcs11_while_the_server_releases_keys(hsm, tmp_path):
    dep = _deployment(tmp_path)
    file_id = FileKek.load(dep.data / "kek.json").kek_id
    srv = server.BackgroundServer.start(dep.init.config,
                                        trust_sim_roots=[tmp_path / "sim" / sim.PUB_FILE])
    ca = dep.init.ca_file
    keys = {}
    try:
        with AdminClient.from_token_file(srv.url, ca, dep.init.admin_token_file) as admin:
            for i in range(24):
                key = ModelKey.generate(f"model-{i:02d}")
                admin.register(key, dep.policy())
                keys[key.model_id] = key.secret
        stop = threading.Event()
        failures: list[BaseException] = []
        released = [0]

        def reader(n: int) -> None:
            attester = SimAttester(dep.platform, dep.measurement)
            try:
                with AttestedKeyClient(srv.url, ca, attester) as client:
                    i = n
                    while not stop.is_set():
                        model_id = f"model-{i % len(keys):02d}"
                        got = client.fetch(model_id)
                        assert got.model_key.secret == keys[model_id], model_id
                        released[0] += 1
                        i += 1
            except BaseException as exc:
                failures.append(exc)

        readers = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
        for t in readers:
            t.start()
        seen: list[str] = []

        def progress(done: int, total: int, rec: KeyRecord, old: str | None,
                     new: str) -> None:
            seen.append(rec.model_id)
            time.sleep(0.02)  # let releases interleave with the moves

        target = hsm.uri("kek-b")
        report = rewrap(dep.data, target, progress=progress)
        time.sleep(0.2)
        stop.set()
        for t in readers:
            t.join(timeout=30)
        assert not failures, failures[0]
        assert released[0] > 24, released[0]

        hsm_id = report.target
        assert hsm_id.startswith("pkcs11:") and report.moved == 24 and report.switched
        assert report.usage == {hsm_id: 24}
        assert sorted(seen) == sorted(keys)
        assert {r[3] for r in dep.records()} == {hsm_id}
        section = dep.kek_section()
        assert section["type"] == "pkcs11" and section["kek_id"] == hsm_id
        assert section["fallback"] == [{"type": "file", "path": "kek.json", "kek_id": file_id}]

        # the running server switched without a restart: new keys go under the HSM KEK
        with AdminClient.from_token_file(srv.url, ca, dep.init.admin_token_file) as admin:
            late = ModelKey.generate("late-model")
            admin.register(late, dep.policy())
        assert [r[3] for r in dep.records() if r[0] == "late-model"] == [hsm_id]
        with AttestedKeyClient(srv.url, ca, SimAttester(dep.platform, dep.measurement)) as c:
            assert {k.model_key.model_id: k.model_key.secret for k in c.fetch_all()} == \
                {**keys, "late-model": late.secret}

        # nothing references the file KEK any more: --prune drops it from the config
        again = rewrap(dep.data, target, prune=True)
        assert again.moved == 0 and not again.switched and again.pruned == [file_id]
        assert "fallback" not in dep.kek_section()
        with AttestedKeyClient(srv.url, ca, SimAttester(dep.platform, dep.measurement)) as c:
            assert c.fetch("model-03").model_key.secret == keys["model-03"]
    finally:
        srv.stop()

    # at rest: no plaintext key anywhere in the database files, every move audited once
    blob = dep.db()
    for secret in [*keys.values(), late.secret]:
        assert secret not in blob
    assert sorted(m for m, _ in _kek_moves(dep)) == sorted(keys)
    assert audit.verify_chain(dep.audit_records()).ok
    status = kek_status(dep.data)
    assert [(s.role, s.kek_id, s.records) for s in status] == [("active", hsm_id, 25)]


def test_an_interrupted_rewrap_resumes_and_moves_each_key_once(hsm, tmp_path):
    dep = _deployment(tmp_path)
    secrets = _seed(dep, 15)  # 30 records
    file_id = FileKek.load(dep.data / "kek.json").kek_id

    class Crash(Exception):
        pass

    def crash_after_11(done: int, *_: object) -> None:
        if done == 11:
            raise Crash

    with pytest.raises(Crash):
        rewrap(dep.data, hsm.uri("kek-a"), progress=crash_after_11, batch=8)
    target = Pkcs11Kek(hsm.uri("kek-a"))
    hsm_id = target.kek_id
    target.close()
    under = [r[3] for r in dep.records()]
    assert under.count(hsm_id) == 11 and under.count(file_id) == 19
    # mid-way: the target is staged read-only, the file KEK still active; all keys readable
    section = dep.kek_section()
    assert section["type"] == "file"
    assert [f["kek_id"] for f in section["fallback"]] == [hsm_id]
    _check_all_unwrap(dep, secrets)

    report = rewrap(dep.data, hsm.uri("kek-a"), batch=8)
    assert report.moved == 19 and report.switched and report.usage == {hsm_id: 30}
    _check_all_unwrap(dep, secrets)
    moves = _kek_moves(dep)
    assert len(moves) == 30 and len(set(moves)) == 30  # none moved twice

    # a third run has nothing to do; back to a new file KEK works the same way
    assert rewrap(dep.data, hsm.uri("kek-a")).moved == 0
    back = rewrap(dep.data, "file:" + str(dep.data / "kek-2.json"))
    assert back.moved == 30 and dep.kek_section()["path"] == "kek-2.json"
    _check_all_unwrap(dep, secrets)
    blob = dep.db()
    assert not any(s in blob for s in secrets.values())


def test_a_killed_rewrap_process_resumes(hsm, tmp_path):
    dep = _deployment(tmp_path)
    secrets = _seed(dep, 200)  # 400 records, one fsynced transaction each
    target = hsm.uri("kek-b")
    cmd = [sys.executable, "-m", "sealedtorch.cli", "keyserver", "rewrap",
           "--data", str(dep.data), "--to", target]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=hsm.env())
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[20/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (lines, err)
    moved_before = len(_kek_moves(dep))
    assert 20 <= moved_before < 400
    _check_all_unwrap(dep, secrets)

    done = subprocess.run(cmd, capture_output=True, text=True, env=hsm.env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout and f"{400 - moved_before} moved" in done.stdout
    assert PIN not in done.stdout + done.stderr
    _check_all_unwrap(dep, secrets)
    moves = _kek_moves(dep)
    assert len(moves) == 400 and len(set(moves)) == 400
    assert {r[3] for r in dep.records()} == {dep.kek_section()["kek_id"]}

    status = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "keyserver", "kek",
                             "status", "--data", str(dep.data)], capture_output=True,
                            text=True, env=hsm.env(), timeout=60)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].startswith("active")
    assert "400 record(s)" in status.stdout and "fallback" in status.stdout


def test_kek_create_cli_and_a_rewrap_with_a_wrong_pin(hsm, tmp_path):
    env = {**hsm.env(), "KEK_PIN": PIN}
    uri = hsm.uri("kek-cli", pin_source="env:KEK_PIN")
    out = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "keyserver", "kek",
                          "create", uri], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "created pkcs11:" in out.stdout and PIN not in out.stdout

    dep = _deployment(tmp_path)
    _seed(dep, 2)
    env["KEK_PIN"] = "wrong-" + PIN
    bad = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "keyserver", "rewrap",
                          "--data", str(dep.data), "--to", uri], capture_output=True,
                         text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert "KekLoginError" in bad.stderr and "refused the PIN" in bad.stderr
    assert PIN not in bad.stderr
    assert dep.kek_section() == {"type": "file", "path": "kek.json"}  # nothing staged


# --------------------------------------------------------------------------- row MACs

def test_row_macs_are_made_and_checked_in_the_token(hsm):
    kek = Pkcs11Kek(hsm.uri("kek-a"))
    other = Pkcs11Kek(hsm.uri("kek-b"))
    try:
        row = b'["sealedtorch/keyserver/row/v1","models","m"]'
        tag, again = kek.mac(row), kek.mac(row)
        assert tag != again  # a fresh IV each time, and both verify
        assert kek.verify_mac(row, tag) and kek.verify_mac(row, again)
        assert not kek.verify_mac(row.replace(b'"m"', b'"n"'), tag)
        assert not kek.verify_mac(row, tag[:-1] + bytes([tag[-1] ^ 1]))
        assert not kek.verify_mac(row, tag[:-1])
        assert not other.verify_mac(row, tag)  # another KEK in the same token
        assert not kek.verify_mac(row, FileKek(crypto.generate_key()).mac(row))
    finally:
        kek.close()
        other.close()


def _db_rows(dep: Deployment, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{dep.data / 'keyserver.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_rewrap_to_the_hsm_moves_row_macs_and_tampering_stays_refused(hsm, tmp_path):
    dep = _deployment(tmp_path)
    target = hsm.uri("kek-rows")
    srv = server.BackgroundServer.start(dep.init.config,
                                        trust_sim_roots=[tmp_path / "sim" / sim.PUB_FILE])
    ca = dep.init.ca_file
    try:
        key = ModelKey.generate("sealed-row-model")
        with AdminClient.from_token_file(srv.url, ca, dep.init.admin_token_file) as admin:
            admin.register(key, dep.policy())
            admin.create_token("owner", "olive")
        report = rewrap(dep.data, target, prune=True)
        hsm_id = report.target
        assert report.switched and report.remacced == 4  # model, key, two tokens
        assert report.pruned  # nothing is MAC'd or wrapped under the file KEK any more
        for table in ("models", "key_versions", "admin_tokens"):
            assert {r[0] for r in _db_rows(dep, f"SELECT mac_kek FROM {table}")} == {hsm_id}
        (marker,) = _db_rows(dep, "SELECT value FROM meta WHERE key = 'row_macs'")
        assert str(marker[0]).startswith(hsm_id + " ")
        attester = SimAttester(dep.platform, dep.measurement)
        with AttestedKeyClient(srv.url, ca, attester) as client:
            assert client.fetch("sealed-row-model").model_key == key
        with AdminClient.from_token_file(srv.url, ca, dep.init.admin_token_file) as admin:
            assert all(t["intact"] for t in admin.list_tokens())

        # a database writer admits another runtime: refused by the token's GMAC check
        evil = measure.measurement(b"not-the-owners-runtime")
        policy = json.dumps({"allow": [{"measurement": evil.hex(), "tee": "sim"}]})
        subprocess.run([sys.executable, "-c",
                        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                        "c.execute('UPDATE models SET policy = ?', (sys.argv[2],)); c.commit()",
                        str(dep.data / "keyserver.db"), policy], check=True, timeout=60)
        with AttestedKeyClient(srv.url, ca, SimAttester(dep.platform, evil)) as client:
            with pytest.raises(IntegrityError):
                client.fetch("sealed-row-model")
    finally:
        srv.stop()
    assert audit.verify_chain(dep.audit_records()).ok
