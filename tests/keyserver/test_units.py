"""Small pieces: token claims round trip, problem ↔ error mapping, KEK binding, store nonces."""

from __future__ import annotations

import pytest

from sealedtorch import crypto, errors
from sealedtorch.attest.evidence import SgxClaims, SimClaims, SnpClaims, TdxClaims, Tee
from sealedtorch.keyserver import problems, protocol
from sealedtorch.keyserver.kek import FileKek
from sealedtorch.keyserver.store import SqliteStore
from sealedtorch.keyserver.tokens import TokenSigner, claims_from_json

CLAIMS = [
    SgxClaims(tee=Tee.SGX, report_data=b"\x01" * 64, debug=False,
              tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",),
              mr_enclave=b"\x02" * 32, mr_signer=b"\x03" * 32, isv_prod_id=1, isv_svn=2,
              attributes=b"\x04" * 16, cpu_svn=b"\x05" * 16, fmspc="00906ED50000"),
    TdxClaims(tee=Tee.TDX, report_data=b"\x01" * 64, debug=False, tcb_status="UpToDate",
              mr_td=b"\x02" * 48, rtmr0=b"\x03" * 48, rtmr1=b"\x04" * 48, rtmr2=b"\x05" * 48,
              rtmr3=b"\x06" * 48, mr_config_id=b"\x07" * 48, mr_owner=b"\x08" * 48,
              mr_owner_config=b"\x09" * 48, mr_seam=b"\x0a" * 48, td_attributes=b"\x0b" * 8,
              tee_tcb_svn=b"\x0c" * 16),
    SnpClaims(tee=Tee.SNP, report_data=b"\x01" * 64, debug=False, version=2, guest_svn=1,
              measurement=b"\x02" * 48, host_data=b"\x03" * 32, id_key_digest=b"\x04" * 48,
              author_key_digest=b"\x05" * 48, policy=0x30000,
              reported_tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
              committed_tcb={"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
              chip_id=b"\x06" * 64, vmpl=0, signing_key="vcek"),
    SimClaims(tee=Tee.SIM, report_data=b"\x01" * 64, debug=True, insecure=True,
              measurement=b"\x02" * 48, svn=7, platform_key=b"\x03" * 32),
]


@pytest.mark.parametrize("claims", CLAIMS, ids=lambda c: c.tee.value)
def test_token_carries_claims_exactly(claims):
    signer = TokenSigner(crypto.SigningKey.generate())
    pk = crypto.EphemeralKeyPair.generate().public_bytes
    token, issued = signer.issue(claims=claims, public_key=pk, role=protocol.Role.HOLDER,
                                 evidence_digest="ab", now=1000.0, ttl=60)
    got = signer.verify(token, now=1030.0)
    assert got.claims == claims and claims_from_json(claims.to_json()) == claims
    assert got.public_key == pk and got.thumbprint == protocol.thumbprint(pk)
    assert got.role is protocol.Role.HOLDER and got.token_id == issued.token_id
    with pytest.raises(errors.AuthenticationError, match="expired"):
        signer.verify(token, now=1060.0)
    with pytest.raises(errors.AuthenticationError, match="not issued by this keyserver"):
        TokenSigner(crypto.SigningKey.generate()).verify(token, now=1030.0)


def test_thumbprint_is_rfc7638():
    # RFC 8037 appendix A.6 (X25519 public key) -> RFC 7638 over {"crv","kty","x"}
    pk = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    jwk = protocol.canonical_json(protocol.x25519_jwk(pk))
    assert jwk == b'{"crv":"X25519","kty":"OKP","x":"3p7bfXt9wbTTW2HC7OQ1Nz-DQ8hbeGdNrfx-FG-IK08"}'
    assert protocol.thumbprint(pk) == protocol.b64url(crypto.sha256(jwk))


@pytest.mark.parametrize("cls", [errors.RequestError, errors.AuthenticationError,
                                 errors.NonceError, errors.BindingError,
                                 errors.AttestationError, errors.CollateralError,
                                 errors.KeyUnavailable, errors.ConflictError,
                                 errors.PolicyError])
def test_problem_round_trip(cls):
    body = problems.problem_for(cls("what went wrong"), request_id="r1")
    assert body["type"] == "urn:sealedtorch:problem:" + cls.problem_type
    exc = problems.error_from_problem(body, body["status"])
    assert type(exc) is cls and "what went wrong" in str(exc) and "r1" in str(exc)


def test_policy_denied_round_trip_keeps_reasons_and_unknown_types_degrade():
    denied = errors.PolicyDenied("no allow rule of the policy matches", ["a: x", "b: y"])
    exc = problems.error_from_problem(problems.problem_for(denied, request_id=None), 403)
    assert isinstance(exc, errors.PolicyDenied) and exc.reasons == ("a: x", "b: y")
    other = problems.error_from_problem({"type": "urn:x:new", "detail": "d"}, 418)
    assert type(other) is errors.SealedTorchError and "418" in str(other)
    hidden = problems.problem_for(errors.IntegrityError("KEK abc wrong"), request_id=None)
    assert "KEK" not in hidden["detail"] and hidden["status"] == 500


def test_wrapped_keys_are_bound_to_model_and_version(tmp_path):
    kek = FileKek.create(tmp_path / "kek.json")
    assert (tmp_path / "kek.json").stat().st_mode & 0o777 == 0o600
    secret = crypto.generate_key()
    wrapped = kek.wrap(secret, model_id="m", version=1)
    assert FileKek.load(tmp_path / "kek.json").unwrap(wrapped, model_id="m", version=1) == secret
    for model_id, version in (("m", 2), ("n", 1)):
        with pytest.raises(errors.IntegrityError):
            kek.unwrap(wrapped, model_id=model_id, version=version)
    with pytest.raises(errors.KeyFileError):
        FileKek.create(tmp_path / "kek.json")


def test_nonce_states(tmp_path):
    store = SqliteStore(tmp_path / "s.db")
    with store.transaction(durable=False) as tx:
        tx.insert_nonce(b"n" * 32, "sim", 100.0, 160.0)
    for nonce, tee, now, match in ((b"x" * 32, "sim", 110, "never issued"),
                                   (b"n" * 32, "sgx", 110, "issued for sim"),
                                   (b"n" * 32, "sim", 160, "expired")):
        with pytest.raises(errors.NonceError, match=match), store.transaction() as tx:
            tx.consume_nonce(nonce, tee, now)
    with store.transaction() as tx:
        tx.consume_nonce(b"n" * 32, "sim", 110)
    with pytest.raises(errors.NonceError, match="already used"), store.transaction() as tx:
        tx.consume_nonce(b"n" * 32, "sim", 111)
    with store.transaction() as tx:
        assert tx.purge_nonces(161.0) == 1
    store.close()
