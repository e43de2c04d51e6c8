"""Issue 11 §3 against real `keyserver run` processes, on SQLite and on PostgreSQL:

- the deployment's attestation policy (keyserver.json ``attestation_policy``) is applied
  before any attestation token is issued: TEE types, debug refused;
- an attested caller cannot tell an unknown model from one it may not have: same status,
  same body (apart from the request id), no reference values; the reasons are in the audit
  log, which admins read.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sealedtorch import crypto
from sealedtorch.attest import binding, measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import PolicyDenied
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import config
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.tls import client_context

from .conftest import disable_rate_limit, start_keyserver, wait_ready

MEASUREMENT = measure.measurement(b"strict-attestation-tests")
OTHER = measure.measurement(b"someone else's runtime")


@dataclass
class Server:
    url: str
    ca: Path
    admin_token_file: Path
    platform: sim.SimPlatform

    def admin(self) -> AdminClient:
        return AdminClient.from_token_file(self.url, self.ca, self.admin_token_file)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=client_context(self.ca), timeout=20)

    def client(self, *, debug: bool = False) -> AttestedKeyClient:
        return AttestedKeyClient(self.url, self.ca,
                                 SimAttester(self.platform, MEASUREMENT, debug=debug))

    def audit(self) -> list[dict[str, Any]]:
        with self.admin() as admin:
            return list(admin.audit(limit=10_000)["records"])


def _serve(tmp: Path, database: str | None, policy: dict[str, Any] | None) -> Iterator[Server]:
    init = config.init_data_dir(tmp / "data", now=time.time(), database=database)
    data = init.config.data_dir
    disable_rate_limit(data)
    if policy is not None:
        path = data / "keyserver.json"
        settings = json.loads(path.read_text())
        settings["attestation_policy"] = policy
        path.write_text(json.dumps(settings))
    platform = sim.init_platform(tmp / "sim")
    log = (tmp / "keyserver.log").open("wb")
    proc, url = start_keyserver(data, tmp / "sim" / sim.PUB_FILE, log, database=database)
    try:
        assert init.ca_file is not None
        wait_ready(url, init.ca_file, proc)
        yield Server(url, init.ca_file, init.admin_token_file, platform)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def default_server(tmp_path: Path, store_url: str | None) -> Iterator[Server]:
    """No attestation_policy section: the strict defaults."""
    yield from _serve(tmp_path, store_url, None)


@pytest.fixture
def hardware_only_server(tmp_path: Path, store_url: str | None) -> Iterator[Server]:
    """Trusts a sim platform key, but its attestation policy lists hardware TEEs only."""
    yield from _serve(tmp_path, store_url, {"tees": ["sgx", "tdx", "snp"]})


def _attest_raw(srv: Server, http: httpx.Client, attester: SimAttester) -> tuple[
        httpx.Response, dict[str, Any]]:
    r = http.post("/v1/attest/challenge", json={"tee": "sim"})
    assert r.status_code == 200, r.text
    nonce = base64.b64decode(r.json()["nonce"])
    kp = crypto.EphemeralKeyPair.generate()
    ev = attester.evidence(binding.report_data(nonce, kp.public_bytes))
    body = {"nonce": base64.b64encode(nonce).decode(), "tee": "sim",
            "evidence": base64.b64encode(ev.data).decode(),
            "public_key": base64.b64encode(kp.public_bytes).decode(), "role": "runtime"}
    return http.post("/v1/attest", json=body), body


def _comparable(r: httpx.Response) -> tuple[int, str, dict[str, Any]]:
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"]
    body.pop("request_id")
    return r.status_code, r.headers["content-type"], body


# --------------------------------------------------------------------------- deployment

def test_a_tee_type_the_deployment_does_not_list_gets_no_token(hardware_only_server):
    srv = hardware_only_server
    with srv.http() as http:
        r, body = _attest_raw(srv, http, SimAttester(srv.platform, MEASUREMENT))
        assert r.status_code == 403, r.text
        problem = r.json()
        assert problem["problem"] == "policy-denied" and "token" not in problem
        assert problem.get("reasons", []) == []
        assert "sgx" not in json.dumps(problem)  # the deployment's reference values stay home
        again = http.post("/v1/attest", json=body)  # the nonce was spent by the refusal
        assert again.status_code == 403 and again.json()["problem"] == "nonce"
    record = next(rec for rec in reversed(srv.audit()) if rec.get("event") == "attest"
                  and rec.get("request_id") == problem["request_id"])
    assert record["decision"] == "deny" and record["problem"] == "policy-denied"
    assert record["reasons"] == ["deployment: tee: expected one of [sgx, tdx, snp], got sim"]
    # an owner (who administers models, not the deployment) does not see that record
    with srv.admin() as admin:
        owner_token = admin.create_token("owner", "alice")["token"]
    with AdminClient(srv.url, srv.ca, owner_token) as owner:
        seen = owner.audit(limit=10_000)["records"]
    assert not any(rec.get("request_id") == problem["request_id"] for rec in seen)


def test_the_default_deployment_policy_refuses_a_debug_tee(default_server):
    srv = default_server
    with srv.client(debug=True) as client, pytest.raises(PolicyDenied) as err:
        client.attest()
    assert err.value.reasons == ()
    record = [rec for rec in srv.audit() if rec.get("event") == "attest"][-1]
    assert record["reasons"] == ["deployment: debug: expected false, got true"]
    with srv.client() as client:  # the same platform without debug gets its token
        assert client.attest().tee == "sim"
    record = [rec for rec in srv.audit() if rec.get("event") == "attest"][-1]
    assert record["decision"] == "ok" and "deployment: matched" in record["reasons"]


# --------------------------------------------------------------------------- release

def test_unknown_model_and_not_allowed_model_get_identical_answers(default_server):
    srv = default_server
    secret_model = "acme/secret-model-7"
    unknown_model = "acme/nonexistent-00"  # same length, so even the sizes could not differ
    assert len(secret_model) == len(unknown_model)
    with srv.admin() as admin:
        admin.register(ModelKey.generate(secret_model),
                       {"allow": [{"tee": "sim", "measurement": OTHER.hex()}]})
        admin.register(ModelKey.generate("acme/ours"),
                       {"allow": [{"tee": "sim", "measurement": MEASUREMENT.hex()}]})
    with srv.client() as client:
        token = client.attest().token
        assert client.fetch("acme/ours").model_key.model_id == "acme/ours"  # it can get keys
    auth = {"Authorization": f"Bearer {token}"}
    with srv.http() as http:
        for query in ("", "?version=1", "?version=2"):
            denied = http.get(f"/v1/keys/{secret_model}{query}", headers=auth)
            unknown = http.get(f"/v1/keys/{unknown_model}{query}", headers=auth)
            assert denied.status_code == 403, denied.text
            assert _comparable(denied) == _comparable(unknown)
            assert len(denied.content) == len(unknown.content)
            assert OTHER.hex() not in denied.text and "measurement" not in denied.text
    # ...while the operator sees exactly what happened
    releases = [rec for rec in srv.audit() if rec.get("event") == "release"
                and rec.get("model_id") in (secret_model, unknown_model)]
    assert len(releases) == 6 and all(rec["decision"] == "deny" for rec in releases)
    assert any(f"measurement: expected {OTHER.hex()}" in r
               for rec in releases if rec["model_id"] == secret_model for r in rec["reasons"])
    assert all(rec["reasons"] == [f"unknown model {unknown_model!r}"]
               for rec in releases if rec["model_id"] == unknown_model)
