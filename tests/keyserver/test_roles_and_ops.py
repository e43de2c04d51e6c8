"""Owners, auditors and admins sharing one keyserver; token management (API and CLI);
Prometheus metrics; the per-client rate limit; readiness."""

from __future__ import annotations

import dataclasses
import json
import re

import httpx
import pytest

from sealedtorch import cli, errors
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import server
from sealedtorch.keyserver.app import RateLimit, RateLimiter
from sealedtorch.keyserver.client import AdminClient
from sealedtorch.keyserver.tls import client_context


def _client(ks, token: str) -> AdminClient:
    return AdminClient(ks.url, ks.ca, token)


@pytest.fixture(scope="module")
def tokens(ks):
    """Two owners, an auditor and a second admin, created by the initial admin."""
    with ks.admin() as admin:
        made = {name: admin.create_token(role, name)["token"] for role, name in (
            ("owner", "alice"), ("owner", "bob"), ("auditor", "audit-team"),
            ("admin", "second-admin"))}
    return made


def test_owners_do_not_see_or_touch_each_others_models(ks, tokens, model_id):
    alice, bob = _client(ks, tokens["alice"]), _client(ks, tokens["bob"])
    key = ModelKey.generate(model_id)
    info = alice.register(key, ks.policy())
    assert info["owner"] == "alice"
    bob.register(ModelKey.generate(model_id + "-bob"), ks.policy())

    assert [m["model_id"] for m in alice.list_models()] == [model_id]
    assert [m["model_id"] for m in bob.list_models()] == [model_id + "-bob"]
    assert alice.get_model(model_id)["versions"][0]["state"] == "active"

    # every operation on a foreign model answers exactly what an unknown model answers
    unknown = model_id + "-nobody"
    before = ks.audit_count()
    for op in (lambda m: bob.get_model(m), lambda m: bob.set_policy(m, ks.policy()),
               lambda m: bob.rotate(m), lambda m: bob.revoke(m), lambda m: bob.retire(m)):
        answers = []
        for target in (model_id, unknown):
            with pytest.raises(errors.KeyUnavailable) as exc_info:
                op(target)
            exc = exc_info.value
            assert exc.http_status == 404  # type: ignore[attr-defined]
            answers.append(str(exc).split(" (request")[0].replace(target, "ID"))
        assert answers[0] == answers[1], answers
    with pytest.raises(errors.ConflictError, match="already registered") as exc_info:
        bob.register(ModelKey.generate(model_id), ks.policy())
    assert "alice" not in str(exc_info.value)
    assert ks.audit_count() == before + 11  # each refusal is audited

    # the foreign attempts are in records only admins and auditors read
    auditor = _client(ks, tokens["audit-team"])
    records = auditor.audit(model_id=model_id)["records"]
    foreign = [r for r in records if r.get("problem") == "key-unavailable"]
    assert len(foreign) == 5 and all(r.get("owner") is None for r in foreign)
    assert all("belongs to another owner" in r["reasons"][0] for r in foreign)
    assert all(r["actor_role"] == "owner" for r in foreign)
    # ... and never in bob's or alice's view
    bob_view = bob.audit()["records"]
    assert all(r.get("owner") == "bob" for r in bob_view)
    assert not any(r.get("model_id") == model_id for r in bob_view)
    assert bob.audit()["head"] is None  # the chain head is for admins and auditors
    alice_view = alice.audit(model_id=model_id)["records"]
    assert alice_view[0]["event"] == "register" and alice_view[0]["owner"] == "alice"
    assert not any("belongs to another owner" in json.dumps(r) for r in alice_view)

    # alice's model is untouched and releasable; the release is in alice's view
    got = ks.client().fetch(model_id)
    assert got.model_key == key
    assert alice.audit(model_id=model_id)["records"][-1]["event"] == "release"
    for c in (alice, bob, auditor):
        c.close()


def test_roles_limit_what_tokens_do(ks, tokens, model_id):
    auditor = _client(ks, tokens["audit-team"])
    owner = _client(ks, tokens["alice"])
    with pytest.raises(errors.ForbiddenError, match="auditor token may not register"):
        auditor.register(ModelKey.generate(model_id), ks.policy())
    with pytest.raises(errors.ForbiddenError):
        auditor.list_models()
    with pytest.raises(errors.ForbiddenError, match="owner token may not create tokens"):
        owner.create_token("admin", "escalate")
    with pytest.raises(errors.ForbiddenError):
        owner.list_tokens()
    assert ks.last_audit()["problem"] == "forbidden"
    page = auditor.audit(limit=5)
    assert len(page["records"]) == 5 and page["head"]["seq"] >= 5
    nxt = auditor.audit(after_seq=page["records"][-1]["seq"], limit=1)["records"]
    assert nxt[0]["seq"] == page["records"][-1]["seq"] + 1

    second = _client(ks, tokens["second-admin"])  # a created admin is a full admin
    second.register(ModelKey.generate(model_id), ks.policy())
    assert second.get_model(model_id)["owner"] is None
    with pytest.raises(errors.KeyUnavailable):  # admin-registered: no owner sees it
        owner.get_model(model_id)
    for c in (auditor, owner, second):
        c.close()


