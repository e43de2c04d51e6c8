"""Attestation policies: loading/validation, digests, and the decision engine."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealedtorch.attest.evidence import Claims, SgxClaims, SimClaims, SnpClaims, TdxClaims, Tee
from sealedtorch.attest.policy import (
    TCB_STATUSES,
    Decision,
    Policy,
    SgxRule,
    decide,
    load_policy,
)
from sealedtorch.errors import PolicyDenied, PolicyError

H32A, H32B, H32C = "a1" * 32, "b2" * 32, "c3" * 32
H48A, H48B, H48C = "a1" * 48, "b2" * 48, "c3" * 48
SVN16 = bytes([3, 1, 2, 0] + [0] * 12)
#: A production TD: SEPT_VE_DISABLE (bit 28) set, not debug; the XFAM of the real TDX quote.
TD_ATTRIBUTES = (1 << 28).to_bytes(8, "little")
XFAM = "e702060000000000"


def sgx_claims(**kw) -> SgxClaims:
    base = dict(tee=Tee.SGX, report_data=b"\0" * 64, debug=False, tcb_status="UpToDate",
                mr_enclave=bytes.fromhex(H32A), mr_signer=bytes.fromhex(H32B), isv_prod_id=1,
                isv_svn=2, attributes=b"\0" * 16, isv_ext_prod_id=b"\0" * 16,
                isv_family_id=b"\0" * 16, config_id=b"\0" * 64, config_svn=0)
    return SgxClaims(**{**base, **kw})


def tdx_claims(**kw) -> TdxClaims:
    base = dict(tee=Tee.TDX, report_data=b"\0" * 64, debug=False, tcb_status="UpToDate",
                mr_td=bytes.fromhex(H48A), rtmr0=bytes.fromhex(H48A), rtmr1=bytes.fromhex(H48B),
                rtmr2=b"\0" * 48, rtmr3=b"\0" * 48, mr_config_id=b"\0" * 48, mr_owner=b"\0" * 48,
                mr_owner_config=b"\0" * 48, mr_seam=bytes.fromhex(H48C),
                td_attributes=TD_ATTRIBUTES, tee_tcb_svn=SVN16, xfam=bytes.fromhex(XFAM))
    return TdxClaims(**{**base, **kw})


def snp_claims(**kw) -> SnpClaims:
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    base = dict(tee=Tee.SNP, report_data=b"\0" * 64, debug=False, version=3, guest_svn=2,
                measurement=bytes.fromhex(H48A), host_data=bytes.fromhex(H32A),
                id_key_digest=bytes.fromhex(H48B), author_key_digest=bytes.fromhex(H48C),
                policy=0x20000, reported_tcb=tcb, committed_tcb=tcb, chip_id=b"\1" * 64, vmpl=0,
                signing_key="vcek", platform_info=0)
    return SnpClaims(**{**base, **kw})


def sim_claims(**kw) -> SimClaims:
    base = dict(tee=Tee.SIM, report_data=b"\0" * 64, debug=False, insecure=True,
                measurement=bytes.fromhex(H48A), svn=1, platform_key=bytes.fromhex(H32C))
    return SimClaims(**{**base, **kw})


def policy(*rules: dict, holders: list[dict] | None = None) -> Policy:
    doc: dict = {"allow": list(rules)}
    if holders is not None:
        doc["holders"] = holders
    return load_policy(doc)


SGX_RULE = {"tee": "sgx", "mr_enclave": H32A, "mr_signer": H32B, "isv_prod_id": 1,
            "min_isv_svn": 2}
TDX_RULE = {"tee": "tdx", "mr_td": H48A, "rtmr": {0: H48A, 1: H48B, 2: "00" * 48, 3: "00" * 48},
            "xfam": XFAM, "mr_seam": H48C,
            "mr_config_id": "00" * 48, "mr_owner": "00" * 48, "mr_owner_config": "00" * 48,
            "min_tee_tcb_svn": SVN16.hex()}
SNP_RULE = {"tee": "snp", "measurement": H48A, "host_data": H32A, "id_key_digest": H48B,
            "author_key_digest": H48C, "min_guest_svn": 2, "vmpl": 0,
            "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}}
SIM_RULE = {"tee": "sim", "measurement": H48A, "min_svn": 1, "platform_key": H32C}


# --------------------------------------------------------------------------- matching

@pytest.mark.parametrize(("rule", "claims"), [
    (SGX_RULE, sgx_claims()), (TDX_RULE, tdx_claims()), (SNP_RULE, snp_claims()),
    (SIM_RULE, sim_claims()),
], ids=["sgx", "tdx", "snp", "sim"])
def test_fully_pinned_rule_allows_matching_claims(rule, claims):
    decision = policy(rule).decide_use(claims)
    assert decision.allowed, decision.reasons
    assert decision.matched_rule == 0
    assert decision.reasons[0] == f"allow[0] ({rule['tee']}): matched"


@pytest.mark.parametrize(("rule", "claims", "reason"), [
    (SGX_RULE, sgx_claims(mr_enclave=bytes.fromhex(H32C)),
     f"allow[0] (sgx): mr_enclave: expected {H32A}, got {H32C}"),
    (SGX_RULE, sgx_claims(mr_signer=bytes.fromhex(H32C)),
     f"allow[0] (sgx): mr_signer: expected {H32B}, got {H32C}"),
    (SGX_RULE, sgx_claims(isv_prod_id=7), "allow[0] (sgx): isv_prod_id: expected 1, got 7"),
    (SGX_RULE, sgx_claims(isv_svn=1), "allow[0] (sgx): isv_svn: expected >= 2, got 1"),
    (TDX_RULE, tdx_claims(mr_td=bytes.fromhex(H48C)),
     f"allow[0] (tdx): mr_td: expected {H48A}, got {H48C}"),
    (TDX_RULE, tdx_claims(rtmr1=bytes.fromhex(H48C)),
     f"allow[0] (tdx): rtmr[1]: expected {H48B}, got {H48C}"),
    (TDX_RULE, tdx_claims(mr_seam=bytes.fromhex(H48A)),
     f"allow[0] (tdx): mr_seam: expected {H48C}, got {H48A}"),
    (TDX_RULE, tdx_claims(mr_config_id=bytes.fromhex(H48A)),
     f"allow[0] (tdx): mr_config_id: expected {'00' * 48}, got {H48A}"),
    (TDX_RULE, tdx_claims(mr_owner=bytes.fromhex(H48A)),
     f"allow[0] (tdx): mr_owner: expected {'00' * 48}, got {H48A}"),
    (TDX_RULE, tdx_claims(mr_owner_config=bytes.fromhex(H48A)),
     f"allow[0] (tdx): mr_owner_config: expected {'00' * 48}, got {H48A}"),
    (SNP_RULE, snp_claims(measurement=bytes.fromhex(H48B)),
     f"allow[0] (snp): measurement: expected {H48A}, got {H48B}"),
    (SNP_RULE, snp_claims(host_data=bytes.fromhex(H32B)),
     f"allow[0] (snp): host_data: expected {H32A}, got {H32B}"),
    (SNP_RULE, snp_claims(id_key_digest=bytes.fromhex(H48A)),
     f"allow[0] (snp): id_key_digest: expected {H48B}, got {H48A}"),
    (SNP_RULE, snp_claims(author_key_digest=bytes.fromhex(H48A)),
     f"allow[0] (snp): author_key_digest: expected {H48C}, got {H48A}"),
    (SNP_RULE, snp_claims(guest_svn=1), "allow[0] (snp): guest_svn: expected >= 2, got 1"),
    (SNP_RULE, snp_claims(vmpl=2), "allow[0] (snp): vmpl: expected <= 0, got 2"),
    (SIM_RULE, sim_claims(measurement=bytes.fromhex(H48B)),
     f"allow[0] (sim): measurement: expected {H48A}, got {H48B}"),
    (SIM_RULE, sim_claims(svn=0), "allow[0] (sim): svn: expected >= 1, got 0"),
    (SIM_RULE, sim_claims(platform_key=bytes.fromhex(H32A)),
     f"allow[0] (sim): platform_key: expected {H32C}, got {H32A}"),
], ids=lambda v: v.split(": ")[1] if isinstance(v, str) else None)
def test_field_mismatch_denies_with_reason_naming_field_expected_and_got(rule, claims, reason):
    decision = policy(rule).decide_use(claims)
    assert not decision.allowed
    assert decision.matched_rule is None
    assert decision.reasons == (reason,)


@pytest.mark.parametrize("component", ["bootloader", "tee", "snp", "microcode"])
def test_snp_reported_tcb_below_min_tcb_denies_naming_component(component):
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    rule = {**SNP_RULE, "min_tcb": {component: tcb[component] + 1}}
    decision = policy(rule).decide_use(snp_claims(reported_tcb=tcb))
    assert decision.reasons == (
        f"allow[0] (snp): reported_tcb.{component}: expected >= {tcb[component] + 1}, "
        f"got {tcb[component]}",)


def test_snp_min_tcb_component_missing_from_claims_denies():
    rule = {**SNP_RULE, "min_tcb": {"fmc": 1}}
    decision = policy(rule).decide_use(snp_claims())
    assert not decision.allowed
    assert "reported_tcb.fmc: expected >= 1, got nothing" in decision.reasons[0]


def test_min_thresholds_allow_values_equal_to_and_above_the_minimum():
    p = policy(SGX_RULE)
    assert p.decide_use(sgx_claims(isv_svn=2)).allowed
    assert p.decide_use(sgx_claims(isv_svn=9)).allowed
    assert not p.decide_use(sgx_claims(isv_svn=1)).allowed


def test_vmpl_rule_is_a_maximum():
    p = policy({**SNP_RULE, "vmpl": 2})
    assert p.decide_use(snp_claims(vmpl=0)).allowed
    assert p.decide_use(snp_claims(vmpl=2)).allowed
    assert not p.decide_use(snp_claims(vmpl=3)).allowed


def test_tee_tcb_svn_compared_per_byte_names_the_low_byte():
    p = policy({**TDX_RULE, "min_tee_tcb_svn": "03010200" + "00" * 12})
    assert p.decide_use(tdx_claims(tee_tcb_svn=bytes([4, 1, 2, 0] + [0] * 12))).allowed
    # Numerically larger as a whole, but byte 1 is below the minimum.
    low = bytes([9, 0, 2, 0] + [0] * 12)
    decision = p.decide_use(tdx_claims(tee_tcb_svn=low))
    assert not decision.allowed
    assert decision.reasons[0].startswith("allow[0] (tdx): tee_tcb_svn: expected every byte >= ")
    assert "byte 1: 0 < 1" in decision.reasons[0]


def test_any_of_list_allows_each_listed_value():
    p = policy({**SGX_RULE, "mr_enclave": [H32C, H32A]})
    assert p.decide_use(sgx_claims(mr_enclave=bytes.fromhex(H32A))).allowed
    assert p.decide_use(sgx_claims(mr_enclave=bytes.fromhex(H32C))).allowed


def test_any_of_list_mismatch_reason_lists_every_expected_value():
    p = policy({**SGX_RULE, "mr_enclave": [H32C, H32A]})
    decision = p.decide_use(sgx_claims(mr_enclave=bytes.fromhex(H32B)))
    assert decision.reasons == (
        f"allow[0] (sgx): mr_enclave: expected one of [{H32C}, {H32A}], got {H32B}",)


def test_isv_prod_id_any_of_list():
    p = policy({**SGX_RULE, "isv_prod_id": [1, 5]})
    assert p.decide_use(sgx_claims(isv_prod_id=5)).allowed
    assert "isv_prod_id: expected one of [1, 5], got 4" in p.decide_use(
        sgx_claims(isv_prod_id=4)).reasons[0]


def test_every_mismatch_of_a_rule_is_reported():
    decision = policy(SGX_RULE).decide_use(
        sgx_claims(mr_enclave=bytes.fromhex(H32C), isv_svn=0, debug=True))
    fields = [r.split(": ")[1] for r in decision.reasons]
    assert fields == ["debug", "mr_enclave", "isv_svn"]


def test_denial_reports_mismatches_of_every_rule_with_their_index():
    p = policy({**SGX_RULE, "mr_enclave": H32C}, {**SGX_RULE, "min_isv_svn": 5}, TDX_RULE)
    decision = p.decide_use(sgx_claims())
    assert decision.reasons == (
        f"allow[0] (sgx): mr_enclave: expected {H32C}, got {H32A}",
        "allow[1] (sgx): isv_svn: expected >= 5, got 2",
        "allow[2] (tdx): tee: expected tdx, got sgx",
    )


def test_first_matching_rule_is_reported():
    p = policy({**SGX_RULE, "mr_enclave": H32C}, SGX_RULE, {**SGX_RULE, "min_isv_svn": 0})
    decision = p.decide_use(sgx_claims())
    assert decision.matched_rule == 1
    assert decision.reasons == ("allow[1] (sgx): matched",)


def test_rule_pinning_only_mr_signer_accepts_any_enclave_of_that_signer():
    p = policy({"tee": "sgx", "mr_signer": H32B})
    assert p.decide_use(sgx_claims(mr_enclave=bytes.fromhex(H32C), isv_svn=0)).allowed


# --------------------------------------------------------------------------- debug

@pytest.mark.parametrize(("rule", "claims"), [
    (SGX_RULE, sgx_claims(debug=True)), (TDX_RULE, tdx_claims(debug=True)),
    (SNP_RULE, snp_claims(debug=True)), (SIM_RULE, sim_claims(debug=True)),
], ids=["sgx", "tdx", "snp", "sim"])
def test_debug_tee_refused_by_default(rule, claims):
    decision = policy(rule).decide_use(claims)
    assert not decision.allowed
    assert decision.reasons[0].startswith(f"allow[0] ({rule['tee']}): debug: expected false, "
                                          "got true")


@pytest.mark.parametrize(("rule", "claims"), [
    (SGX_RULE, sgx_claims(debug=True)), (TDX_RULE, tdx_claims(debug=True)),
    (SNP_RULE, snp_claims(debug=True)), (SIM_RULE, sim_claims(debug=True)),
], ids=["sgx", "tdx", "snp", "sim"])
def test_debug_tee_allowed_with_allow_debug_and_noted(rule, claims):
    decision = policy({**rule, "allow_debug": True}).decide_use(claims)
    assert decision.allowed, decision.reasons
    assert any("debug" in r for r in decision.reasons[1:])


def test_allow_debug_still_accepts_production_tees():
    assert policy({**SGX_RULE, "allow_debug": True}).decide_use(sgx_claims()).allowed


# --------------------------------------------------------------------------- TCB status

ADVISORIES = ("INTEL-SA-00289", "INTEL-SA-00615")
CASHN = "ConfigurationAndSWHardeningNeeded"


def test_default_tcb_status_refuses_configuration_and_sw_hardening_needed():
    claims = sgx_claims(tcb_status=CASHN, advisory_ids=ADVISORIES)
    decision = policy(SGX_RULE).decide_use(claims)
    assert not decision.allowed
    assert decision.reasons[0] == (
        f"allow[0] (sgx): tcb_status: expected UpToDate, got {CASHN}")
    assert "not allowed: INTEL-SA-00289, INTEL-SA-00615" in decision.reasons[1]


def test_listed_status_and_all_advisories_allowed_accepts_and_notes_them():
    rule = {**SGX_RULE, "tcb_status": ["UpToDate", CASHN], "allowed_advisories": list(ADVISORIES)}
    decision = policy(rule).decide_use(sgx_claims(tcb_status=CASHN, advisory_ids=ADVISORIES))
    assert decision.allowed, decision.reasons
    assert decision.reasons[1] == (
        f"allow[0] (sgx): accepted tcb_status {CASHN} with advisories "
        "[INTEL-SA-00289, INTEL-SA-00615]")


def test_listed_status_with_one_advisory_allowed_denies_naming_the_other():
    rule = {**SGX_RULE, "tcb_status": ["UpToDate", CASHN],
            "allowed_advisories": ["INTEL-SA-00289"]}
    decision = policy(rule).decide_use(sgx_claims(tcb_status=CASHN, advisory_ids=ADVISORIES))
    assert not decision.allowed
    assert decision.reasons == (
        "allow[0] (sgx): advisory_ids: expected only allowed_advisories [INTEL-SA-00289], "
        "got [INTEL-SA-00289, INTEL-SA-00615] (not allowed: INTEL-SA-00615)",)


def test_tdx_tcb_status_and_advisories_checked_like_sgx():
    claims = tdx_claims(tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",))
    assert not policy(TDX_RULE).decide_use(claims).allowed
    rule = {**TDX_RULE, "tcb_status": ["UpToDate", "SWHardeningNeeded"],
            "allowed_advisories": "intel-sa-00615"}
    assert policy(rule).decide_use(claims).allowed


def test_out_of_date_refused_by_default():
    decision = policy(SGX_RULE).decide_use(sgx_claims(tcb_status="OutOfDate"))
    assert decision.reasons == ("allow[0] (sgx): tcb_status: expected UpToDate, got OutOfDate",)


def test_missing_tcb_status_refused_for_dcap_tees():
    decision = policy(SGX_RULE).decide_use(sgx_claims(tcb_status=None))
    assert decision.reasons == ("allow[0] (sgx): tcb_status: expected UpToDate, got none",)


def test_unexpected_advisory_on_up_to_date_platform_denies():
    decision = policy(SGX_RULE).decide_use(sgx_claims(advisory_ids=("INTEL-SA-00828",)))
    assert not decision.allowed
    assert "not allowed: INTEL-SA-00828" in decision.reasons[0]


def test_snp_and_sim_rules_ignore_absent_tcb_status():
    assert policy(SNP_RULE).decide_use(snp_claims(tcb_status=None)).allowed
    assert policy(SIM_RULE).decide_use(sim_claims(tcb_status=None)).allowed


# --------------------------------------------------------------------------- TEE type

def test_tee_mismatch_is_the_only_reason_for_that_rule():
    decision = policy(SGX_RULE).decide_use(tdx_claims())
    assert decision.reasons == ("allow[0] (sgx): tee: expected sgx, got tdx",)


def test_sim_claims_never_match_a_hardware_rule():
    claims = sim_claims()
    for rule in (SGX_RULE, TDX_RULE, SNP_RULE):
        decision = policy(rule).decide_use(claims)
        assert decision.reasons == (f"allow[0] ({rule['tee']}): tee: expected {rule['tee']}, "
                                    "got sim",)


def test_insecure_claims_refused_by_hardware_rule_even_with_hardware_tee():
    decision = policy(SGX_RULE).decide_use(sgx_claims(insecure=True))
    assert not decision.allowed
    assert decision.reasons[0].startswith("allow[0] (sgx): insecure: expected false")


def test_sim_match_is_noted_as_insecure():
    decision = policy(SIM_RULE).decide_use(sim_claims())
    assert "allow[0] (sim): accepted insecure sim evidence (development only)" in decision.reasons


# --------------------------------------------------------------------------- holders

def test_holders_default_to_allow_rules():
    p = policy(SGX_RULE)
    assert p.holders is None
    assert p.holder_rules == p.allow
    decision = p.decide_hold(sgx_claims())
    assert decision.allowed
    assert decision.reasons[0] == "allow[0] (sgx): matched"


def test_holders_separate_from_allow():
    cache = {"tee": "sgx", "mr_enclave": H32C}
    p = policy(SGX_RULE, holders=[cache])
    runtime_claims, cache_claims = sgx_claims(), sgx_claims(mr_enclave=bytes.fromhex(H32C))
    assert p.decide_use(runtime_claims).allowed
    assert not p.decide_use(cache_claims).allowed
    assert p.decide_hold(cache_claims).allowed
    denied = p.decide_hold(runtime_claims)
    assert not denied.allowed
    assert denied.reasons == (f"holders[0] (sgx): mr_enclave: expected {H32C}, got {H32A}",)


# --------------------------------------------------------------------------- Decision

def test_raise_if_denied_raises_policy_denied_with_reasons():
    decision = policy(SGX_RULE).decide_use(sgx_claims(isv_svn=0))
    with pytest.raises(PolicyDenied) as info:
        decision.raise_if_denied()
    assert info.value.reasons == decision.reasons
    assert "isv_svn: expected >= 2, got 0" in str(info.value)


def test_raise_if_denied_is_silent_when_allowed():
    policy(SGX_RULE).decide_use(sgx_claims()).raise_if_denied()


def test_decide_with_no_rules_denies():
    decision = decide(sgx_claims(), [])
    assert decision == Decision(False, ("allow: no rules",), None)


def test_decide_role_labels_reasons():
    rules = policy(SGX_RULE).allow
    assert decide(sgx_claims(isv_svn=0), rules, role="holders").reasons[0].startswith(
        "holders[0] (sgx): ")


def test_claims_lacking_tee_specific_fields_deny_instead_of_raising():
    bare = Claims(tee=Tee.SGX, report_data=b"", debug=False, tcb_status="UpToDate")
    decision = policy(SGX_RULE).decide_use(bare)
    assert not decision.allowed
    assert "mr_enclave: expected" in decision.reasons[0]
    assert "got nothing (field absent from claims)" in decision.reasons[0]


# --------------------------------------------------------------------------- loading

YAML_DOC = f"""\
# reference values for resnet50
allow:
  - tee: sgx
    mr_enclave: ["{H32A.upper()}", "{H32C}"]
    mr_signer: "0x{H32B}"
    isv_prod_id: 1
    min_isv_svn: 2
  - tee: tdx
    mr_td: "{H48A}"
    rtmr: {{0: "{H48A}", 1: "{H48B}"}}
