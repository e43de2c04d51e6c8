"""The keyserver's services on their own, without TLS or HTTP: a real SQLite store, a file
KEK, sim evidence, and one shared audit recorder, as :class:`~.service.Keyserver` wires
them.  One behaviour each."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealedtorch import attest, crypto, errors
from sealedtorch.attest import binding, measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import protocol, tlog
from sealedtorch.keyserver.admin_service import AdminService
from sealedtorch.keyserver.attestation_service import AttestationService
from sealedtorch.keyserver.audit_recorder import AuditRecorder, FailureSampler, RequestContext
from sealedtorch.keyserver.kek import FileKek
from sealedtorch.keyserver.metrics import KeyserverMetrics
from sealedtorch.keyserver.release_service import ReleaseService
from sealedtorch.keyserver.rowmac import RowIntegrity
from sealedtorch.keyserver.store import AdminTokenRecord, KeyState, SqliteStore
from sealedtorch.keyserver.tokens import (
    TokenSigner,
    admin_token_hash,
    admin_token_id,
    new_admin_token,
)

CTX = RequestContext("127.0.0.1", "test-request")
MEASUREMENT = measure.measurement(b"service-tests")


@dataclass
class Services:
    attestation: AttestationService
    releases: ReleaseService
    admin: AdminService
    recorder: AuditRecorder
    admin_record: AdminTokenRecord
    platform: sim.SimPlatform
    db: Path

    def audit(self) -> list[dict]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT record FROM audit ORDER BY seq").fetchall()
        finally:
            conn.close()
        return [json.loads(r[0]) for r in rows]

    def register(self, model_id: str, measurement: bytes = MEASUREMENT) -> ModelKey:
        key = ModelKey.generate(model_id)
        self.admin.register(self.admin_record, CTX, protocol.RegisterRequest(
            model_id=model_id, key=protocol.KeyMaterial(
                version=key.version, key=protocol.b64encode(key.secret)),
            policy={"allow": [{"tee": "sim", "measurement": measurement.hex()}]}))
        return key

    def attest(self, measurement: bytes = MEASUREMENT) -> tuple[str, crypto.EphemeralKeyPair]:
        pair = crypto.EphemeralKeyPair.generate()
        issued = self.attestation.attest(self.attest_request(pair.public_bytes, measurement),
                                         CTX)
        return issued.token, pair

    def attest_request(self, public_key: bytes, measurement: bytes = MEASUREMENT, *,
                       nonce: bytes | None = None) -> protocol.AttestRequest:
        nonce = nonce or self.attestation.challenge("sim", CTX).nonce
        evidence = SimAttester(self.platform, measurement).evidence(
            binding.report_data(nonce, public_key))
        return protocol.AttestRequest(nonce=protocol.b64encode(nonce), tee="sim",
                                      evidence=protocol.b64encode(evidence.data),
                                      public_key=protocol.b64encode(public_key))


@pytest.fixture
def services(tmp_path: Path):
    platform = sim.init_platform(tmp_path / "sim")
    db = tmp_path / "keyserver.db"
    store = SqliteStore(db)
    kek = FileKek.create(tmp_path / "kek.json")
    signer = TokenSigner(crypto.SigningKey.generate())
    metrics = KeyserverMetrics()
    recorder = AuditRecorder(store=store, clock=time.time, metrics=metrics)
    rows = RowIntegrity(kek, on_failure=recorder.integrity_failure)
    log = tlog.TransparencyLog(tlog.Signer.generate())
    verifier = attest.VerifierConfig(
        sim_platform_keys=sim.load_platform_keys([tmp_path / "sim" / sim.PUB_FILE]))
    token_hash = admin_token_hash(new_admin_token())
    now = time.time()
    admin_record = rows.seal_token(AdminTokenRecord(
        admin_token_id(token_hash), "initial", "admin", now, principal_id="initial",
        expires_at=now + 3600, token_hash=token_hash))
    with store.transaction() as tx:
        tx.insert_admin_token(admin_record, token_hash)
    try:
        yield Services(
            attestation=AttestationService(store=store, signer=signer, verifier=verifier,
                                           recorder=recorder, metrics=metrics),
            releases=ReleaseService(store=store, kek=kek, signer=signer, rows=rows,
                                    transparency=log, recorder=recorder, metrics=metrics),
            admin=AdminService(store=store, kek=kek, rows=rows, transparency=log,
                               recorder=recorder),
            recorder=recorder, admin_record=admin_record, platform=platform, db=db)
    finally:
        store.close()


def test_a_nonce_serves_one_attestation_only(services):
    pair = crypto.EphemeralKeyPair.generate()
    nonce = services.attestation.challenge("sim", CTX).nonce
    services.attestation.attest(services.attest_request(pair.public_bytes, nonce=nonce), CTX)
    with pytest.raises(errors.NonceError):
        services.attestation.attest(services.attest_request(pair.public_bytes, nonce=nonce),
                                    CTX)


def test_evidence_bound_to_another_key_gets_no_token_and_is_audited(services):
    request = services.attest_request(crypto.EphemeralKeyPair.generate().public_bytes)
    request = request.model_copy(update={"public_key": protocol.b64encode(
        crypto.EphemeralKeyPair.generate().public_bytes)})
    with pytest.raises(errors.BindingError):
        services.attestation.attest(request, CTX)
    last = services.audit()[-1]
    assert last["event"] == "attest" and last["decision"] == "deny"


def test_a_released_key_opens_only_with_the_attested_private_key(services):
    key = services.register("svc-open")
    token, pair = services.attest()
    (released,) = services.releases.release(token, CTX, model_id="svc-open")
    info = protocol.release_info("svc-open", released.version, released.policy_digest)
    assert pair.open(released.sealed, info=info) == key.secret


def test_a_release_is_on_the_transparency_log_receipt(services):
    services.register("svc-receipt")
    token, _ = services.attest()
    keys, receipt = services.releases.release_with_receipt(token, CTX, model_id="svc-receipt")
    assert [k.model_id for k in keys] == ["svc-receipt"]
    assert len(receipt["entries"]) == 1


def test_an_unknown_model_is_refused_like_one_the_policy_refuses(services):
    services.register("svc-other", measurement=measure.measurement(b"someone-else"))
    token, _ = services.attest()
    with pytest.raises(errors.PolicyDenied) as unknown:
        services.releases.release(token, CTX, model_id="svc-nonexistent")
    with pytest.raises(errors.PolicyDenied) as refused:
        services.releases.release(token, CTX, model_id="svc-other")
    assert str(unknown.value) == str(refused.value)


def test_a_revoked_key_is_no_longer_released(services):
    services.register("svc-revoked")
    services.admin.change_state(services.admin_record, CTX, protocol.StateChangeRequest(
        model_id="svc-revoked"), KeyState.REVOKED)
    token, _ = services.attest()
    with pytest.raises(errors.KeyUnavailable):
        services.releases.release(token, CTX, model_id="svc-revoked")


def test_an_owner_sees_another_owners_model_as_unknown(services):
    services.register("svc-admins")
    owner_token = services.admin.create_token(services.admin_record, CTX,
                                              protocol.TokenCreateRequest(role="owner",
                                                                          name="svc-owner"))
    owner = services.admin.authenticate_admin(owner_token.token, CTX, "test")
    with pytest.raises(errors.KeyUnavailable):
        services.admin.list_models(owner, CTX, "svc-admins")


def test_the_services_share_one_failure_budget(services):
    services.recorder.failures = FailureSampler(budget=1, window=3600.0)
    before = len(services.audit())
    for _ in range(3):
        with pytest.raises(errors.RequestError):
            services.attestation.challenge("no-such-tee", CTX)
    with pytest.raises(errors.AuthenticationError):
        services.releases.release(None, CTX)
    assert len(services.audit()) == before + 1