def test_token_lifecycle(ks, tokens):
    with ks.admin() as admin:
        made = admin.create_token("owner", "carol")
        assert made["token"].startswith("sta_") and made["role"] == "owner"
        listed = {t["token_id"]: t for t in admin.list_tokens()}
        assert "token" not in listed[made["token_id"]]
        assert listed[made["token_id"]]["revoked_at"] is None
        with pytest.raises(errors.ConflictError, match="one name, one role"):
            admin.create_token("auditor", "carol")
        second = admin.create_token("owner", "carol")  # a second credential, same owner
        with pytest.raises(errors.RequestError):
            admin.create_token("owner", "bad name!")
        with pytest.raises(errors.RequestError):
            admin.create_token("root", "x")
        carol = _client(ks, made["token"])
        carol.register(ModelKey.generate("carol-model"), ks.policy())
        carol2 = _client(ks, second["token"])
        assert [m["model_id"] for m in carol2.list_models()] == ["carol-model"]
        revoked = admin.revoke_token(made["token_id"])
        assert revoked["revoked_at"] is not None
        with pytest.raises(errors.AuthenticationError, match="revoked"):
            carol.list_models()
        assert [m["model_id"] for m in carol2.list_models()] == ["carol-model"]
        with pytest.raises(errors.ConflictError, match="already revoked"):
            admin.revoke_token(made["token_id"])
        with pytest.raises(errors.KeyUnavailable):
            admin.revoke_token("adm_000000000000")
        # the initial admin token from init stays valid; the last admin cannot go
        ids = [t["token_id"] for t in admin.list_tokens() if t["role"] == "admin"
               and t["revoked_at"] is None]
        assert len(ids) == 2
        other = next(t for t in admin.list_tokens() if t["name"] == "second-admin")
        assert admin.revoke_token(other["token_id"])["revoked_at"]
        initial = next(t for t in admin.list_tokens() if t["name"] == "initial")
        with pytest.raises(errors.ConflictError, match="last valid admin"):
            admin.revoke_token(initial["token_id"])
        carol.close()
        carol2.close()


def test_tokens_cli(ks, tmp_path, capsys):
    conn = ["--keyserver", ks.url, "--ca", str(ks.ca), "--token-file",
            str(ks.init.admin_token_file)]
    out = tmp_path / "dave.token"
    assert cli.main(["keyserver", "tokens", "create", *conn, "--role", "owner", "--name",
                     "dave", "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600
    token = out.read_text().strip()
    assert token.startswith("sta_") and token not in capsys.readouterr().out
    assert cli.main(["keyserver", "tokens", "create", *conn, "--role", "auditor", "--name",
                     "erin"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("sta_") and "shown once" in printed.err
    assert cli.main(["keyserver", "tokens", "list", *conn, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    dave = next(t for t in listed if t["name"] == "dave")
    assert cli.main(["keyserver", "tokens", "revoke", *conn, dave["token_id"]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli.main(["keyserver", "tokens", "list", *conn]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if " dave " in x)
    assert "revoked" in line
    assert cli.main(["keyserver", "tokens", "create", *conn, "--role", "owner", "--name",
                     "dave", "-o", str(out)]) == 2  # never overwrites a file


def test_metrics(ks, model_id):
    ks.register(model_id)
    ks.client().fetch(model_id)
    with ks.http() as http:
        http.post("/v1/attest/challenge", json={"tee": "nope"})
        r = http.get("/v1/keys/" + model_id, headers={"Authorization": "Bearer x.y.z"})
        assert r.status_code == 401
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    sample = dict(re.findall(r"^(\S+) (\S+)$", text, re.M))
    assert float(sample['sealedtorch_keyserver_releases_total{tee="sim",role="runtime"}']) >= 1
    assert float(sample['sealedtorch_keyserver_attestations_total{tee="sim"}']) >= 1
    assert float(sample['sealedtorch_keyserver_denials_total{event="release",'
                        'reason="unauthorized",tee="none"}']) >= 1
    assert float(sample['sealedtorch_keyserver_denials_total{event="attest.challenge",'
                        'reason="bad-request",tee="invalid"}']) >= 1
    assert float(sample['sealedtorch_keyserver_attestation_duration_seconds_count'
                        '{tee="sim"}']) >= 1
    assert float(sample['sealedtorch_keyserver_release_duration_seconds_count'
                        '{tee="sim"}']) >= 1
    assert float(sample["sealedtorch_keyserver_nonces"]) >= 1
    assert float(sample["sealedtorch_keyserver_audit_chain_length"]) == ks.audit_count()
    assert sample["sealedtorch_keyserver_store_up"] == "1"
    assert model_id not in text  # no model ids in labels


def test_rate_limiter_buckets():
    now = [0.0]
    limiter = RateLimiter(RateLimit(rate=2, burst=3), max_clients=2, clock=lambda: now[0])
    assert [limiter.wait("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.wait("a") == pytest.approx(0.5)
    assert limiter.wait("b") == 0  # per client
    now[0] += 0.5
    assert limiter.wait("a") == 0
    limiter.wait("c")  # evicts the least recently seen
    assert len(limiter._buckets) == 2


def test_rate_limit_answers_429_and_is_not_audited(ks):
    cfg = dataclasses.replace(ks.init.config, rate_limit=(0.2, 3))
    with server.BackgroundServer.start(cfg, clock=ks.clock) as srv, \
            httpx.Client(base_url=srv.url, verify=client_context(ks.ca), timeout=10) as http:
        codes = [http.post("/v1/attest/challenge", json={"tee": "sim"}).status_code
                 for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        before = ks.audit_count()
        r = http.post("/v1/attest", json={"nonce": "AA==", "tee": "sim", "evidence": "AA==",
                                          "public_key": "AA=="})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["problem"] == "rate-limited"
        assert ks.audit_count() == before
        assert http.get("/v1/admin/models").status_code == 401  # admin API: not limited
        metrics = http.get("/metrics").text
        assert 'sealedtorch_keyserver_rate_limited_total{endpoint="attest"} 1' in metrics