holders:
  - tee: sim
    measurement: "{H48A}"
"""


def test_yaml_text_loads_and_normalises_hex():
    p = load_policy(YAML_DOC)
    rule = p.allow[0]
    assert isinstance(rule, SgxRule)
    assert rule.mr_enclave == [H32A, H32C]
    assert rule.mr_signer == [H32B]
    assert rule.tcb_status == ["UpToDate"]
    assert rule.allowed_advisories == []
    assert rule.allow_debug is False
    assert p.allow[1].rtmr == {0: [H48A], 1: [H48B]}


def test_json_text_loads_to_the_same_policy_as_yaml():
    as_json = json.dumps(load_policy(YAML_DOC).to_json(), indent="\t")
    assert load_policy(as_json) == load_policy(YAML_DOC)


def test_policy_loads_from_path_str_path_and_bytes(tmp_path: Path):
    f = tmp_path / "policy.yaml"
    f.write_text(YAML_DOC)
    expected = load_policy(YAML_DOC)
    assert load_policy(f) == expected
    assert load_policy(str(f)) == expected
    assert load_policy(YAML_DOC.encode()) == expected


def test_to_json_round_trips():
    p = load_policy(YAML_DOC)
    data = p.to_json()
    assert next(iter(data["allow"][0])) == "tee"
    assert load_policy(json.loads(json.dumps(data))) == p


@pytest.mark.parametrize(("doc", "message"), [
    ("allow: [\n", "not valid YAML/JSON: line"),
    ("- just\n- a list\n", "expected a mapping with an 'allow' list, got list"),
    ("", "got an empty document"),
    ({"allow": []}, "allow: must list at least one rule"),
    ({"holders": [{"tee": "sim", "measurement": H48A}]}, "allow: required field missing"),
    ({"allow": [SIM_RULE], "holders": []}, "holders: must list at least one rule"),
    ({"allow": [SIM_RULE], "alow": []}, "alow: unknown field"),
    ({"allow": [{**SGX_RULE, "mr_enclav": H32A}]}, "allow[0].mr_enclav: unknown field"),
    ({"allow": [{**SNP_RULE, "min_tcb": {"snpp": 1}}]}, "allow[0].min_tcb.snpp: unknown field"),
    ({"allow": [{**SGX_RULE, "mr_enclave": "zz" * 32}]},
     "allow[0].mr_enclave[0]: not a hex string"),
    ({"allow": [{**SGX_RULE, "mr_enclave": H48A}]},
     "allow[0].mr_enclave[0]: expected 64 hex digits (32 bytes), got 96"),
    ({"allow": [{**TDX_RULE, "mr_td": H32A}]},
     "allow[0].mr_td[0]: expected 96 hex digits (48 bytes), got 64"),
    ({"allow": [{**SNP_RULE, "host_data": H48A}]},
     "allow[0].host_data[0]: expected 64 hex digits (32 bytes), got 96"),
    ({"allow": [{**SIM_RULE, "measurement": H32A}]},
     "allow[0].measurement[0]: expected 96 hex digits (48 bytes), got 64"),
    ({"allow": [{**TDX_RULE, "min_tee_tcb_svn": "00" * 15}]},
     "allow[0].min_tee_tcb_svn: expected 32 hex digits (16 bytes), got 30"),
    ({"allow": [{**SGX_RULE, "mr_signer": 1234}]}, "quote hex values in YAML"),
    ({"allow": [{**TDX_RULE, "rtmr": {4: H48A}}]}, "allow[0].rtmr: RTMR index must be"),
    ({"allow": [{"tee": "sev", "measurement": H48A}]}, "allow[0]: unknown tee 'sev'"),
    ({"allow": [{"measurement": H48A}]}, "allow[0]: missing 'tee'"),
    ({"allow": [{**SGX_RULE, "tcb_status": ["UpToDate", "Uptodate"]}]},
     "allow[0].tcb_status: unknown TCB status 'Uptodate'"),
    ({"allow": [{**SGX_RULE, "tcb_status": []}]},
     "allow[0].tcb_status: must list at least one value"),
    ({"allow": [{**SGX_RULE, "tcb_status": ["Revoked"]}]}, "can never be allowed"),
    ({"allow": [{**SGX_RULE, "allowed_advisories": ["SA-00289"]}]},
     "allow[0].allowed_advisories: not an Intel advisory id"),
    ({"allow": [{**SNP_RULE, "tcb_status": ["UpToDate"]}]}, "allow[0].tcb_status: unknown field"),
    ({"allow": [{**SGX_RULE, "min_isv_svn": "2"}]}, "allow[0].min_isv_svn: Input should be"),
    ({"allow": [{**SGX_RULE, "min_isv_svn": -1}]}, "allow[0].min_isv_svn: Input should be"),
    ({"allow": [{**SGX_RULE, "allow_debug": "yes"}]}, "allow[0].allow_debug: Input should be"),
    ({"allow": [{**SNP_RULE, "vmpl": 4}]}, "allow[0].vmpl: Input should be less than"),
    ({"allow": [{"tee": "sgx", "isv_prod_id": 1}]}, "must pin mr_enclave or mr_signer"),
    ({"allow": [{"tee": "tdx", "rtmr": {0: H48A}}]}, "must pin mr_td"),
    ({"allow": [{"tee": "snp", "host_data": H32A}]}, "must pin measurement, id_key_digest"),
    ({"allow": [{"tee": "sim"}]}, "allow[0].measurement: required field missing"),
    (f"allow:\n  - tee: sim\n    measurement: '{H48A}'\n    measurement: '{H48B}'\n",
     "found duplicate key 'measurement'"),
    ('{"allow": [], "allow": [{"tee": "sim"}]}', "duplicate key 'allow'"),
])
def test_invalid_policy_raises_policy_error_naming_field_and_problem(doc, message):
    with pytest.raises(PolicyError) as info:
        load_policy(doc)
    assert message in str(info.value)


def test_policy_error_names_the_file(tmp_path: Path):
    f = tmp_path / "resnet50.yaml"
    f.write_text(f"allow:\n  - tee: sgx\n    mr_enclave: '{H32A[:-2]}'\n")
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    assert str(info.value) == (f"invalid policy {f}: allow[0].mr_enclave[0]: "
                               "expected 64 hex digits (32 bytes), got 62")


def test_missing_policy_file_raises_policy_error(tmp_path: Path):
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / "nope.yaml")
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(str(tmp_path / "nope.yaml"))


def test_invalid_policy_reports_every_problem_at_once():
    with pytest.raises(PolicyError) as info:
        load_policy({"allow": [{**SGX_RULE, "mr_enclave": "xx", "min_isv_svn": -1},
                               {"tee": "nope"}]})
    text = str(info.value)
    assert "allow[0].mr_enclave[0]" in text
    assert "allow[0].min_isv_svn" in text
    assert "allow[1]: unknown tee 'nope'" in text


# --------------------------------------------------------------------------- digest

def test_digest_is_sha256_hex():
    digest = load_policy(YAML_DOC).digest()
    assert len(digest) == 64
    int(digest, 16)


def test_digest_stable_across_key_order_whitespace_and_format():
    a = load_policy(YAML_DOC)
    shuffled = json.loads(json.dumps(a.to_json()))
    shuffled = {k: shuffled[k] for k in reversed(list(shuffled))}
    shuffled["allow"] = [dict(reversed(list(r.items()))) for r in shuffled["allow"]]
    assert load_policy(shuffled).digest() == a.digest()
    assert load_policy(json.dumps(shuffled, indent=7)).digest() == a.digest()
    assert load_policy(YAML_DOC.replace("\n", "   \n")).digest() == a.digest()


def test_digest_stable_across_equivalent_spellings():
    terse = {"allow": [{"tee": "sgx", "mr_signer": H32B.upper()}]}
    spelled_out = {"allow": [{"tee": "sgx", "mr_signer": [f"0x{H32B}"],
                              "tcb_status": ["UpToDate"], "allowed_advisories": [],
                              "allow_debug": False}]}
    assert load_policy(terse).digest() == load_policy(spelled_out).digest()


@pytest.mark.parametrize("change", [
    lambda d: d["allow"][0].update(min_isv_svn=3),
    lambda d: d["allow"][0].update(allow_debug=True),
    lambda d: d["allow"][0]["mr_enclave"].append(H32B),
    lambda d: d["allow"].reverse(),
    lambda d: d.update(holders=[SIM_RULE]),
], ids=["threshold", "debug", "any-of", "rule-order", "holders"])
def test_digest_changes_when_content_changes(change):
    base = load_policy(YAML_DOC)
    data = json.loads(json.dumps(base.to_json()))
    data.pop("holders")
    base = load_policy(data)
    change(data)
    assert load_policy(data).digest() != base.digest()


# --------------------------------------------------------------------------- properties

def _bytes(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


_STATUS = st.sampled_from([s for s in TCB_STATUSES if s != "Revoked"])
_ADVISORY = st.integers(0, 99999).map(lambda i: f"INTEL-SA-{i:05d}")
_COMMON = dict(report_data=_bytes(64), debug=st.booleans(),
               advisory_ids=st.lists(_ADVISORY, max_size=3).map(tuple))
_TCB = st.fixed_dictionaries({k: st.integers(0, 255)
                              for k in ("bootloader", "tee", "snp", "microcode")})

SGX_CLAIMS = st.builds(SgxClaims, tee=st.just(Tee.SGX), tcb_status=_STATUS, **_COMMON,
                       mr_enclave=_bytes(32), mr_signer=_bytes(32),
                       isv_prod_id=st.integers(0, 0xFFFF), isv_svn=st.integers(0, 0xFFFF),
                       attributes=_bytes(16), isv_ext_prod_id=_bytes(16),
                       isv_family_id=_bytes(16), config_id=_bytes(64),
                       config_svn=st.integers(0, 0xFFFF))
TDX_CLAIMS = st.builds(TdxClaims, tee=st.just(Tee.TDX), tcb_status=_STATUS, **_COMMON,
                       **{f: _bytes(48) for f in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3",
                                                  "mr_config_id", "mr_owner",
                                                  "mr_owner_config", "mr_seam")},
                       td_attributes=_bytes(8), tee_tcb_svn=_bytes(16), xfam=_bytes(8))
SNP_CLAIMS = st.builds(SnpClaims, tee=st.just(Tee.SNP), **_COMMON, version=st.integers(0, 5),
                       guest_svn=st.integers(0, 2**32 - 1), measurement=_bytes(48),
                       host_data=_bytes(32), id_key_digest=_bytes(48),
                       author_key_digest=_bytes(48), policy=st.integers(0, 2**64 - 1),
                       reported_tcb=_TCB, committed_tcb=_TCB, chip_id=_bytes(64),
                       vmpl=st.integers(0, 3), signing_key=st.sampled_from(["vcek", "vlek"]),
                       platform_info=st.integers(0, 2**64 - 1))
SIM_CLAIMS = st.builds(SimClaims, tee=st.just(Tee.SIM), insecure=st.just(True),
                       report_data=_bytes(64), debug=st.booleans(), measurement=_bytes(48),
                       svn=st.integers(0, 2**32 - 1), platform_key=_bytes(32))
ANY_CLAIMS = st.one_of(SGX_CLAIMS, TDX_CLAIMS, SNP_CLAIMS, SIM_CLAIMS)

# Claims that a buggy or hostile verifier might produce: wrong types and lengths everywhere.
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4),
                  st.binary(max_size=50), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=10), st.integers(), max_size=3))
JUNK_CLAIMS = st.one_of(*[
    st.builds(cls, tee=st.one_of(st.sampled_from(list(Tee)), _JUNK), report_data=_JUNK,
              debug=_JUNK, tcb_status=_JUNK, advisory_ids=_JUNK, insecure=_JUNK,
              **{name: _JUNK for name in fields})
    for cls, fields in (
        (SgxClaims, ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "attributes",
                     "isv_ext_prod_id", "isv_family_id", "config_id", "config_svn")),
        (TdxClaims, ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner",
                     "mr_owner_config", "mr_seam", "td_attributes", "tee_tcb_svn", "xfam")),
        (SnpClaims, ("version", "guest_svn", "measurement", "host_data", "id_key_digest",
                     "author_key_digest", "policy", "reported_tcb", "committed_tcb",
                     "chip_id", "vmpl", "signing_key", "platform_info")),
        (SimClaims, ("measurement", "svn", "platform_key")),
    )
])


def matching_rule(claims: Claims) -> dict:
    """The most specific rule that ``claims`` satisfy: every constraint pinned."""
    common: dict = {"tee": claims.tee.value, "allow_debug": claims.debug}
    if isinstance(claims, SgxClaims | TdxClaims):
        common["tcb_status"] = [claims.tcb_status]
        common["allowed_advisories"] = list(claims.advisory_ids)
    if isinstance(claims, SgxClaims):
        return {**common, "mr_enclave": claims.mr_enclave.hex(),
                "mr_signer": claims.mr_signer.hex(), "isv_prod_id": claims.isv_prod_id,
                "min_isv_svn": claims.isv_svn, "isv_ext_prod_id": claims.isv_ext_prod_id.hex(),
                "isv_family_id": claims.isv_family_id.hex(), "config_id": claims.config_id.hex(),
                "min_config_svn": claims.config_svn}
    if isinstance(claims, TdxClaims):
        return {**common, "mr_td": claims.mr_td.hex(),
                "rtmr": {i: getattr(claims, f"rtmr{i}").hex() for i in range(4)},
                **{f: getattr(claims, f).hex() for f in ("mr_config_id", "mr_owner",
                                                         "mr_owner_config", "mr_seam")},
                "min_tee_tcb_svn": claims.tee_tcb_svn.hex(), "xfam": claims.xfam.hex(),
                "waive": [] if claims.td_attributes[3] & 0x10 else ["sept_ve_disable"]}
    if isinstance(claims, SnpClaims):
        return {**common, **{f: getattr(claims, f).hex() for f in (
                    "measurement", "host_data", "id_key_digest", "author_key_digest")},
                "min_guest_svn": claims.guest_svn, "vmpl": claims.vmpl,
                "min_tcb": dict(claims.reported_tcb),
                "waive": ["smt", "migrate_ma"] if claims.policy & 0x50000 or
                claims.platform_info & 1 else []}
    assert isinstance(claims, SimClaims)
    return {**common, "measurement": claims.measurement.hex(), "min_svn": claims.svn,
            "platform_key": claims.platform_key.hex()}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(claims=ANY_CLAIMS)
def test_rule_built_from_claims_always_allows(claims):
    decision = policy(matching_rule(claims)).decide_use(claims)
    assert decision.allowed, decision.reasons
    assert decision.matched_rule == 0


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(claims=st.one_of(ANY_CLAIMS, JUNK_CLAIMS), rules_from=st.lists(ANY_CLAIMS, max_size=4),
       tweak=st.booleans())
def test_decide_never_raises_on_arbitrary_claims(claims, rules_from, tweak):
    rules = [matching_rule(c) for c in rules_from]
    if tweak:
        rules = [{**r, "allow_debug": False} for r in rules]
    p = load_policy({"allow": rules}) if rules else None
    decision = decide(claims, p.allow if p else [])
    assert isinstance(decision, Decision)
    assert all(isinstance(r, str) for r in decision.reasons)
    assert decision.allowed == (decision.matched_rule is not None)
    if not decision.allowed:
        assert decision.reasons


def test_changing_any_claimed_measurement_denies():
    claims = tdx_claims()
    p = policy(matching_rule(claims))
    for name in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner",
                 "mr_owner_config", "mr_seam"):
        changed = replace(claims, **{name: b"\xff" * 48})
        assert not p.decide_use(changed).allowed, name
