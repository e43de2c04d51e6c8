"""Attested key release end to end: real server, real TLS, real HTTP client, sim evidence."""

from __future__ import annotations

import base64
import logging
import sqlite3

import pytest

from sealedtorch import crypto
from sealedtorch.attest import measure
from sealedtorch.errors import KeyUnavailable, PolicyDenied
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import protocol


def test_fetch_one_key_matches_the_owners(ks, model_id):
    key = ks.register(model_id)
    with ks.client() as client:
        released = client.fetch(model_id)
        assert released.model_key == key
        assert released.policy.digest() == released.policy_digest
        mk, policy = released  # a named pair, for the keycache
        assert mk == key and policy.allow[0].tee == "sim"
        assert client.get_key(model_id) == key  # KeySource
        assert client.result is not None and client.result.insecure


def test_fetch_all_returns_every_allowed_model_and_nothing_else(ks, model_id):
    mine = ks.register(model_id + "-a")
    other = ks.register(model_id + "-b", ks.policy(measurement=b"\x01" * 48))
    with ks.client() as client:
        got = {(r.model_key.model_id, r.model_key.version): r.model_key
               for r in client.fetch_all()}
    assert got[(mine.model_id, 1)] == mine
    assert all(mid != other.model_id for mid, _ in got)


def test_release_is_hpke_sealed_to_the_attested_key_with_bound_info(ks, model_id):
    """The raw protocol: only the attested ephemeral key opens it, and only with the info
    that names model, version and policy digest."""
    key = ks.register(model_id)
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        nonce = ks.challenge(http)
        r = http.post("/v1/attest", json=ks.attest_body(nonce, kp.public_bytes))
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        r = http.get(f"/v1/keys/{model_id}", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    item = r.json()["keys"][0]
    assert "key" not in item and key.secret.hex() not in r.text
    sealed = base64.b64decode(item["sealed_key"])
    info = protocol.release_info(model_id, 1, item["policy_digest"])
    assert kp.open(sealed, info=info) == key.secret
    with pytest.raises(Exception):
        kp.open(sealed, info=protocol.release_info(model_id, 2, item["policy_digest"]))
    with pytest.raises(Exception):
        crypto.EphemeralKeyPair.generate().open(sealed, info=info)


def test_holder_and_runtime_roles_use_holders_and_allow(ks, model_id):
    holder_m = measure.measurement(b"keycache")
    ks.register(model_id, ks.policy(holders=[{"tee": "sim", "measurement": holder_m.hex()}]))
    cache = ks.attester(holder_m)
    with ks.client("holder", cache) as client:
        assert client.fetch(model_id).model_key.model_id == model_id
    with ks.client("runtime", cache) as client, pytest.raises(PolicyDenied) as err:
        client.fetch(model_id)
    # the caller learns nothing about the policy (issue 11 §3); the audit record says why
    assert err.value.reasons == ()
    assert any("measurement" in r for r in ks.last_audit()["reasons"])
    with ks.client("holder") as client, pytest.raises(PolicyDenied):
        client.fetch(model_id)  # the runtime's identity is not a holder here
    with ks.client("runtime") as client:
        client.fetch(model_id)


def test_rotation_keeps_old_versions_until_retired(ks, model_id):
    v1 = ks.register(model_id)
    with ks.admin() as admin:
        version, v2 = admin.rotate(model_id)  # generated server-side, sealed back to us
        assert version == 2 and v2 is not None and v2.secret != v1.secret
        v3 = ModelKey.generate(model_id, 3)
        assert admin.rotate(model_id, v3) == (3, None)
        with ks.client() as client:
            assert client.fetch(model_id).model_key == v3
            assert client.fetch(model_id, 1).model_key == v1
            assert client.fetch(model_id, 2).model_key == v2
            assert {r.model_key.version for r in client.fetch_all()
                    if r.model_key.model_id == model_id} == {1, 2, 3}
            admin.retire(model_id, 1, reason="old files re-sealed")
            with pytest.raises(KeyUnavailable, match="retired") as err:
                client.fetch(model_id, 1)
            assert err.value.http_status == 410
            assert {r.model_key.version for r in client.fetch_all()
                    if r.model_key.model_id == model_id} == {2, 3}
    wrapped = ks._query(f"SELECT version, wrapped IS NULL FROM key_versions "
                        f"WHERE model_id = '{model_id}' ORDER BY version")
    assert wrapped == [(1, 1), (2, 0), (3, 0)]  # a retired key is erased


def test_revocation_applies_immediately_even_to_a_live_token(ks, model_id):
    ks.register(model_id)
    with ks.client() as client:
        client.fetch(model_id)
        with ks.admin() as admin:
            admin.revoke(model_id, reason="compromised")
        with pytest.raises(KeyUnavailable, match="revoked") as err:
            client.fetch(model_id)
        assert err.value.http_status == 410
        assert all(r.model_key.model_id != model_id for r in client.fetch_all())


def test_policy_change_applies_to_the_next_fetch(ks, model_id):
    ks.register(model_id)
    with ks.client() as client:
        client.fetch(model_id)
        with ks.admin() as admin:
            admin.set_policy(model_id, ks.policy(measurement=b"\x02" * 48))
        with pytest.raises(PolicyDenied):
            client.fetch(model_id)


def test_client_reattests_when_its_token_expires(ks, model_id):
    ks.register(model_id)
    with ks.client() as client:
        client.fetch(model_id)
        first = client.result
        ks.clock.advance(ks.srv.service.token_ttl + 1)
        client.fetch(model_id)  # 401 from the server, then a fresh attestation
        assert client.result is not None and client.result.token != first.token


def test_no_secret_in_logs_and_no_plaintext_key_in_the_database(ks, model_id, caplog):
    caplog.set_level(logging.DEBUG)
    with ks.admin() as admin:
        key = ks.register(model_id)
        _, generated = admin.rotate(model_id)
    with ks.client() as client:
        got = [r.model_key for r in client.fetch_all()]
        assert key in got and generated in got
    admin_token = ks.init.admin_token_file.read_text().strip()
    forbidden = [admin_token, admin_token[4:]]
    for secret in (key.secret, generated.secret):
        forbidden += [secret.hex(), base64.b64encode(secret).decode(),
                      protocol.b64url(secret), repr(secret)[2:-1]]
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "release" in text  # the capture did see the release
    for s in forbidden:
        assert s not in text
    # The database (and its WAL) holds only wrapped keys.
    conn = sqlite3.connect(ks.db)
    conn.execute("PRAGMA wal_checkpoint(FULL)")
    conn.close()
    for path in ks.db.parent.glob("keyserver.db*"):
        raw = path.read_bytes()
        for secret in (key.secret, generated.secret):
            assert secret not in raw
            assert base64.b64encode(secret) not in raw and secret.hex().encode() not in raw


def test_sim_release_is_audited_as_insecure(ks, model_id):
    ks.register(model_id)
    with ks.client() as client:
        client.fetch(model_id)
    rec = ks.last_audit()
    assert rec["event"] == "release" and rec["decision"] == "allow"
    assert rec["insecure"] is True and rec["claims"]["tee"] == "sim"
    assert rec["policy_digest"] and rec["evidence_digest"] and rec["client"] == "127.0.0.1"


def test_health_readiness_and_openapi(ks):
    with ks.http() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json() == {"status": "ready"}
        spec = http.get("/v1/openapi.json").json()
    for path in ("/v1/attest/challenge", "/v1/attest", "/v1/keys", "/v1/keys/{model_id}",
                 "/v1/admin/models", "/v1/admin/rotations", "/v1/admin/revocations"):
        assert path in spec["paths"], path
