"""The local channel, end to end on a real Unix socket: runtimes (KeycacheClient with sim
evidence) against a keycache server thread, fed by a scripted upstream."""

from __future__ import annotations

import base64
import logging
import os
import socket
import stat
import threading

import httpx
import pytest
import torch

import sealedtorch
from sealedtorch import cli, crypto
from sealedtorch.attest import binding, measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import (
    AttestationError,
    BindingError,
    ConfigError,
    KeyUnavailable,
    PolicyDenied,
    RequestError,
)
from sealedtorch.keycache import KeycacheClient, KeycacheUnavailable, KeysStale
from sealedtorch.keycache.local import AnswerSigner, PeerAppraiser, self_claims
from sealedtorch.keycache.server import bind_unix_socket
from sealedtorch.keys import ModelKey

from .conftest import OTHER_MEASUREMENT, RUNTIME_MEASUREMENT, keycache_rules, sim_policy

POLICY = sim_policy()


def _raw(sock_path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path)),
                        base_url="http://keycache", timeout=10)


def _key_body(http: httpx.Client, attester, model_id="m", *, bind_key=None, nonce=None):
    if nonce is None:
        nonce = base64.b64decode(http.post("/v1/challenge").json()["nonce"])
    pk = crypto.EphemeralKeyPair.generate().public_bytes
    ev = attester.evidence(binding.report_data(nonce, bind_key or pk))
    return {"model_id": model_id, "nonce": base64.b64encode(nonce).decode(),
            "public_key": base64.b64encode(pk).decode(), "evidence": ev.to_json()}


def test_runtime_gets_the_key_and_loads_a_sealed_file(start_keycache, runtime, tmp_path):
    key = ModelKey.generate("resnet-test")
    kc = start_keycache([(key, POLICY)])
    state = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int64)}
    sealedtorch.seal(state, tmp_path / "m.sealed", key=key)
    client = kc.client(runtime)
    assert client.get_key("resnet-test") == key
    assert client.get_key("resnet-test", 1) == key
    loaded = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=client)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    assert kc.keycache.released == 3


def test_socket_and_directory_permissions(start_keycache, runtime, short_dir):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)])
    assert stat.S_ISSOCK(os.lstat(kc.socket).st_mode)
    assert stat.S_IMODE(os.lstat(kc.socket).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(kc.socket.parent).st_mode) == 0o750
    assert [p.name for p in kc.socket.parent.iterdir()] == ["keycache.sock"]  # no staging left
    with pytest.raises(ConfigError, match="already serving"):
        bind_unix_socket(kc.socket)
    kc.server.stop()
    assert not kc.socket.exists()  # removed on shutdown


def test_a_stale_socket_is_replaced_and_a_non_socket_refused(short_dir):
    leftover = short_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(leftover))
    s.close()  # bound, never listening: what a crash leaves behind
    sock = bind_unix_socket(leftover)
    sock.close()
    (short_dir / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_unix_socket(short_dir / "file")


def test_versions_latest_and_unknown_models(start_keycache, runtime):
    k1, k2 = ModelKey.generate("m", 1), ModelKey.generate("m", 2)
    kc = start_keycache([(k1, POLICY), (k2, POLICY)])
    client = kc.client(runtime)
    assert client.get_key("m") == k2
    assert client.get_key("m", 1) == k1
    with pytest.raises(KeyUnavailable, match=r"version 7 .*holds version\(s\) 1, 2"):
        client.get_key("m", 7)
    with pytest.raises(KeyUnavailable, match="no key for model 'unknown-model'"):
        client.get_key("unknown-model")


def test_a_runtime_the_policy_does_not_allow_is_refused_with_the_reason(
        start_keycache, platform):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)])
    intruder = kc.client(SimAttester(platform, OTHER_MEASUREMENT))
    with pytest.raises(PolicyDenied) as info:
        intruder.get_key("m")
    assert "policy of model 'm' does not allow this runtime" in str(info.value)
    assert any(f"measurement: expected {RUNTIME_MEASUREMENT.hex()}, got "
               f"{OTHER_MEASUREMENT.hex()}" in r for r in info.value.reasons)
    debug = kc.client(SimAttester(platform, RUNTIME_MEASUREMENT, debug=True))
    with pytest.raises(PolicyDenied, match="debug: expected false"):
        debug.get_key("m")
    assert kc.keycache.refused == 2


