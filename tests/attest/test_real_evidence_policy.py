"""Real evidence through the front door, then a policy: the path every key release takes."""

from __future__ import annotations

import os

import pytest

from sealedtorch.attest import Evidence, Tee, VerifierConfig, binding, verify
from sealedtorch.attest.policy import load_policy
from sealedtorch.errors import BindingError, PolicyDenied

SGX_AT = 1751000000


@pytest.fixture
def sgx_claims(evidence):
    ev = Evidence(Tee.SGX, (evidence / "sgx/quote.bin").read_bytes(),
                  collateral=(evidence / "sgx/collateral.json").read_bytes())
    return verify(ev, at=SGX_AT, config=VerifierConfig())


def _sgx_rule(claims, **extra):
    rule = {"tee": "sgx", "mr_enclave": claims.mr_enclave.hex(),
            "mr_signer": claims.mr_signer.hex(), **extra}
    return load_policy({"allow": [rule]})


def test_sgx_sample_is_denied_by_the_default_tcb_policy(sgx_claims):
    assert sgx_claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    decision = _sgx_rule(sgx_claims).decide_use(sgx_claims)
    assert not decision.allowed
    assert any("tcb_status" in r and "ConfigurationAndSWHardeningNeeded" in r
               for r in decision.reasons)


def test_sgx_sample_is_allowed_when_the_status_and_both_advisories_are_accepted(sgx_claims):
    policy = _sgx_rule(sgx_claims, tcb_status=["UpToDate", "ConfigurationAndSWHardeningNeeded"],
                       allowed_advisories=["INTEL-SA-00289", "INTEL-SA-00615"])
    assert policy.decide_use(sgx_claims).allowed


def test_sgx_sample_is_denied_naming_the_advisory_that_is_not_accepted(sgx_claims):
    policy = _sgx_rule(sgx_claims, tcb_status=["ConfigurationAndSWHardeningNeeded"],
                       allowed_advisories=["INTEL-SA-00289"])
    decision = policy.decide_use(sgx_claims)
    assert not decision.allowed and any("INTEL-SA-00615" in r for r in decision.reasons)
    with pytest.raises(PolicyDenied, match="INTEL-SA-00615"):
        decision.raise_if_denied()


def test_sgx_sample_with_other_mr_enclave_is_denied(sgx_claims):
    policy = load_policy({"allow": [{"tee": "sgx", "mr_enclave": "00" * 32,
                                     "tcb_status": ["ConfigurationAndSWHardeningNeeded"],
                                     "allowed_advisories": ["INTEL-SA-00289",
                                                            "INTEL-SA-00615"]}]})
    decision = policy.decide_use(sgx_claims)
    assert not decision.allowed and any("mr_enclave" in r for r in decision.reasons)


def test_published_evidence_is_not_bound_to_a_sealedtorch_challenge(sgx_claims):
    with pytest.raises(BindingError):
        binding.check(sgx_claims.report_data, os.urandom(32), os.urandom(32))


def test_tdx_sample_is_allowed_by_a_policy_pinning_its_mr_td(evidence):
    ev = Evidence(Tee.TDX, (evidence / "tdx/quote.bin").read_bytes(),
                  collateral=(evidence / "tdx/collateral.json").read_bytes())
    claims = verify(ev, at=1751000000)
    assert claims.tcb_status == "UpToDate"
    policy = load_policy({"allow": [{"tee": "tdx", "mr_td": claims.mr_td.hex(),
                                     "rtmr": {i: getattr(claims, f"rtmr{i}").hex()
                                              for i in range(4)},
                                     "xfam": claims.xfam.hex()}]})
    assert policy.decide_use(claims).allowed


def test_snp_sample_is_checked_against_measurement_and_min_tcb(evidence):
    ev = Evidence(Tee.SNP, (evidence / "snp/milan-report.bin").read_bytes(),
                  certificates=(evidence / "snp/milan-vcek.der").read_bytes()
                  + (evidence / "snp/milan-ask-ark.pem").read_bytes())
    with pytest.warns(Warning):  # AMD VCEKs have serial number 0; the warning stays visible
        claims = verify(ev)
    tcb = claims.reported_tcb
    ok = load_policy({"allow": [{"tee": "snp", "measurement": claims.measurement.hex(),
                                 "min_tcb": {k: tcb[k] for k in
                                             ("bootloader", "tee", "snp", "microcode")},
                                 "waive": ["smt"]}]})  # this Milan host runs with SMT
    assert ok.decide_use(claims).allowed
    too_high = load_policy({"allow": [{"tee": "snp", "measurement": claims.measurement.hex(),
                                       "min_tcb": {"snp": tcb["snp"] + 1},
                                       "waive": ["smt"]}]})
    decision = too_high.decide_use(claims)
    assert not decision.allowed and any("snp" in r for r in decision.reasons)
