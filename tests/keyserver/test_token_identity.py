"""Issue 11 §4 and §6: immutable owner identities, expiring and rotatable admin tokens,
and strict model ids and key versions, against the real keyserver of this module."""

from __future__ import annotations

import base64
import datetime
import json

import pytest

from sealedtorch import cli, crypto, errors
from sealedtorch.keys import ModelKey, validate_model_id
from sealedtorch.keyserver.admin_service import TOKEN_LIFETIME
from sealedtorch.keyserver.client import AdminClient


def _client(ks, token: str) -> AdminClient:
    return AdminClient(ks.url, ks.ca, token)


def _time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- identities

def test_a_new_token_with_a_revoked_owners_name_does_not_inherit_its_models(ks, model_id):
    with ks.admin() as admin:
        first = admin.create_token("owner", "heidi")
    with _client(ks, first["token"]) as heidi:
        heidi.register(ModelKey.generate(model_id), ks.policy())
    with ks.admin() as admin:
        admin.revoke_token(first["token_id"])
        again = admin.create_token("owner", "heidi")  # same name, after the revocation
    assert again["principal_id"] != first["principal_id"]
    assert again["principal_id"] == "heidi#2" and first["principal_id"] == "heidi"
    with _client(ks, again["token"]) as usurper:
        assert usurper.list_models() == []
        with pytest.raises(errors.KeyUnavailable):
            usurper.get_model(model_id)
        with pytest.raises(errors.KeyUnavailable):
            usurper.set_policy(model_id, ks.policy())
        with pytest.raises(errors.KeyUnavailable):
            usurper.revoke(model_id)
        assert not any(r.get("model_id") == model_id for r in usurper.audit()["records"])
    with ks.admin() as admin:  # the model still belongs to the first heidi
        assert admin.get_model(model_id)["owner"] == "heidi"
        assert admin.get_model(model_id)["versions"][0]["state"] == "active"


def test_a_second_token_for_a_valid_owner_shares_its_identity(ks, model_id):
    with ks.admin() as admin:
        first = admin.create_token("owner", "ivan")
        second = admin.create_token("owner", "ivan")
    assert first["principal_id"] == second["principal_id"] == "ivan"
    with _client(ks, first["token"]) as a, _client(ks, second["token"]) as b:
        a.register(ModelKey.generate(model_id), ks.policy())
        assert [m["model_id"] for m in b.list_models()] == [model_id]


# --------------------------------------------------------------------------- expiry

def test_tokens_expire_after_90_days_by_default(ks):
    with ks.admin() as admin:
        made = admin.create_token("auditor", "judy")
    lifetime = _time(made["expires_at"]) - _time(made["created_at"])
    assert lifetime == pytest.approx(TOKEN_LIFETIME, abs=1)
    assert TOKEN_LIFETIME == 90 * 86400


def test_an_expired_token_is_refused_and_audited(ks):
    with ks.admin() as admin:
        made = admin.create_token("auditor", "kim", expires_in=120)
    with _client(ks, made["token"]) as kim:
        assert kim.audit(limit=1)["records"]
        ks.clock.advance(121)
        with pytest.raises(errors.AuthenticationError, match="expired"):
            kim.audit(limit=1)
    assert ks.last_audit()["event"] == "admin.denied"
    assert ks.last_audit()["problem"] == "unauthorized"


def test_a_token_lifetime_must_be_a_plain_number_of_seconds_in_range(ks):
    with ks.admin() as admin:
        for bad in (10, 10 * 365 * 86400, True, "3600"):
            with pytest.raises(errors.RequestError):
                admin._call("POST", "/v1/admin/tokens",
                            {"role": "owner", "name": "lena", "expires_in": bad})
        assert not any(t["name"] == "lena" for t in admin.list_tokens())


# --------------------------------------------------------------------------- rotation