def test_evidence_from_an_untrusted_sim_platform_is_refused(start_keycache, tmp_path):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)])
    rogue = sim.init_platform(tmp_path / "rogue")
    with pytest.raises(AttestationError, match="not among the 1 this relying party trusts"):
        kc.client(SimAttester(rogue, RUNTIME_MEASUREMENT)).get_key("m")


def test_replayed_and_rebound_requests_are_refused(start_keycache, runtime):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)])
    with _raw(kc.socket) as http:
        body = _key_body(http, runtime)
        first = http.post("/v1/key", json=body)
        assert first.status_code == 200
        replay = http.post("/v1/key", json=body)
        assert replay.status_code == 403
        assert replay.json()["problem"] == "nonce"
        assert "already used" in replay.json()["detail"]
        # evidence bound to another public key than the one sent
        other = crypto.EphemeralKeyPair.generate().public_bytes
        rebound = http.post("/v1/key", json=_key_body(http, runtime, bind_key=other))
        assert rebound.status_code == 403 and rebound.json()["problem"] == "binding"
        # a nonce this keycache never issued
        forged = http.post("/v1/key", json=_key_body(http, runtime,
                                                     nonce=crypto.random_bytes(32)))
        assert forged.status_code == 403 and forged.json()["problem"] == "nonce"
        # the sealed key opens only with this request's context
        body = _key_body(http, runtime)
        sealed = base64.b64decode(http.post("/v1/key", json=body).json()["sealed_key"])
        assert len(sealed) > 32


def test_an_expired_nonce_is_refused(start_keycache, runtime):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)], nonce_ttl=5)
    with _raw(kc.socket) as http:
        body = _key_body(http, runtime)
        kc.clock.advance(6)
        r = http.post("/v1/key", json=body)
        assert r.status_code == 403 and "expired" in r.json()["detail"]


@pytest.mark.parametrize(("content", "needle"), [
    (b"not json", "not valid JSON"),
    (b"[]", "malformed key request"),
    (b'{"model_id": "m"}', "nonce: Field required"),
    (b'{"model_id": "m", "nonce": "!!", "public_key": "AAAA"}', "nonce: not valid base64"),
    (b'{"model_id": "m", "nonce": "AAAA", "public_key": "AAAA"}', "expected 32 bytes"),
    (b'{"model_id": "../etc", "nonce": "AAAA", "public_key": "AAAA"}', "invalid model id"),
    (b'{"model_id": "m", "version": "1", "nonce": "", "public_key": ""}', "version"),
    (b'{"model_id": "m", "nonce": "", "public_key": "", "extra": 1}', "extra"),
    (b'{"model_id": "m", "nonce": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", '
     b'"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", '
     b'"evidence": {"tee": "tpm", "evidence": ""}}', "unknown TEE 'tpm'"),
])
def test_garbage_requests_get_clear_errors(start_keycache, content, needle):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)])
    with _raw(kc.socket) as http:
        r = http.post("/v1/key", content=content,
                      headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["problem"] == "bad-request" and needle in r.json()["detail"]
        big = http.post("/v1/key", content=b"x" * (2 << 20))
        assert big.status_code == 413 and "too large" in big.json()["detail"]
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/health").json()["ok"] is True


def test_errors_map_back_to_typed_exceptions_in_the_client(start_keycache, runtime, monkeypatch):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)])
    client = kc.client(runtime)
    monkeypatch.setattr(runtime, "evidence",
                        lambda rd: SimAttester.evidence(runtime, bytes(64)))
    with pytest.raises(BindingError):
        client.get_key("m")
    with pytest.raises(RequestError):
        client._call("POST", "/key", {"model_id": "m"})


def test_cached_nonces_are_reused_and_recovered_from(start_keycache, runtime):
    kc = start_keycache([(ModelKey.generate("m"), POLICY)])
    client = kc.client(runtime)
    client.get_key("m")
    assert len(client._nonces) == 1  # the answer carried the next nonce
    client.get_key("m")
    # the keycache forgets every nonce (as after a restart): the client retries once
    kc.keycache.nonces._pending.clear()
    assert client.get_key("m").model_id == "m"


