"""Issue 11 §2, the attacks themselves, on SQLite and on the local PostgreSQL: a store
writer (a second process with database access only) drops the triggers, rewrites a release
into a denial / deletes the newest records / reorders records, and recomputes the hash
chain and the stored Merkle tree.  The chain alone then reports an intact log; a checkpoint
saved earlier catches it (`keyserver audit verify --checkpoint`), and a keycache that saw
the log before stops using its keys."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sealedtorch.attest import VerifierConfig, measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.errors import LogInconsistent, RequestError, TransparencyError
from sealedtorch.keycache.local import EvidenceAppraiser
from sealedtorch.keycache.service import Backoff, Keycache
from sealedtorch.keycache.upstream import KeyserverUpstream
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import config, protocol, server, tlog
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.tls import client_context

from .conftest import FakeClock

FORGER = Path(__file__).with_name("forge_log.py")
MEASUREMENT = measure.measurement(b"tlog-attack-tests")


@dataclass
class Deployment:
    engine: str
    data: Path
    url: str
    ca: Path
    database: str | None
    platform: sim.SimPlatform
    srv: server.BackgroundServer
    tmp: Path

    def admin(self) -> AdminClient:
        return AdminClient.from_token_file(self.url, self.ca, self.data / "admin-token")

    def attester(self) -> SimAttester:
        return SimAttester(self.platform, MEASUREMENT)

    def register(self, model_id: str) -> ModelKey:
        key = ModelKey.generate(model_id)
        with self.admin() as admin:
            admin.register(key, {"allow": [{"tee": "sim", "measurement": MEASUREMENT.hex()}]})
        return key

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "sealedtorch.cli", "keyserver", "audit", *args,
               "--data", str(self.data)]
        if self.database:
            cmd += ["--database", self.database]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def save_checkpoint(self, name: str = "saved.checkpoint") -> Path:
        out = self.cli("checkpoint")
        assert out.returncode == 0, out.stderr
        path = self.tmp / name
        path.write_text(out.stdout)
        return path

    def forge(self, mode: str) -> None:
        target = ["--postgres", self.database] if self.database else \
            ["--sqlite", str(self.data / "keyserver.db")]
        out = subprocess.run([sys.executable, str(FORGER), *target, mode],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr


@pytest.fixture(params=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    database = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    clock = FakeClock()
    init = config.init_data_dir(tmp_path / "data", now=clock(), database=database)
    platform = sim.init_platform(tmp_path / "sim")
    srv = server.BackgroundServer.start(init.config, clock=clock,
                                        trust_sim_roots=[tmp_path / "sim" / sim.PUB_FILE])
    assert init.ca_file is not None
    dep = Deployment(request.param, init.config.data_dir, srv.url, init.ca_file, database,
                     platform, srv, tmp_path)
    try:
        yield dep
    finally:
        srv.stop()


def _history(dep: Deployment) -> None:
    """Real decisions on the record: a registration, two releases."""
    dep.register("victim-model")
    with AttestedKeyClient(dep.url, dep.ca, dep.attester()) as client:
        client.fetch("victim-model")
        client.fetch("victim-model")


@pytest.mark.parametrize("mode, finding", [("rewrite", "REWRITTEN"),
                                           ("truncate", "TRUNCATED"),
                                           ("reorder", "REWRITTEN")])
def test_forged_history_passes_the_chain_but_not_a_saved_checkpoint(
        deployment: Deployment, mode: str, finding: str) -> None:
    _history(deployment)
    saved = deployment.save_checkpoint()
    deployment.forge(mode)
    chain_only = deployment.cli("verify")
    assert chain_only.returncode == 0, chain_only.stderr  # the forger did a thorough job
    checked = deployment.cli("verify", "--checkpoint", str(saved))
    assert checked.returncode == 1
    assert finding in checked.stderr


def test_an_honest_log_that_grew_is_consistent_with_a_saved_checkpoint(
        deployment: Deployment) -> None:
    _history(deployment)
    saved = deployment.save_checkpoint()
    with AttestedKeyClient(deployment.url, deployment.ca, deployment.attester()) as client:
        client.fetch("victim-model")
    checked = deployment.cli("verify", "--checkpoint", str(saved))
    assert checked.returncode == 0, checked.stderr
    assert "consistent with the saved checkpoint" in checked.stdout


def test_a_checkpoint_signed_by_another_key_is_refused(deployment: Deployment) -> None:
    _history(deployment)
    other = tlog.Signer.generate(tlog.read_verifier(deployment.data).name)
    saved = deployment.save_checkpoint()
    cp = tlog.Checkpoint.parse(saved.read_text().split("\n\n")[0] + "\n")
    saved.write_text(other.sign_note(cp.text()))
    checked = deployment.cli("verify", "--checkpoint", str(saved))
    assert checked.returncode != 0
    assert "no signature" in checked.stderr


def test_keycache_that_saw_the_log_stops_when_history_is_forked(
        deployment: Deployment, caplog: pytest.LogCaptureFixture) -> None:
    key = deployment.register("cached-model")
    upstream = KeyserverUpstream(AttestedKeyClient(deployment.url, deployment.ca,
                                                   deployment.attester(), role="holder"))
    appraiser = EvidenceAppraiser(VerifierConfig(
        sim_platform_keys=(deployment.platform.public_key,)), tees=["sim"])
    kc = Keycache(upstream, appraiser, backoff=Backoff(base=0.01, cap=0.05))
    try:
        assert kc.refresh_once()
        assert len(kc.store) == 1
        assert kc.store.get("cached-model", key.version) is not None
        deployment.forge("rewrite")
        with caplog.at_level(logging.ERROR, logger="sealedtorch"):
            assert not kc.refresh_once()
        assert len(kc.store) == 0
        assert "inconsistent" in (kc.last_error or "")
        assert any("stopped serving" in r.getMessage() for r in caplog.records)
        # and it stays stopped: the fork is not forgotten on the next refresh
        assert not kc.refresh_once()
        assert len(kc.store) == 0
    finally:
        kc.stop()
        upstream.close()


def test_client_refuses_a_release_once_the_log_is_forked(deployment: Deployment) -> None:
    deployment.register("client-model")
    with AttestedKeyClient(deployment.url, deployment.ca, deployment.attester()) as client:
        client.fetch("client-model")
        seen = client.witness.size
        assert seen is not None and seen > 0
        deployment.forge("rewrite")
        with pytest.raises(LogInconsistent):
            client.fetch("client-model")


# --- receipts as they come over the wire --------------------------------------------------

def _raw_release(dep: Deployment, model_id: str) -> tuple[dict, str]:
    """A release answer fetched by hand (challenge, attest, GET), and the key thumbprint."""
    import base64

    from sealedtorch import crypto
    from sealedtorch.attest import binding

    keypair = crypto.EphemeralKeyPair.generate()
    with httpx.Client(base_url=dep.url, verify=client_context(dep.ca), timeout=10) as http:
        nonce = base64.b64decode(http.post("/v1/attest/challenge",
                                           json={"tee": "sim"}).json()["nonce"])
        ev = dep.attester().evidence(binding.report_data(nonce, keypair.public_bytes))
        token = http.post("/v1/attest", json={
            "nonce": base64.b64encode(nonce).decode(), "tee": "sim",
            "evidence": base64.b64encode(ev.data).decode(),
            "public_key": base64.b64encode(keypair.public_bytes).decode()}).json()["token"]
        r = http.get(f"/v1/keys/{model_id}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    return r.json(), protocol.thumbprint(keypair.public_bytes)


def test_every_release_answer_carries_a_verifiable_receipt(deployment: Deployment) -> None:
    deployment.register("receipt-model")
    answer, thumbprint = _raw_release(deployment, "receipt-model")
    receipt = answer["receipt"]
    protocol.KeysResponse.model_validate(answer)
    assert receipt["log_key"] == tlog.read_verifier(deployment.data).vkey
    cp, included = tlog.Witness(receipt["log_key"]).check_receipt(receipt)
    (record,) = included.values()
    assert tlog.release_record_matches(record, model_id="receipt-model", version=1,
                                       thumbprint=thumbprint)
    assert cp.size >= record["seq"]


def test_a_receipt_whose_record_was_altered_is_refused(deployment: Deployment) -> None:
    deployment.register("altered-model")
    answer, _ = _raw_release(deployment, "altered-model")
    receipt = answer["receipt"]
    entry = receipt["entries"][0]
    body = json.loads(entry["record"])
    body["model_id"] = "another-model"
    entry["record"] = protocol.canonical_json(body).decode()
    with pytest.raises(TransparencyError, match="inclusion proof"):
        tlog.Witness(receipt["log_key"]).check_receipt(receipt)


def test_a_receipt_from_another_log_key_breaks_a_pinned_witness(
        deployment: Deployment) -> None:
    deployment.register("pinned-model")
    answer, _ = _raw_release(deployment, "pinned-model")
    witness = tlog.Witness(tlog.Signer.generate().verifier)
    with pytest.raises(LogInconsistent, match="log key changed"):
        witness.check_receipt(answer["receipt"])


# --- the auditor's CLI over the API -------------------------------------------------------

def _auditor(dep: Deployment, *args: str, token: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sealedtorch.cli", "audit", *args, "--keyserver", dep.url,
           "--ca", str(dep.ca), "--token-file", str(token or dep.data / "admin-token")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _auditor_token(dep: Deployment) -> Path:
    with dep.admin() as admin:
        created = admin.create_token("auditor", "witness")
    path = dep.tmp / "auditor-token"
    path.write_text(created["token"] + "\n")
    path.chmod(0o600)
    return path


def test_auditor_cli_saves_a_checkpoint_and_catches_a_rewrite(deployment: Deployment) -> None:
    _history(deployment)
    token = _auditor_token(deployment)
    vkey = tlog.read_verifier(deployment.data).vkey
    saved = deployment.tmp / "witness.checkpoint"
    out = _auditor(deployment, "checkpoint", "--log-key", vkey, "--save", str(saved),
                   token=token)
    assert out.returncode == 0, out.stderr
    assert tlog.open_checkpoint(saved.read_text(), tlog.Verifier.parse(vkey)).size > 0
    with AttestedKeyClient(deployment.url, deployment.ca, deployment.attester()) as client:
        client.fetch("victim-model")
    ok = _auditor(deployment, "verify", "--checkpoint", str(saved), "--log-key", vkey,
                  token=token)
    assert ok.returncode == 0, ok.stderr
    assert "consistent with the saved checkpoint" in ok.stdout
    deployment.forge("rewrite")
    bad = _auditor(deployment, "verify", "--checkpoint", str(saved), "--log-key", vkey,
                   token=token)
    assert bad.returncode == 1
    assert "REWRITTEN" in bad.stderr


def test_auditor_cli_catches_a_truncation(deployment: Deployment) -> None:
    _history(deployment)
    vkey = tlog.read_verifier(deployment.data).vkey
    saved = deployment.save_checkpoint()
    deployment.forge("truncate")
    bad = _auditor(deployment, "verify", "--checkpoint", str(saved), "--log-key", vkey)
    assert bad.returncode == 1
    assert "TRUNCATED" in bad.stderr


def test_auditor_cli_proves_an_expected_head_is_in_the_signed_log(
        deployment: Deployment) -> None:
    _history(deployment)
    head = deployment.cli("verify").stdout.split("head #", 1)[1].split()
    expect = f"{head[0]}:{head[1]}"
    out = _auditor(deployment, "verify", "--expect-head", expect)
    assert out.returncode == 0, out.stderr
    assert "is in the signed log" in out.stdout
    assert "not pinned" in out.stderr  # no --log-key: said so
    wrong = _auditor(deployment, "verify", "--expect-head", f"{head[0]}:{'0' * 64}")
    assert wrong.returncode == 1


def test_auditor_cli_lists_newest_first(deployment: Deployment) -> None:
    _history(deployment)
    out = _auditor(deployment, "list", "--limit", "3", "--json")
    assert out.returncode == 0, out.stderr
    seqs = [json.loads(line)["seq"] for line in out.stdout.splitlines()]
    assert len(seqs) == 3
    assert seqs == sorted(seqs, reverse=True)


def _keycache(dep: Deployment, log_key: str | None) -> Keycache:
    upstream = KeyserverUpstream.connect(dep.url, ca=dep.ca, attester=dep.attester(),
                                         log_key=log_key)
    appraiser = EvidenceAppraiser(VerifierConfig(
        sim_platform_keys=(dep.platform.public_key,)), tees=["sim"])
    return Keycache(upstream, appraiser, backoff=Backoff(base=0.01, cap=0.05))


def test_keycache_with_the_pinned_log_key_holds_keys(deployment: Deployment) -> None:
    deployment.register("pinned-ok-model")
    kc = _keycache(deployment, tlog.read_verifier(deployment.data).vkey)
    try:
        assert kc.refresh_once(), kc.last_error
        assert len(kc.store) == 1
    finally:
        kc.stop()
        kc.upstream.close()


def test_keycache_pinned_to_another_log_key_holds_nothing(deployment: Deployment) -> None:
    deployment.register("pinned-bad-model")
    kc = _keycache(deployment, tlog.Signer.generate().verifier.vkey)
    try:
        assert not kc.refresh_once()
        assert len(kc.store) == 0
        assert "log key changed" in (kc.last_error or "")
    finally:
        kc.stop()
        kc.upstream.close()


def test_openapi_describes_the_log_endpoints_and_the_receipt(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.url, verify=client_context(deployment.ca),
                      timeout=10) as http:
        spec = http.get("/v1/openapi.json").json()
    for path in ("/v1/audit/checkpoint", "/v1/audit/proof/inclusion",
                 "/v1/audit/proof/consistency"):
        assert path in spec["paths"], path
    assert "receipt" in spec["components"]["schemas"]["KeysResponse"]["properties"]


def test_log_endpoints_refuse_requests_without_an_admin_token(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.url, verify=client_context(deployment.ca),
                      timeout=10) as http:
        r = http.get("/v1/audit/checkpoint")
    assert r.status_code == 401
    assert r.json()["problem"] == "unauthorized"


def test_a_consistency_proof_beyond_the_log_is_a_bad_request(deployment: Deployment) -> None:
    with deployment.admin() as admin:
        size = admin.checkpoint()["size"]
        with pytest.raises(RequestError, match="truncated"):
            admin.consistency_proof(size + 5)


def test_every_kind_of_decision_is_a_leaf_of_the_signed_log(deployment: Deployment) -> None:
    """Registrations, policy changes, rotations, revocations, retirements and token changes
    are audit records, hence leaves: each one's inclusion proof leads to the signed root."""
    from sealedtorch import crypto

    deployment.register("leafy-model")
    with deployment.admin() as admin:
        admin.set_policy("leafy-model", {"allow": [{"tee": "sim",
                                                     "measurement": "ab" * 48}]})
        admin.rotate("leafy-model", ModelKey.generate("leafy-model", 2))
        admin.revoke("leafy-model", 1, reason="test")
        admin.retire("leafy-model", 1, reason="test")
        token = admin.create_token("auditor", "leaf-auditor")
        admin.revoke_token(token["token_id"])
        records = admin.audit(limit=10_000)["records"]
        answer = admin.checkpoint()
        verifier = tlog.Verifier.parse(tlog.read_verifier(deployment.data).vkey)
        cp = tlog.open_checkpoint(answer["checkpoint"], verifier)
        events = {"register", "policy.set", "rotate", "revoke", "retire", "token.create",
                  "token.revoke", "keyserver.init"}
        seen = set()
        for rec in records:
            if rec["event"] not in events or rec["seq"] > cp.size:
                continue
            body = {k: v for k, v in rec.items() if k != "hash"}
            leaf = crypto.merkle_leaf_hash(protocol.canonical_json(body))
            proof = admin.inclusion_proof(rec["seq"] - 1, cp.size)["proof"]
            tlog.verify_inclusion(rec["seq"] - 1, cp.size, leaf,
                                  tlog.decode_hashes(proof, what="proof"), cp.root)
            seen.add(rec["event"])
    assert seen == events


def test_concurrent_fetches_through_one_client_are_not_mistaken_for_a_fork(
        deployment: Deployment) -> None:
    import threading

    deployment.register("busy-model")
    errors: list[BaseException] = []
    with AttestedKeyClient(deployment.url, deployment.ca, deployment.attester()) as client:
        def fetch() -> None:
            try:
                for _ in range(3):
                    client.fetch("busy-model")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert client.witness.broken is None