def test_rotation_keeps_the_identity_and_revokes_the_old_token(ks, model_id):
    with ks.admin() as admin:
        old = admin.create_token("owner", "mia", expires_in=3600)
    with _client(ks, old["token"]) as mia:
        mia.register(ModelKey.generate(model_id), ks.policy())
    with ks.admin() as admin:
        new = admin.rotate_token(old["token_id"])
        assert new["principal_id"] == old["principal_id"] and new["name"] == "mia"
        assert new["rotated_from"] == old["token_id"] and new["token"] != old["token"]
        assert _time(new["expires_at"]) - _time(new["created_at"]) == \
            pytest.approx(TOKEN_LIFETIME, abs=1)
        listed = {t["token_id"]: t for t in admin.list_tokens()}
        assert listed[old["token_id"]]["revoked_at"] is not None
        with pytest.raises(errors.ConflictError, match="revoked"):
            admin.rotate_token(old["token_id"])  # a revoked token has no successor
    with _client(ks, old["token"]) as stale, pytest.raises(errors.AuthenticationError):
        stale.list_models()
    with _client(ks, new["token"]) as mia:
        assert [m["model_id"] for m in mia.list_models()] == [model_id]


def test_an_expired_token_is_renewed_by_rotation(ks, model_id):
    with ks.admin() as admin:
        old = admin.create_token("owner", "nora", expires_in=60)
    with _client(ks, old["token"]) as nora:
        nora.register(ModelKey.generate(model_id), ks.policy())
    ks.clock.advance(61)
    with ks.admin() as admin:
        new = admin.rotate_token(old["token_id"], expires_in=7200)
    with _client(ks, new["token"]) as nora:
        assert [m["model_id"] for m in nora.list_models()] == [model_id]


def test_tokens_cli_shows_expiry_and_rotates(ks, tmp_path, capsys):
    conn = ["--keyserver", ks.url, "--ca", str(ks.ca), "--token-file",
            str(ks.init.admin_token_file)]
    assert cli.main(["keyserver", "tokens", "create", *conn, "--role", "owner", "--name",
                     "olaf", "--expires", "12h", "-o", str(tmp_path / "olaf.token")]) == 0
    assert "expires" in capsys.readouterr().out
    assert cli.main(["keyserver", "tokens", "list", *conn, "--json"]) == 0
    olaf = next(t for t in json.loads(capsys.readouterr().out) if t["name"] == "olaf")
    assert _time(olaf["expires_at"]) - _time(olaf["created_at"]) == pytest.approx(43200, abs=1)
    assert cli.main(["keyserver", "tokens", "list", *conn]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if " olaf " in x)
    assert f"expires {olaf['expires_at']}" in line
    assert cli.main(["keyserver", "tokens", "rotate", *conn, olaf["token_id"], "-o",
                     str(tmp_path / "olaf2.token")]) == 0
    printed = capsys.readouterr()
    assert "written to" in printed.out and f"{olaf['token_id']} revoked" in printed.err
    token = (tmp_path / "olaf2.token").read_text().strip()
    assert (tmp_path / "olaf2.token").stat().st_mode & 0o777 == 0o600
    with _client(ks, token) as c:
        assert c.list_models() == []
    with pytest.raises(SystemExit):
        cli.main(["keyserver", "tokens", "create", *conn, "--role", "owner", "--name", "x",
                  "--expires", "soon"])


# --------------------------------------------------------------------------- §6 strictness

def test_a_model_id_with_a_trailing_newline_is_refused(ks):
    for bad in ("victim\n", "victim\r\n", "\nvictim"):
        with pytest.raises(ValueError):
            validate_model_id(bad)
    key = {"version": 1, "key": base64.b64encode(crypto.generate_key()).decode()}
    with ks.http() as http:
        token = ks.init.admin_token_file.read_text().strip()
        r = http.post("/v1/admin/models", headers={"Authorization": f"Bearer {token}"},
                      json={"model_id": "victim\n", "key": key, "policy": ks.policy()})
    assert r.status_code == 400 and r.json()["problem"] == "bad-request"


@pytest.mark.parametrize("version", [True, "2", 2.0])
def test_key_versions_are_strict_integers(ks, model_id, version):
    ks.register(model_id)
    token = ks.init.admin_token_file.read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    secret = base64.b64encode(crypto.generate_key()).decode()
    before = ks.state()
    with ks.http() as http:
        for path, body in (
                ("/v1/admin/models", {"model_id": model_id + "-new", "policy": ks.policy(),
                                      "key": {"version": version, "key": secret}}),
                ("/v1/admin/rotations", {"model_id": model_id,
                                         "key": {"version": version, "key": secret}}),
                ("/v1/admin/revocations", {"model_id": model_id, "version": version}),
                ("/v1/admin/retirements", {"model_id": model_id, "version": version})):
            r = http.post(path, headers=auth, json=body)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["problem"] == "bad-request"
    assert ks.state() == before