def test_two_hundred_concurrent_runtimes(start_keycache, platform):
    keys = [ModelKey.generate(f"model-{i}", v) for i in range(4) for v in (1, 2)]
    kc = start_keycache([(k, POLICY) for k in keys])
    client = kc.client(SimAttester(platform, RUNTIME_MEASUREMENT))
    denied_client = kc.client(SimAttester(platform, OTHER_MEASUREMENT))
    barrier = threading.Barrier(200)
    results: list[object] = [None] * 200

    def one(i: int) -> None:
        model_id, version = f"model-{i % 4}", 1 + (i // 4) % 2
        barrier.wait()
        try:
            if i % 25 == 0:
                results[i] = denied_client.get_key(model_id, version)
            else:
                results[i] = client.get_key(model_id, version)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    by_id = {(k.model_id, k.version): k for k in keys}
    for i, got in enumerate(results):
        if i % 25 == 0:
            assert isinstance(got, PolicyDenied), got
        else:
            assert got == by_id[(f"model-{i % 4}", 1 + (i // 4) % 2)], (i, got)
    assert kc.keycache.released == 192 and kc.keycache.refused == 8


def test_revocation_rotation_and_staleness_through_refreshes(start_keycache, runtime):
    k1, k2 = ModelKey.generate("m", 1), ModelKey.generate("m", 2)
    gone = ModelKey.generate("gone")
    kc = start_keycache([(k1, POLICY), (gone, POLICY)], max_stale=100)
    client = kc.client(runtime)
    assert client.get_key("m") == k1 and client.get_key("gone") == gone
    kc.upstream.answer = [(k1, POLICY), (k2, POLICY)]  # rotated; "gone" revoked
    assert kc.keycache.refresh_once()
    assert client.get_key("m") == k2
    with pytest.raises(KeyUnavailable):
        client.get_key("gone")
    # keyserver down: keys still served until max-stale, then refused with a clear error
    from sealedtorch.keycache.upstream import UpstreamUnavailable

    kc.upstream.answer = UpstreamUnavailable("keyserver https://ks unreachable: ConnectError")
    kc.clock.advance(60)
    assert not kc.keycache.refresh_once()
    assert client.get_key("m") == k2
    status = client.status()
    assert status["keyserver_reachable"] is False and status["serving"] is True
    assert "unreachable" in status["refresh"]["last_error"]
    kc.clock.advance(41)
    with pytest.raises(KeysStale, match="stale") as info:
        client.get_key("m")
    assert info.value.http_status == 503
    assert not kc.keycache.refresh_once() and len(kc.keycache.store) == 0  # wiped
    assert client.status()["stale"] is True
    # back: served again after one successful refresh
    kc.upstream.answer = [(k2, POLICY)]
    assert kc.keycache.refresh_once()
    assert client.get_key("m") == k2


def test_background_refresher_picks_up_changes(start_keycache, runtime):
    k1, k2 = ModelKey.generate("bg", 1), ModelKey.generate("bg", 2)
    kc = start_keycache([(k1, POLICY)], refresh=0.05)
    kc.keycache.start()
    kc.upstream.answer = [(k2, POLICY)]
    client = kc.client(runtime)
    for _ in range(200):
        if kc.upstream.calls >= 3:
            break
        threading.Event().wait(0.02)
    assert client.get_key("bg") == k2
    with pytest.raises(KeyUnavailable):
        client.get_key("bg", 1)
    kc.upstream.answer = ValueError("garbage")  # the refresher survives anything
    calls = kc.upstream.calls
    for _ in range(200):
        if kc.upstream.calls >= calls + 3:
            break
        threading.Event().wait(0.02)
    assert kc.keycache._thread is not None and kc.keycache._thread.is_alive()
    assert client.get_key("bg") == k2


def test_status_and_the_cli_never_show_key_bytes(start_keycache, runtime, capsys):
    keys = [ModelKey.generate("alpha", 1), ModelKey.generate("alpha", 2),
            ModelKey.generate("beta")]
    kc = start_keycache([(k, POLICY) for k in keys])
    assert cli.main(["keycache", "status", "--socket", str(kc.socket)]) == 0
    out = capsys.readouterr().out
    assert "serving; keyserver reachable" in out and "keys held: 3" in out
    assert "alpha" in out and "beta" in out
    assert cli.main(["keycache", "status", "--socket", str(kc.socket), "--json"]) == 0
    raw = capsys.readouterr().out
    import json

    st = json.loads(raw)
    assert [(k["model_id"], k["version"], k["latest"]) for k in st["keys"]] == \
        [("alpha", 1, False), ("alpha", 2, True), ("beta", 1, True)]
    for k in keys:
        for text in (out, raw):
            assert k.secret.hex() not in text
            assert base64.b64encode(k.secret).decode() not in text
    kc.upstream.answer = []
    kc.keycache.refresh_once()
    kc.clock.advance(61)
    assert cli.main(["keycache", "status", "--socket", str(kc.socket)]) == 1
    assert "STALE" in capsys.readouterr().out


def test_status_when_no_keycache_runs(short_dir, capsys, platform):
    assert cli.main(["keycache", "status", "--socket", str(short_dir / "none.sock")]) == 2
    assert "no socket at" in capsys.readouterr().err
    with pytest.raises(KeycacheUnavailable):
        KeycacheClient(short_dir / "none.sock",
                       keycache_rules=keycache_rules(platform)).get_key("m")


def test_peer_credentials_are_logged_and_keys_are_not(start_keycache, runtime, caplog):
    key = ModelKey.generate("m")
    kc = start_keycache([(key, POLICY)])
    with caplog.at_level(logging.INFO, logger="sealedtorch"):
        kc.client(runtime).get_key("m")
        with pytest.raises(PolicyDenied):
            kc.client(SimAttester(runtime.platform, OTHER_MEASUREMENT)).get_key("m")
    me = f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}"
    assert any("released m version 1" in r.getMessage() and me in r.getMessage()
               for r in caplog.records)
    assert any("refused m" in r.getMessage() and me in r.getMessage() for r in caplog.records)
    assert key.secret.hex() not in caplog.text
    assert base64.b64encode(key.secret).decode() not in caplog.text


def test_peer_mode_inside_one_vm(start_keycache, platform):
    """One confidential VM: no evidence per request, the VM's claims + a uid allow-list.
    (The VM's claims come from the keycache attesting itself; sim stands in for TDX here.)"""
    from sealedtorch.attest import VerifierConfig

    vm = SimAttester(platform, RUNTIME_MEASUREMENT)
    claims = self_claims(vm, VerifierConfig(sim_platform_keys=(platform.public_key,)))
    key = ModelKey.generate("m")
    # one VM, one identity: the keycache's answer evidence reports the VM's measurement
    vm_rules = keycache_rules(platform, RUNTIME_MEASUREMENT)
    kc = start_keycache([(key, POLICY)], signer=AnswerSigner(vm),
                        appraiser=PeerAppraiser(claims, allowed_uids=[os.getuid()]))
    client = kc.client(vm, keycache_rules=vm_rules)
    assert client.get_key("m") == key
    kc2 = start_keycache([(key, POLICY)], socket_name="run2/kc.sock", signer=AnswerSigner(vm),
                         appraiser=PeerAppraiser(claims, allowed_uids=[os.getuid() + 1]))
    with pytest.raises(PolicyDenied, match=f"uid={os.getuid()} .*not among the allowed uids"):
        kc2.client(vm, keycache_rules=vm_rules).get_key("m")
    with pytest.raises(ValueError, match="allow-list"):
        PeerAppraiser(claims)


def test_uid_allow_list_applies_to_evidence_mode_too(start_keycache, runtime, platform):
    from sealedtorch.attest import VerifierConfig
    from sealedtorch.keycache.local import EvidenceAppraiser

    appraiser = EvidenceAppraiser(VerifierConfig(sim_platform_keys=(platform.public_key,)),
                                  tees=["sim"], allowed_gids=[os.getgid() + 1])
    kc = start_keycache([(ModelKey.generate("m"), POLICY)], appraiser=appraiser)
    with pytest.raises(PolicyDenied, match="not among the allowed gids"):
        kc.client(runtime).get_key("m")


def test_measurement_helper_matches_the_runtime():
    assert RUNTIME_MEASUREMENT == measure.measurement(b"keycache-tests: runtime")
