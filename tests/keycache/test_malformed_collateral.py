"""A runtime (or whoever can reach the keycache's socket) that sends an SGX quote with
malformed collateral gets a typed refusal from the keycache, not an HTTP 500: cryptography
parses CRL issuers, CRL versions and certificate subjects lazily, and those used to escape
the collateral parser as ValueError / InvalidVersion (issue 11 §3)."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from sealedtorch import crypto
from sealedtorch.attest import Tee, VerifierConfig
from sealedtorch.attest.policy import load_policy
from sealedtorch.keycache.local import EvidenceAppraiser
from sealedtorch.keys import ModelKey

SGX_POLICY = load_policy({"allow": [{"tee": "sgx", "mr_signer": "00" * 32}]})


def _mangle(collateral: dict[str, str], field_name: str) -> dict[str, str]:
    if field_name == "root_ca_crl":  # CRL version 46: x509.InvalidVersion (not a ValueError)
        der = bytearray(bytes.fromhex(collateral["root_ca_crl"]))
        assert der[7:10] == b"\x02\x01\x01"
        der[9] = 0x2E
        return {**collateral, "root_ca_crl": der.hex()}
    assert field_name == "pck_crl"  # the CRL issuer's CN with an impossible tag: ValueError
    der = bytearray(bytes.fromhex(collateral["pck_crl"]))
    at = der.find(b"Intel SGX PCK") - 2
    assert der[at] == 0x0C
    der[at] = 0x4C
    return {**collateral, "pck_crl": der.hex()}


@pytest.mark.parametrize("field_name", ["root_ca_crl", "pck_crl"])
def test_malformed_collateral_is_refused_with_a_typed_collateral_problem(
        start_keycache, evidence, field_name):
    appraiser = EvidenceAppraiser(VerifierConfig(), tees=[Tee.SGX])
    kc = start_keycache([(ModelKey.generate("m"), SGX_POLICY)], appraiser=appraiser)
    collateral = json.loads((evidence / "sgx/collateral.json").read_text())
    quote = (evidence / "sgx/quote.bin").read_bytes()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(kc.socket)),
                      base_url="http://keycache", timeout=30) as http:
        nonce = http.post("/v1/challenge").json()["nonce"]
        body = {"model_id": "m", "nonce": nonce,
                "public_key": base64.b64encode(
                    crypto.EphemeralKeyPair.generate().public_bytes).decode(),
                "evidence": {"tee": "sgx", "evidence": base64.b64encode(quote).decode(),
                             "collateral": base64.b64encode(json.dumps(
                                 _mangle(collateral, field_name)).encode()).decode()}}
        r = http.post("/v1/key", json=body)
        assert r.status_code == 403, r.text
        assert r.json()["problem"] == "collateral"
        assert "collateral parse error" in r.json()["detail"]
        assert http.get("/v1/health").json()["ok"] is True  # and it keeps serving
