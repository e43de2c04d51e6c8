"""Strict unless a rule names the waiver: the same principle for SNP, TDX and SGX, shown on
the real evidence in /work/shared/evidence both ways (refused by default, accepted when the
rule pins the value or names the waiver)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest

from sealedtorch.attest import Evidence, Tee, verify
from sealedtorch.attest.evidence import SnpClaims
from sealedtorch.attest.policy import load_policy
from sealedtorch.errors import PolicyError

TDX_AT = 1751000000
SECOND_TDX_AT = 1757000000
SGX_AT = 1751000000


def _tdx(evidence, name: str = "quote", at: int = TDX_AT):
    collateral = name.replace("quote", "collateral")
    ev = Evidence(Tee.TDX, (evidence / f"tdx/{name}.bin").read_bytes(),
                  collateral=(evidence / f"tdx/{collateral}.json").read_bytes())
    return verify(ev, at=at)


def _snp(evidence, name: str = "milan") -> SnpClaims:
    ev = Evidence(Tee.SNP, (evidence / f"snp/{name}-report.bin").read_bytes(),
                  certificates=(evidence / f"snp/{name}-vcek.der").read_bytes()
                  + (evidence / f"snp/{name}-ask-ark.pem").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD VCEK serial 0 (tested in test_snp.py)
        claims = verify(ev)
    assert isinstance(claims, SnpClaims)
    return claims


def _sgx(evidence):
    ev = Evidence(Tee.SGX, (evidence / "sgx/quote.bin").read_bytes(),
                  collateral=(evidence / "sgx/collateral.json").read_bytes())
    return verify(ev, at=SGX_AT)


def _decide(rule: dict, claims):
    return load_policy({"allow": [rule]}).decide_use(claims)


def _pinned_tdx_rule(claims, **extra) -> dict:
    return {"tee": "tdx", "mr_td": claims.mr_td.hex(),
            "rtmr": {i: getattr(claims, f"rtmr{i}").hex() for i in range(4)},
            "xfam": claims.xfam.hex(), **extra}


def _snp_rule(claims, **extra) -> dict:
    return {"tee": "snp", "measurement": claims.measurement.hex(),
            "min_tcb": dict(claims.reported_tcb), **extra}


# --------------------------------------------------------------------------- TDX

@pytest.mark.parametrize(("name", "at"), [("quote", TDX_AT), ("second-quote", SECOND_TDX_AT)])
def test_real_tdx_quote_is_refused_by_a_rule_that_pins_neither_rtmrs_nor_xfam(evidence, name,
                                                                              at):
    claims = _tdx(evidence, name, at)
    decision = _decide({"tee": "tdx", "mr_td": claims.mr_td.hex()}, claims)
    assert not decision.allowed
    for index in range(4):
        assert f"allow[0] (tdx): rtmr[{index}]: not pinned by the rule (pin rtmr.{index} or " \
               f"waive: [rtmr{index}])" in decision.reasons
    assert any(r.startswith(f"allow[0] (tdx): xfam: not pinned by the rule, got "
                            f"{claims.xfam.hex()}") for r in decision.reasons)


@pytest.mark.parametrize(("name", "at"), [("quote", TDX_AT), ("second-quote", SECOND_TDX_AT)])
def test_real_tdx_quote_is_accepted_when_its_rtmrs_and_xfam_are_pinned(evidence, name, at):
    claims = _tdx(evidence, name, at)
    decision = _decide(_pinned_tdx_rule(claims), claims)
    assert decision.allowed, decision.reasons


def test_real_tdx_quote_is_accepted_when_the_rule_waives_rtmrs_and_xfam(evidence):
    claims = _tdx(evidence)
    rule = {"tee": "tdx", "mr_td": claims.mr_td.hex(), "rtmr": {0: claims.rtmr0.hex()},
            "waive": ["rtmr1", "rtmr2", "rtmr3", "xfam"]}
    assert _decide(rule, claims).allowed


def test_waiving_one_rtmr_still_requires_the_others(evidence):
    claims = _tdx(evidence)
    rule = _pinned_tdx_rule(claims)
    rule["rtmr"] = {i: v for i, v in rule["rtmr"].items() if i != 2}
    decision = _decide(rule, claims)
    assert decision.reasons == ("allow[0] (tdx): rtmr[2]: not pinned by the rule (pin rtmr.2 "
                                "or waive: [rtmr2])",)
    assert _decide({**rule, "waive": ["rtmr2"]}, claims).allowed


def test_real_tdx_quote_has_sept_ve_disable_and_a_td_without_it_is_refused(evidence):
    claims = _tdx(evidence)
    assert int.from_bytes(claims.td_attributes, "little") >> 28 & 1  # the real TD sets it
    cleared = (int.from_bytes(claims.td_attributes, "little") & ~(1 << 28)).to_bytes(8, "little")
    weak = replace(claims, td_attributes=cleared)
    decision = _decide(_pinned_tdx_rule(claims), weak)
    assert not decision.allowed
    assert decision.reasons == (f"allow[0] (tdx): td_attributes: SEPT_VE_DISABLE (bit 28) is "
                                f"not set in {cleared.hex()}: the host can inject #VE on EPT "
                                "violations (waive: [sept_ve_disable] to accept)",)
    assert _decide(_pinned_tdx_rule(claims, waive=["sept_ve_disable"]), weak).allowed


def test_tdx_debug_attribute_is_refused_unless_allow_debug(evidence):
    claims = _tdx(evidence)
    attrs = bytes([claims.td_attributes[0] | 1]) + claims.td_attributes[1:]
    debug = replace(claims, td_attributes=attrs, debug=True)
    assert not _decide(_pinned_tdx_rule(claims), debug).allowed
    assert _decide(_pinned_tdx_rule(claims, allow_debug=True), debug).allowed


def test_a_different_xfam_is_refused_naming_both_values(evidence):
    claims = _tdx(evidence)
    other = replace(claims, xfam=bytes.fromhex("0702000000000000"))
    decision = _decide(_pinned_tdx_rule(claims), other)
    assert decision.reasons == (f"allow[0] (tdx): xfam: expected {claims.xfam.hex()}, got "
                                "0702000000000000",)


def test_claims_without_xfam_are_refused(evidence):
    claims = replace(_tdx(evidence), xfam=b"")  # e.g. a verifier that did not report it
    assert not _decide(_pinned_tdx_rule(_tdx(evidence)), claims).allowed


@pytest.mark.parametrize(("rule", "message"), [
    ({"rtmr": {3: "00" * 48}, "waive": ["rtmr3"]}, "rtmr 3 is both pinned and waived"),
    ({"xfam": "00" * 8, "waive": ["xfam"]}, "xfam is both pinned and waived"),
    ({"waive": ["smt"]}, "waive"),
])
def test_contradictory_or_unknown_tdx_waivers_are_policy_errors(rule, message):
    with pytest.raises(PolicyError, match=message):
        load_policy({"allow": [{"tee": "tdx", "mr_td": "11" * 48, **rule}]})


# --------------------------------------------------------------------------- SNP

def test_real_snp_report_runs_with_smt_and_is_refused_by_default(evidence):
    claims = _snp(evidence)
    assert claims.policy & (1 << 16) and claims.platform_info & 1
    decision = _decide(_snp_rule(claims), claims)
    assert not decision.allowed
    assert decision.reasons == (
        "allow[0] (snp): policy: SMT (bit 16) is set in 0x30000: the guest may run with "
        "simultaneous multithreading (waive: [smt] to accept)",
        "allow[0] (snp): platform_info: SMT_EN (bit 0) is set in 0x1: the platform runs with "
        "SMT enabled (waive: [smt] to accept)")


def test_real_snp_report_is_accepted_when_the_rule_waives_smt(evidence):
    claims = _snp(evidence)
    assert _decide(_snp_rule(claims, waive=["smt"]), claims).allowed


def test_snp_rule_without_a_tcb_floor_is_refused_unless_waived(evidence):
    claims = _snp(evidence)
    rule = {"tee": "snp", "measurement": claims.measurement.hex(), "waive": ["smt"]}
    decision = _decide(rule, claims)
    assert decision.reasons == ("allow[0] (snp): reported_tcb: the rule sets no TCB floor (set "
                                "min_tcb or waive: [min_tcb])",)
    assert _decide({**rule, "waive": ["smt", "min_tcb"]}, claims).allowed


@pytest.mark.parametrize("component", ["bootloader", "tee", "snp", "microcode"])
def test_real_snp_report_below_the_tcb_floor_is_refused_naming_the_component(evidence,
                                                                            component):
    claims = _snp(evidence)
    floor = {**claims.reported_tcb, component: claims.reported_tcb[component] + 1}
    decision = _decide(_snp_rule(claims, min_tcb=floor, waive=["smt"]), claims)
    assert decision.reasons == (f"allow[0] (snp): reported_tcb.{component}: expected >= "
                                f"{floor[component]}, got {claims.reported_tcb[component]}",)


def test_a_fmc_floor_refuses_a_milan_report_that_has_no_fmc(evidence):
    claims = _snp(evidence)  # Milan: no fmcSPL (Turin only)
    decision = _decide(_snp_rule(claims, min_tcb={"fmc": 1}, waive=["smt"]), claims)
    assert decision.reasons == ("allow[0] (snp): reported_tcb.fmc: expected >= 1, got nothing "
                                "(field absent from claims)",)


def test_a_turin_fmc_floor_is_compared(evidence):
    claims = _snp(evidence)
    turin = replace(claims, reported_tcb={**claims.reported_tcb, "fmc": 2})
    assert _decide(_snp_rule(turin, waive=["smt"]), turin).allowed
    decision = _decide(_snp_rule(turin, min_tcb={**turin.reported_tcb, "fmc": 3},
                                 waive=["smt"]), turin)
    assert decision.reasons == ("allow[0] (snp): reported_tcb.fmc: expected >= 3, got 2",)


def test_snp_vmpl_defaults_to_zero(evidence):
    claims = _snp(evidence)
    assert claims.vmpl == 0
    lower = replace(claims, vmpl=2)
    decision = _decide(_snp_rule(claims, waive=["smt"]), lower)
    assert decision.reasons == ("allow[0] (snp): vmpl: expected <= 0, got 2",)
    assert _decide(_snp_rule(claims, waive=["smt"], vmpl=2), lower).allowed


def test_snp_migration_agent_is_refused_unless_waived(evidence):
    claims = _snp(evidence)
    migratable = replace(claims, policy=claims.policy | 1 << 18)
    decision = _decide(_snp_rule(claims, waive=["smt"]), migratable)
    assert decision.reasons == (f"allow[0] (snp): policy: MIGRATE_MA (bit 18) is set in "
                                f"0x{migratable.policy:x}: a migration agent may be associated "
                                "(waive: [migrate_ma] to accept)",)
    assert _decide(_snp_rule(claims, waive=["smt", "migrate_ma"]), migratable).allowed


def test_second_real_snp_report_is_a_debug_guest_refused_even_with_smt_waived(evidence):
    claims = _snp(evidence, "second")
    assert claims.debug and claims.policy >> 19 & 1
    decision = _decide(_snp_rule(claims, waive=["smt"]), claims)
    assert not decision.allowed and any(r.startswith("allow[0] (snp): debug: expected false")
                                        for r in decision.reasons)
    assert _decide(_snp_rule(claims, waive=["smt"], allow_debug=True), claims).allowed


def test_snp_claims_without_platform_info_are_refused(evidence):
    claims = replace(_snp(evidence), platform_info=None)
    decision = _decide(_snp_rule(claims, waive=["smt"]), claims)
    assert decision.reasons == ("allow[0] (snp): platform_info: expected a value, got none",)


def test_snp_min_tcb_both_set_and_waived_is_a_policy_error():
    with pytest.raises(PolicyError, match="min_tcb is both set and waived"):
        load_policy({"allow": [{"tee": "snp", "measurement": "11" * 48,
                                "min_tcb": {"snp": 1}, "waive": ["min_tcb"]}]})


# --------------------------------------------------------------------------- SGX (KSS)

def _sgx_rule(claims, **extra) -> dict:
    return {"tee": "sgx", "mr_enclave": claims.mr_enclave.hex(),
            "tcb_status": ["ConfigurationAndSWHardeningNeeded"],
            "allowed_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"], **extra}


def test_real_sgx_quote_has_no_kss_identity_and_passes_the_strict_default(evidence):
    claims = _sgx(evidence)
    assert claims.isv_ext_prod_id == bytes(16) and claims.isv_family_id == bytes(16)
    assert claims.config_id == bytes(64) and claims.config_svn == 0
    assert _decide(_sgx_rule(claims), claims).allowed


@pytest.mark.parametrize(("field", "size"), [("isv_ext_prod_id", 16), ("isv_family_id", 16),
                                             ("config_id", 64)])
def test_an_unpinned_kss_field_that_is_set_is_refused(evidence, field, size):
    claims = _sgx(evidence)
    value = b"\x07" * size
    kss = replace(claims, **{field: value})
    decision = _decide(_sgx_rule(claims), kss)
    assert decision.reasons == (f"allow[0] (sgx): {field}: expected all zero (not pinned by "
                                f"the rule), got {value.hex()} (pin {field} or waive: [kss])",)
    assert _decide(_sgx_rule(claims, **{field: value.hex()}), kss).allowed
    assert _decide(_sgx_rule(claims, waive=["kss"]), kss).allowed


def test_kss_config_svn_is_a_floor_and_zero_when_not_pinned(evidence):
    claims = replace(_sgx(evidence), config_svn=4)
    decision = _decide(_sgx_rule(claims), claims)
    assert decision.reasons == ("allow[0] (sgx): config_svn: expected 0 (no KSS config "
                                "pinned), got 4 (pin min_config_svn or waive: [kss])",)
    assert _decide(_sgx_rule(claims, min_config_svn=4), claims).allowed
    assert not _decide(_sgx_rule(claims, min_config_svn=5), claims).allowed
