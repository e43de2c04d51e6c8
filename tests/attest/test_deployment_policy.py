"""The deployment-level attestation policy (keyserver.json ``attestation_policy``): what any
evidence must show before it gets an attestation token, with real evidence where we have it."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace

import pytest

from sealedtorch.attest import Evidence, Tee, verify
from sealedtorch.attest.evidence import SimClaims
from sealedtorch.attest.policy import DeploymentPolicy, load_deployment_policy
from sealedtorch.errors import ConfigError, PolicyError
from sealedtorch.keyserver import config

SGX_AT = 1751000000


@pytest.fixture
def sgx(evidence):
    return verify(Evidence(Tee.SGX, (evidence / "sgx/quote.bin").read_bytes(),
                           collateral=(evidence / "sgx/collateral.json").read_bytes()),
                  at=SGX_AT)


@pytest.fixture
def tdx(evidence):
    return verify(Evidence(Tee.TDX, (evidence / "tdx/quote.bin").read_bytes(),
                           collateral=(evidence / "tdx/collateral.json").read_bytes()),
                  at=SGX_AT)


@pytest.fixture
def snp(evidence):
    ev = Evidence(Tee.SNP, (evidence / "snp/milan-report.bin").read_bytes(),
                  certificates=(evidence / "snp/milan-vcek.der").read_bytes()
                  + (evidence / "snp/milan-ask-ark.pem").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return verify(ev)


def _sim(debug: bool = False) -> SimClaims:
    return SimClaims(tee=Tee.SIM, report_data=b"\0" * 64, debug=debug, insecure=True,
                     measurement=b"\1" * 48, svn=0, platform_key=b"\2" * 32)


def test_defaults_refuse_an_sgx_platform_that_is_not_up_to_date(sgx):
    decision = DeploymentPolicy().decide(sgx, sim_trusted=False)
    assert decision.reasons == ("deployment: tcb_status: expected UpToDate, got "
                                "ConfigurationAndSWHardeningNeeded",)


def test_an_operator_can_accept_a_listed_sgx_status(sgx):
    policy = load_deployment_policy({"sgx": {"tcb_status": [
        "UpToDate", "ConfigurationAndSWHardeningNeeded"]}})
    assert policy.decide(sgx, sim_trusted=False).allowed


def test_defaults_accept_the_up_to_date_tdx_quote_and_a_tee_tcb_svn_floor_refuses_it(tdx):
    assert DeploymentPolicy().decide(tdx, sim_trusted=False).allowed
    floor = bytearray(tdx.tee_tcb_svn)
    floor[2] += 1
    policy = load_deployment_policy({"tdx": {"min_tee_tcb_svn": floor.hex()}})
    decision = policy.decide(tdx, sim_trusted=False)
    assert not decision.allowed and "tee_tcb_svn" in decision.reasons[0]


def test_snp_tcb_floor_and_vmpl_apply_to_every_guest(snp):
    assert DeploymentPolicy().decide(snp, sim_trusted=False).allowed
    floor = {**snp.reported_tcb, "microcode": snp.reported_tcb["microcode"] + 1}
    policy = load_deployment_policy({"snp": {"min_tcb": floor}})
    assert policy.decide(snp, sim_trusted=False).reasons == (
        f"deployment: reported_tcb.microcode: expected >= {floor['microcode']}, got "
        f"{snp.reported_tcb['microcode']}",)
    assert not DeploymentPolicy().decide(replace(snp, vmpl=1), sim_trusted=False).allowed


def test_require_crl_refuses_a_report_whose_crl_was_unavailable(snp):
    assert snp.crl_status is not None and snp.crl_status.startswith("unavailable")
    policy = load_deployment_policy({"snp": {"require_crl": True}})
    decision = policy.decide(snp, sim_trusted=False)
    assert decision.reasons[0].startswith("deployment: crl_status: expected good")
    assert policy.decide(replace(snp, crl_status="good"), sim_trusted=False).allowed


def test_debug_is_refused_unless_the_deployment_allows_it(snp):
    debug = replace(snp, debug=True)
    assert DeploymentPolicy().decide(debug, sim_trusted=False).reasons == (
        "deployment: debug: expected false, got true",)
    assert load_deployment_policy({"allow_debug": True}).decide(debug, sim_trusted=False).allowed


def test_sim_needs_an_explicitly_trusted_platform_key_and_a_listing():
    assert DeploymentPolicy().decide(_sim(), sim_trusted=True).allowed
    assert not DeploymentPolicy().decide(_sim(), sim_trusted=False).allowed
    hardware = load_deployment_policy({"tees": ["snp"]})
    assert hardware.decide(_sim(), sim_trusted=True).reasons == (
        "deployment: tee: expected one of [snp], got sim",)


def test_odd_claims_deny_and_never_raise():
    broken = replace(_sim(), tee="nonsense")  # type: ignore[arg-type]
    assert not DeploymentPolicy().decide(broken, sim_trusted=True).allowed


@pytest.mark.parametrize(("section", "message"), [
    ({"tees": ["sgx", "xen"]}, "tees"),
    ({"tees": []}, "tees"),
    ({"sgx": {"tcb_status": ["Revoked"]}}, "Revoked"),
    ({"snp": {"vmpl": 4}}, "vmpl"),
    ({"collateral": {"prefer": "attester"}}, "prefer"),
    ({"allow_debug": "yes"}, "allow_debug"),
    ({"typo": 1}, "unknown field"),
    ([], "expected a mapping"),
])
def test_a_bad_attestation_policy_is_a_policy_error_naming_the_field(section, message):
    with pytest.raises(PolicyError, match=message):
        load_deployment_policy(section)  # type: ignore[arg-type]


def test_keyserver_config_reads_the_attestation_policy_and_refuses_a_bad_one(tmp_path):
    init = config.init_data_dir(tmp_path / "data", now=time.time())
    path = init.config.data_dir / config.CONFIG_FILE
    assert config.load_config(init.config.data_dir).attestation_policy == DeploymentPolicy()
    settings = json.loads(path.read_text())
    settings["attestation_policy"] = {"tees": ["tdx"], "collateral": {
        "min_tcb_evaluation_data_number": 17}}
    path.write_text(json.dumps(settings))
    cfg = config.load_config(init.config.data_dir)
    assert cfg.attestation_policy.tees == ["tdx"]
    assert cfg.attestation_policy.collateral.min_tcb_evaluation_data_number == 17
    settings["attestation_policy"] = {"tees": "tdx,sgx"}
    path.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="attestation_policy"):
        config.load_config(init.config.data_dir)
