"""Every bad request gets its own problem response and one audit record, and changes nothing
in the store (models, key versions)."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from sealedtorch import crypto
from sealedtorch.attest import sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.keyserver import protocol
from sealedtorch.keyserver.tokens import TokenSigner

PROBLEM = "application/problem+json"


class Outcome:
    response: httpx.Response
    body: dict


@contextlib.contextmanager
def refused(ks, status: int, problem: str, records: int = 1) -> Iterator[Outcome]:
    """Run the block's request (assign ``out.response``) and check it was refused with
    ``problem``, audited once, and left models and keys alone."""
    before, count = ks.state(), ks.audit_count()
    out = Outcome()
    yield out
    r = out.response
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["type"] == f"urn:sealedtorch:problem:{problem}"
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["request_id"] == r.headers["x-request-id"]
    out.body = body
    assert ks.state() == before
    assert ks.audit_count() == count + records
    rec = ks.last_audit()
    assert rec["decision"] in ("deny", "error") and rec["problem"] == problem
    assert rec["request_id"] == body["request_id"]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(ks, http) -> str:
    kp = crypto.EphemeralKeyPair.generate()
    r = http.post("/v1/attest", json=ks.attest_body(ks.challenge(http), kp.public_bytes))
    assert r.status_code == 200, r.text
    return r.json()["token"]


# --------------------------------------------------------------------------- nonces

def test_replayed_nonce(ks):
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        body = ks.attest_body(ks.challenge(http), kp.public_bytes)
        assert http.post("/v1/attest", json=body).status_code == 200
        with refused(ks, 403, "nonce") as out:
            out.response = http.post("/v1/attest", json=body)
    assert "already used" in out.body["detail"]


def test_expired_nonce(ks):
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        body = ks.attest_body(ks.challenge(http), kp.public_bytes)
        ks.clock.advance(61)
        with refused(ks, 403, "nonce") as out:
            out.response = http.post("/v1/attest", json=body)
    assert "expired" in out.body["detail"]


def test_nonce_never_issued(ks):
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http, refused(ks, 403, "nonce") as out:
        out.response = http.post("/v1/attest", json=ks.attest_body(
            crypto.random_bytes(32), kp.public_bytes))
    assert "never issued" in out.body["detail"]


def test_nonce_issued_for_another_tee(ks):
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        nonce = ks.challenge(http, tee="sgx")
        with refused(ks, 403, "nonce") as out:
            out.response = http.post("/v1/attest", json=ks.attest_body(nonce, kp.public_bytes))
    assert "sgx" in out.body["detail"]


def test_concurrent_replays_release_exactly_one_token(ks):
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        body = ks.attest_body(ks.challenge(http), kp.public_bytes)
    codes: list[int] = []

    def go() -> None:
        with ks.http() as http:
            codes.append(http.post("/v1/attest", json=body).status_code)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] + [403] * 5


# --------------------------------------------------------------------------- evidence

def test_evidence_bound_to_another_public_key(ks):
    kp, other = crypto.EphemeralKeyPair.generate(), crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        nonce = ks.challenge(http)
        with refused(ks, 403, "binding") as out:
            out.response = http.post("/v1/attest", json=ks.attest_body(
                nonce, kp.public_bytes, bind_key=other.public_bytes))
    assert "report_data" in out.body["detail"]


def test_evidence_that_fails_verification_and_burns_the_nonce(ks):
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        nonce = ks.challenge(http)
        body = ks.attest_body(nonce, kp.public_bytes)
        evidence = bytearray(base64.b64decode(body["evidence"]))
        evidence[-1] ^= 1  # the signature
        bad = dict(body, evidence=base64.b64encode(bytes(evidence)).decode())
        with refused(ks, 403, "attestation") as out:
            out.response = http.post("/v1/attest", json=bad)
        assert "signature" in out.body["detail"]
        with refused(ks, 403, "nonce") as again:  # the good evidence cannot reuse it
            again.response = http.post("/v1/attest", json=body)


def test_evidence_from_an_untrusted_sim_platform(ks):
    stranger = SimAttester(sim.init_platform(ks.tmp / "stranger"), ks.measurement)
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        nonce = ks.challenge(http)
        with refused(ks, 403, "attestation") as out:
            out.response = http.post("/v1/attest", json=ks.attest_body(
                nonce, kp.public_bytes, attester=stranger))
    assert "not among" in out.body["detail"]


def test_real_sgx_evidence_is_refused_by_the_binding_check(ks, evidence):
    """Genuine SGX quote (verifies at its collateral's time) but bound to no nonce of ours."""
    pinned = 1751000000  # inside the sample collateral's validity window (see README)
    saved = ks.clock()
    ks.clock.set(pinned)
    try:
        kp = crypto.EphemeralKeyPair.generate()
        with ks.http() as http:
            nonce = ks.challenge(http, tee="sgx")
            body = {"nonce": base64.b64encode(nonce).decode(), "tee": "sgx",
                    "evidence": base64.b64encode((evidence / "sgx/quote.bin").read_bytes())
                    .decode(),
                    "collateral": base64.b64encode(
                        (evidence / "sgx/collateral.json").read_bytes()).decode(),
                    "public_key": base64.b64encode(kp.public_bytes).decode()}
            with refused(ks, 403, "binding") as out:
                out.response = http.post("/v1/attest", json=body)
        rec = ks.last_audit()
        assert rec["claims"]["tee"] == "sgx"  # it did verify: the binding refused it
        assert rec["claims"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    finally:
        ks.clock.set(saved)


# --------------------------------------------------------------------------- release

def test_policy_miss_names_the_reason_in_the_audit_record_only(ks, model_id):
    # issue 11 §3 changed this: the caller no longer sees the policy's reference values
    ks.register(model_id, ks.policy(measurement=b"\x03" * 48))
    with ks.http() as http:
        token = _token(ks, http)
        with refused(ks, 403, "policy-denied") as out:
            out.response = http.get(f"/v1/keys/{model_id}", headers=_auth(token))
    assert out.body.get("reasons", []) == [] and "0303" not in json.dumps(out.body)
    assert any("measurement: expected 0303" in r for r in ks.last_audit()["reasons"])
    assert ks.last_audit()["policy_digest"]


def test_unknown_model_is_refused_like_a_model_the_caller_may_not_have(ks):
    # issue 11 §3 changed this from 404 "unknown model": see test_strict_attestation.py
    with ks.http() as http:
        token = _token(ks, http)
        with refused(ks, 403, "policy-denied") as out:
            out.response = http.get("/v1/keys/no-such-model", headers=_auth(token))
    assert "no-such-model" not in out.body["detail"] and out.body.get("reasons", []) == []
    assert ks.last_audit()["reasons"] == ["unknown model 'no-such-model'"]


@pytest.mark.parametrize("action", ["revoke", "retire"])
def test_revoked_or_retired_model(ks, model_id, action):
    ks.register(model_id)
    with ks.admin() as admin:
        getattr(admin, action)(model_id)
    with ks.http() as http:
        token = _token(ks, http)
        with refused(ks, 410, "key-unavailable") as out:
            out.response = http.get(f"/v1/keys/{model_id}", headers=_auth(token))
    assert ("revoked" if action == "revoke" else "retired") in out.body["detail"]


def test_expired_token(ks, model_id):
    ks.register(model_id)
    with ks.http() as http:
        token = _token(ks, http)
        ks.clock.advance(ks.srv.service.token_ttl + 1)
        with refused(ks, 401, "unauthorized") as out:
            out.response = http.get(f"/v1/keys/{model_id}", headers=_auth(token))
    assert "expired" in out.body["detail"]
    assert out.response.headers["www-authenticate"].startswith("Bearer")


def _forgeries(ks, token: str) -> list[tuple[str, str]]:
    header, payload, sig = token.split(".")
    claims = json.loads(protocol.b64url_decode(payload))
    claims["role"] = "holder"
    tampered = f"{header}.{protocol.b64url(protocol.canonical_json(claims))}.{sig}"
    other = TokenSigner(crypto.SigningKey.generate())
    other.key_id = ks.srv.service.signer.key_id  # pretend to be the keyserver's key
    other._header = header
    alien, _ = other.issue(claims=ks.srv.service.signer.verify(token, now=ks.clock()).claims,
                           public_key=b"\x09" * 32, role=protocol.Role.RUNTIME,
                           evidence_digest="00", now=ks.clock(), ttl=60)
    none_header = protocol.b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return [("tampered", tampered), ("other key", alien),
            ("alg none", f"{none_header}.{payload}."), ("garbage", "not-a-token")]


def test_forged_tokens(ks, model_id):
    ks.register(model_id)
    with ks.http() as http:
        token = _token(ks, http)
        for name, forged in _forgeries(ks, token):
            with refused(ks, 401, "unauthorized") as out:
                out.response = http.get(f"/v1/keys/{model_id}", headers=_auth(forged))
            assert out.body["detail"], name


def test_missing_token(ks):
    with ks.http() as http, refused(ks, 401, "unauthorized") as out:
        out.response = http.get("/v1/keys")
    assert "missing" in out.body["detail"]


# --------------------------------------------------------------------------- requests

def test_malformed_json(ks):
    with ks.http() as http:
        for path in ("/v1/attest", "/v1/attest/challenge"):
            with refused(ks, 400, "bad-request") as out:
                out.response = http.post(path, content=b'{"tee": "sim",',
                                         headers={"Content-Type": "application/json"})
            assert "json" in out.body["detail"].lower()


def test_missing_and_unknown_fields_and_bad_values(ks):
    kp = crypto.EphemeralKeyPair.generate()
    with ks.http() as http:
        with refused(ks, 400, "bad-request") as out:
            out.response = http.post("/v1/attest/challenge", json={"tee": "tpm"})
        assert "unknown tee" in out.body["detail"]
        with refused(ks, 400, "bad-request") as out:
            out.response = http.post("/v1/attest", json={"tee": "sim", "bogus": 1})
        assert "nonce" in out.body["detail"] and "bogus" in out.body["detail"]
        body = ks.attest_body(ks.challenge(http), kp.public_bytes)
        with refused(ks, 400, "bad-request") as out:
            out.response = http.post("/v1/attest", json=dict(body, public_key="AAAA"))
        assert "public_key" in out.body["detail"]
        with refused(ks, 400, "bad-request") as out:
            out.response = http.post("/v1/attest", json=dict(body, evidence="!!"))
        assert "base64" in out.body["detail"]
        # none of that burnt the nonce
        assert http.post("/v1/attest", json=body).status_code == 200


def test_oversized_bodies(ks):
    big = b'{"tee": "' + b"x" * (2 << 20) + b'"}'
    with ks.http() as http:
        with refused(ks, 413, "bad-request") as out:
            out.response = http.post("/v1/attest/challenge", content=big,
                                     headers={"Content-Type": "application/json"})
        assert "limit" in out.body["detail"]

        def chunks():  # no Content-Length: the limit still holds
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        with refused(ks, 413, "bad-request") as out:
            out.response = http.post("/v1/attest", content=chunks(),
                                     headers={"Content-Type": "application/json"})


# --------------------------------------------------------------------------- admin

def _register_body(model_id: str, ks) -> dict:
    return {"model_id": model_id, "policy": ks.policy(),
            "key": {"version": 1, "key": base64.b64encode(b"\x05" * 32).decode()}}


@pytest.mark.parametrize("header", [None, "Bearer sta_wrong", "Bearer", "Basic abc"])
def test_missing_or_wrong_admin_token(ks, model_id, header):
    headers = {"Authorization": header} if header else {}
    with ks.http() as http, refused(ks, 401, "unauthorized") as out:
        out.response = http.post("/v1/admin/models", json=_register_body(model_id, ks),
                                 headers=headers)
    assert ks.last_audit()["event"] == "admin.denied"
    with ks.http() as http, refused(ks, 401, "unauthorized") as listing:
        listing.response = http.get("/v1/admin/models", headers=headers)


def test_admin_requests_that_contradict_the_store(ks, model_id):
    ks.register(model_id)
    token = ks.init.admin_token_file.read_text().strip()
    with ks.http() as http:
        with refused(ks, 409, "conflict") as o1:
            o1.response = http.post("/v1/admin/models", json=_register_body(model_id, ks),
                                    headers=_auth(token))
        with refused(ks, 422, "policy-invalid") as o2:
            o2.response = http.post("/v1/admin/models", headers=_auth(token), json=dict(
                _register_body(model_id + "-x", ks), policy={"allow": [{"tee": "sim"}]}))
        with refused(ks, 400, "bad-request") as o3:
            body = _register_body(model_id + "-y", ks)
            body["key"]["key"] = base64.b64encode(b"short").decode()
            o3.response = http.post("/v1/admin/models", headers=_auth(token), json=body)
        assert "expected 32 bytes" in o3.body["detail"]
        with refused(ks, 404, "key-unavailable") as o4:
            o4.response = http.post("/v1/admin/revocations", headers=_auth(token),
                                    json={"model_id": model_id + "-nope"})
        with refused(ks, 409, "conflict") as o5:
            o5.response = http.post("/v1/admin/rotations", headers=_auth(token), json={
                "model_id": model_id,
                "key": {"version": 1, "key": base64.b64encode(b"\x06" * 32).decode()}})
        with refused(ks, 400, "bad-request") as o6:
            o6.response = http.post("/v1/admin/rotations", headers=_auth(token),
                                    json={"model_id": model_id})
    assert "use `keys rotate`" in o1.body["detail"]
    assert "already has version" in o5.body["detail"] and "exactly one" in o6.body["detail"]
    assert "unknown model" in o4.body["detail"] and "allow[0]" in o2.body["detail"]
