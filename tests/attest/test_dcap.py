"""SGX and TDX (DCAP) verification against real, published quotes and collateral.

No SGX/TDX hardware is needed: the evidence in ``shared/evidence`` (beside the repository,
or ``$SEALEDTORCH_EVIDENCE_DIR``) comes from real machines; see its README for the sources
and for the time windows used below.  Nothing here mocks the verifier or dcap-qvl.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import dcap_qvl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealedtorch.attest import Evidence, SgxClaims, TdxClaims, Tee, VerifierConfig, dcap
from sealedtorch.attest import verify as front_door_verify
from sealedtorch.attest.collateral import INTEL_SGX_ROOT_CA_DER
from sealedtorch.errors import AttestationError, CollateralError


def _evidence_dir() -> Path:
    env = os.environ.get("SEALEDTORCH_EVIDENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).parents[2] / ".." / "shared" / "evidence"


EVIDENCE = _evidence_dir()
if not (EVIDENCE / "sgx" / "quote.bin").is_file():  # fail loudly: these tests are the point
    raise RuntimeError(f"real DCAP evidence not found in {EVIDENCE} "
                       "(set SEALEDTORCH_EVIDENCE_DIR)")


@dataclass(frozen=True)
class Sample:
    tee: Tee
    quote_file: str
    collateral_file: str
    lo: int  # first Unix second at which every collateral item is valid (README table)
    hi: int  # last such second (README's bound, minus one where it is a CRL's nextUpdate,
    #          which dcap-qvl treats as exclusive)

    @property
    def quote(self) -> bytes:
        return (EVIDENCE / self.quote_file).read_bytes()

    @property
    def collateral(self) -> bytes:
        return (EVIDENCE / self.collateral_file).read_bytes()

    @property
    def mid(self) -> int:
        return (self.lo + self.hi) // 2

    def evidence(self, data: bytes | None = None, tee: Tee | None = None) -> Evidence:
        return Evidence(tee=tee or self.tee, data=self.quote if data is None else data,
                        collateral=self.collateral)


SGX = Sample(Tee.SGX, "sgx/quote.bin", "sgx/collateral.json", 1750330571, 1752919278)
TDX = Sample(Tee.TDX, "tdx/quote.bin", "tdx/collateral.json", 1750329147, 1752919234)
TDX2 = Sample(Tee.TDX, "tdx/second-quote.bin", "tdx/second-collateral.json",
              1756798919, 1759388630)
TDX_OUTDATED = Sample(Tee.TDX, "tdx/outdated-quote.bin", "tdx/outdated-collateral.json",
                      1771412331, 1774003274)
VALID = {"sgx": SGX, "tdx": TDX, "tdx-second": TDX2}
CONFIG = VerifierConfig()


def _verify(sample: Sample, *, at: int | None = None, data: bytes | None = None,
            tee: Tee | None = None, collateral: bytes | None = None):
    ev = Evidence(tee=tee or sample.tee, data=sample.quote if data is None else data,
                  collateral=sample.collateral if collateral is None else collateral)
    return dcap.verify(ev, at=sample.mid if at is None else at, config=CONFIG)


def _flip(data: bytes, offset: int, mask: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


# --- valid quotes and their claims ---------------------------------------------------------

def test_sgx_quote_verifies_with_expected_claims():
    claims = _verify(SGX)
    assert type(claims) is SgxClaims
    assert claims.tee is Tee.SGX
    assert claims.mr_enclave.hex() == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
    assert claims.mr_signer.hex() == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6")
    assert claims.isv_prod_id == 0
    assert claims.isv_svn == 0
    assert claims.attributes.hex() == "0500000000000000e700000000000000"
    assert claims.debug is False  # ATTRIBUTES = INIT | MODE64BIT, no DEBUG
    assert claims.cpu_svn.hex() == "0b0b1a18ffff04000000000000000000"
    assert claims.report_data == b"Hello, world!".ljust(64, b"\0")
    assert claims.fmspc == "00A067110000"
    assert claims.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert claims.insecure is False


def test_tdx_quote_verifies_with_expected_claims():
    claims = _verify(TDX)
    assert type(claims) is TdxClaims
    assert claims.tee is Tee.TDX
    assert claims.mr_td.hex() == (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
        "de03ae6dc5f87f27428b2538873118b7")
    assert claims.rtmr0.hex() == (
        "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c"
        "48aca29b220b80b6a540cf994b9bc9c0")
    assert claims.rtmr1.hex().startswith("0084452c01668329")
    assert claims.rtmr2.hex().startswith("d833feef2cd94514")
    assert claims.rtmr3 == bytes(48)
    assert claims.mr_seam.hex() == (
        "5b38e33a6487958b72c3c12a938eaa5e3fd4510c51aeeab58c7d5ecee41d7c43"
        "6489d6c8e4f92f160b7cad34207b00c1")
    assert claims.mr_config_id == claims.mr_owner == claims.mr_owner_config == bytes(48)
    assert claims.td_attributes.hex() == "0000001000000000"  # SEPT_VE_DISABLE only
    assert claims.debug is False
    assert claims.tee_tcb_svn.hex() == "06010300000000000000000000000000"
    assert claims.report_data.hex().startswith("9a9d48e7f6799642d3d1b34e1e5e1742")
    assert claims.fmspc == "B0C06F000000"
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()


def test_second_tdx_quote_verifies_with_expected_claims():
    claims = _verify(TDX2)
    assert type(claims) is TdxClaims
    assert claims.mr_td.hex().startswith("f06dfda6dce1cf904d4e2bab1dc37063")
    assert claims.mr_config_id.hex() == "0112a20aed7d6c68601e9f6e108a93b4199ae7231684307ffc" \
        "4833c9cd08d45de7" + "00" * 15
    assert claims.rtmr3.hex().startswith("287a9242edd8c8429913ec66f44af611")
    assert claims.tee_tcb_svn.hex() == "06010400000000000000000000000000"
    assert claims.fmspc == "20A06F000000"
    assert claims.tcb_status == "UpToDate"
    assert claims.advisory_ids == ()
    assert claims.debug is False


@pytest.mark.parametrize("name", sorted(VALID))
def test_claims_agree_with_dcap_qvl_parser(name):
    """Our offsets into the report body against the library's independent parser."""
    sample = VALID[name]
    claims = _verify(sample)
    report = dcap_qvl.parse_quote(sample.quote).report
    assert claims.report_data == report.report_data
    if sample.tee is Tee.SGX:
        assert claims.mr_enclave == report.mr_enclave
        assert claims.mr_signer == report.mr_signer
        assert claims.attributes == report.attributes
        assert claims.cpu_svn == report.cpu_svn
    else:
        assert claims.mr_td == report.mr_td
        assert (claims.rtmr0, claims.rtmr1, claims.rtmr2, claims.rtmr3) == (
            report.rt_mr0, report.rt_mr1, report.rt_mr2, report.rt_mr3)
        assert claims.mr_seam == report.mr_seam
        assert claims.mr_config_id == report.mr_config_id
        assert claims.mr_owner == report.mr_owner
        assert claims.mr_owner_config == report.mr_owner_config
        assert claims.td_attributes == report.td_attributes
        assert claims.tee_tcb_svn == report.tee_tcb_svn
    json.dumps(claims.to_json())  # claims go into tokens and audit records


@pytest.mark.parametrize("name", sorted(VALID))
def test_window_edges_are_inclusive(name):
    sample = VALID[name]
    assert _verify(sample, at=sample.lo).report_data
    assert _verify(sample, at=sample.hi).report_data


@pytest.mark.parametrize("name", sorted(VALID))
def test_front_door_dispatches_to_dcap(name):
    sample = VALID[name]
    claims = front_door_verify(sample.evidence(), at=sample.mid)
    assert claims.tee is sample.tee
    assert claims.tcb_status is not None


def test_zero_padding_after_quote_is_accepted():
    # The TDX sample itself carries 70 bytes of zero padding (fixed-size quote buffers).
    assert dcap.parse_quote(TDX.quote).size == len(TDX.quote) - 70
    claims = _verify(SGX, data=SGX.quote + bytes(512))
    assert claims.mr_enclave.hex().startswith("33d8736d")


# --- quotes that must be refused -------------------------------------------------------

def test_outdated_tdx_quote_is_rejected():
    with pytest.raises(AttestationError, match="no matching TCB level") as info:
        _verify(TDX_OUTDATED)
    assert not isinstance(info.value, CollateralError)  # a TCB failure, not stale collateral


def test_outdated_tdx_quote_parses_as_v5_td15():
    layout = dcap.parse_quote(TDX_OUTDATED.quote)
    assert (layout.version, layout.tee, layout.body_kind) == (5, Tee.TDX, "td15")
    assert len(layout.body) == dcap.TD15_REPORT_SIZE


@pytest.mark.parametrize(("sample", "item"), [
    (SGX, "QE identity expired at 2025-07-19T10:01:18Z"),
    (TDX, "PCK CRL expired at 2025-07-19T10:00:35Z"),
    (TDX2, "PCK CRL expired at 2025-10-02T07:03:51Z"),
])
def test_just_after_window_fails_naming_expired_item(sample, item):
    with pytest.raises(CollateralError, match="expired") as info:
        _verify(sample, at=sample.hi + 1)
    assert item in str(info.value)


@pytest.mark.parametrize(("sample", "item"), [
    (SGX, "TCB info is valid only from 2025-06-19T10:56:11Z"),
    (TDX, "QE identity is valid only from 2025-06-19T10:32:27Z"),
])
def test_just_before_window_fails_naming_item(sample, item):
    with pytest.raises(CollateralError, match="not yet valid") as info:
        _verify(sample, at=sample.lo - 1)
    assert item in str(info.value)


def test_far_future_names_every_expired_item():
    with pytest.raises(CollateralError) as info:
        _verify(SGX, at=2_000_000_000)
    msg = str(info.value)
    for item in ("TCB info", "QE identity", "PCK CRL", "root CA CRL"):
        assert item in msg


@pytest.mark.parametrize(("sample", "label"), [(SGX, Tee.TDX), (TDX, Tee.SGX),
                                               (TDX2, Tee.SGX), (TDX_OUTDATED, Tee.SGX)])
def test_wrong_tee_label_is_refused(sample, label):
    with pytest.raises(AttestationError, match="TEE mismatch"):
        _verify(sample, tee=label)
    with pytest.raises(AttestationError, match="TEE mismatch"):
        front_door_verify(sample.evidence(tee=label), at=sample.mid)


@pytest.mark.parametrize("label", [Tee.SNP, Tee.SIM])
def test_non_dcap_label_is_refused(label):
    with pytest.raises(AttestationError, match="not"):
        _verify(SGX, tee=label)


def test_empty_quote_is_refused():
    with pytest.raises(AttestationError, match="empty"):
        _verify(SGX, data=b"")


@pytest.mark.parametrize("name", sorted(VALID))
@pytest.mark.parametrize("cut", [1, 47, 48, 100, 431, 436, 437, 1000, 1258, 2000, -200, -1])
def test_truncated_quote_is_refused(name, cut):
    sample = VALID[name]
    quote = sample.quote[:dcap.parse_quote(sample.quote).size]  # without the zero padding
    with pytest.raises(AttestationError, match=r"wrong size|truncated|PCK certificate|length"):
        _verify(sample, data=quote[:cut])


@pytest.mark.parametrize("extra", [b"\x01", b"garbage", b"\0" * 10 + b"\x01"])
def test_appended_data_is_refused(extra):
    with pytest.raises(AttestationError, match="not zero padding"):
        _verify(SGX, data=SGX.quote + extra)


def test_oversized_quote_is_refused():
    with pytest.raises(AttestationError, match="limit"):
        _verify(SGX, data=SGX.quote + bytes(dcap.MAX_QUOTE_SIZE))


def test_non_bytes_quote_is_refused():
    with pytest.raises(AttestationError, match="bytes"):
        _verify(SGX, data="not bytes")  # type: ignore[arg-type]


# --- collateral handed in with the evidence --------------------------------------------

def test_collateral_of_another_platform_is_refused():
    with pytest.raises(CollateralError, match="mismatch"):
        _verify(TDX, collateral=SGX.collateral)
    with pytest.raises(CollateralError, match="FMSPC"):
        _verify(TDX, collateral=TDX2.collateral, at=TDX.mid)


@pytest.mark.parametrize("bad", [b"", b"not json", b"[]", b"{}", b'{"tcb_info": 1}'])
def test_malformed_collateral_is_refused(bad):
    with pytest.raises(CollateralError, match="collateral"):
        _verify(SGX, collateral=bad)


def _tampered_collateral(sample: Sample, field: str, edit) -> bytes:
    obj = json.loads(sample.collateral)
    obj[field] = edit(obj[field])
    return json.dumps(obj).encode()


def test_tampered_tcb_info_is_refused():
    # Promote every TCB level to UpToDate: the signature no longer matches.
    bad = _tampered_collateral(
        SGX, "tcb_info", lambda s: s.replace('"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"'))
    assert '"tcbStatus":"OutOfDate"' in json.loads(SGX.collateral)["tcb_info"]
    with pytest.raises(AttestationError, match="TCB info signature invalid"):
        _verify(SGX, collateral=bad)


def test_tampered_qe_identity_signature_is_refused():
    bad = _tampered_collateral(TDX, "qe_identity_signature",
                               lambda s: ("1" if s[0] != "1" else "2") + s[1:])
    with pytest.raises(AttestationError, match="QE identity signature invalid"):
        _verify(TDX, collateral=bad)


def test_tampered_pck_crl_is_refused():
    bad = _tampered_collateral(TDX, "pck_crl", lambda s: s[:-10] + "0" * 10)
    with pytest.raises(AttestationError, match="CRL"):
        _verify(TDX, collateral=bad)


def test_issuer_chain_with_foreign_root_is_refused():
    obj = json.loads(SGX.collateral)
    leaf_only = obj["tcb_info_issuer_chain"].split("-----END CERTIFICATE-----")[0]
    obj["tcb_info_issuer_chain"] = leaf_only + "-----END CERTIFICATE-----\n"
    with pytest.raises(CollateralError, match="Intel SGX Root CA"):
        _verify(SGX, collateral=json.dumps(obj).encode())


def test_no_collateral_and_no_source_is_a_collateral_error():
    ev = Evidence(tee=Tee.SGX, data=SGX.quote)
    with pytest.raises(CollateralError, match="no collateral"):
        dcap.verify(ev, at=SGX.mid, config=VerifierConfig())


# --- structure -------------------------------------------------------------------------

SGX_V3_REGIONS = {
    "header": (0, 48), "report body": (48, 432), "signature data length": (432, 436),
    "quote signature": (436, 500), "attestation key": (500, 564), "QE report": (564, 948),
    "QE report signature": (948, 1012), "QE authentication data size": (1012, 1014),
    "QE authentication data": (1014, 1046), "PCK certification data type": (1046, 1048),
    "PCK certification data size": (1048, 1052), "PCK certificate chain": (1052, 4600),
}
TDX_V4_REGIONS = {
    "header": (0, 48), "report body": (48, 632), "signature data length": (632, 636),
    "quote signature": (636, 700), "attestation key": (700, 764),
    "certification data type": (764, 766), "certification data size": (766, 770),
    "QE report": (770, 1154), "QE report signature": (1154, 1218),
    "QE authentication data size": (1218, 1220), "QE authentication data": (1220, 1252),
    "PCK certification data type": (1252, 1254), "PCK certification data size": (1254, 1258),
    "PCK certificate chain": (1258, 4936),
}


def test_layout_of_sgx_v3_quote():
    layout = dcap.parse_quote(SGX.quote)
    assert (layout.version, layout.tee, layout.body_kind) == (3, Tee.SGX, "sgx")
    assert layout.regions == SGX_V3_REGIONS
    assert len(layout.pck_chain) == 3
    assert layout.pck_chain[-1] == INTEL_SGX_ROOT_CA_DER


@pytest.mark.parametrize("sample", [TDX, TDX2])
def test_layout_of_tdx_v4_quote(sample):
    layout = dcap.parse_quote(sample.quote)
    assert (layout.version, layout.tee, layout.body_kind) == (4, Tee.TDX, "td10")
    assert layout.regions == TDX_V4_REGIONS
    assert layout.pck_chain[-1] == INTEL_SGX_ROOT_CA_DER


def test_certification_data_type_other_than_pck_chain_is_refused():
    quote = bytearray(SGX.quote)
    struct.pack_into("<H", quote, 1046, 3)  # encrypted PPID instead of a PCK chain
    with pytest.raises(AttestationError, match="type 3 is not supported"):
        _verify(SGX, data=bytes(quote))


def test_pck_chain_with_crlf_line_ends_is_understood():
    """Line-ending variants parse (and then fail only on the signed length fields)."""
    chain = SGX.quote[1052:].rstrip(b"\0").replace(b"\n", b"\r\n") + b"\0"
    quote = bytearray(SGX.quote[:1048]) + struct.pack("<I", len(chain)) + chain
    struct.pack_into("<I", quote, 432, len(quote) - 436)
    layout = dcap.parse_quote(bytes(quote))
    assert layout.pck_chain == dcap.parse_quote(SGX.quote).pck_chain


def test_debug_bits_map_to_debug_claim():
    sgx_body = bytearray(dcap.SGX_REPORT_SIZE)
    sgx_body[48] = 0x07  # INIT | DEBUG | MODE64BIT
    claims = dcap._sgx_claims(bytes(sgx_body), status="UpToDate", advisories=(), fmspc=None)
    assert claims.debug is True
    td_body = bytearray(dcap.TD10_REPORT_SIZE)
    td_body[120] = 0x01  # TUD.DEBUG
    claims = dcap._tdx_claims(bytes(td_body), status="UpToDate", advisories=(), fmspc=None)
    assert claims.debug is True
    td_body[120] = 0x00
    td_body[123] = 0x10
    claims = dcap._tdx_claims(bytes(td_body), status="UpToDate", advisories=(), fmspc=None)
    assert claims.debug is False


# --- tampering: one flipped byte anywhere must be refused -------------------------------

SIGNED_REGIONS = (
    "header", "report body", "signature data length", "quote signature", "attestation key",
    "QE report", "QE report signature", "QE authentication data",
    "PCK certification data size", "PCK certificate chain",
)
FLIP_CASES = [(name, region) for name in sorted(VALID) for region in SIGNED_REGIONS] + [
    ("tdx", "certification data type"), ("tdx", "certification data size"),
    ("tdx", "zero padding"),
]


def _region(name: str, region: str) -> tuple[int, int]:
    sample = VALID[name]
    layout = dcap.parse_quote(sample.quote)
    if region == "zero padding":
        return layout.size, len(sample.quote)
    return layout.regions[region]


@pytest.mark.parametrize(("name", "region"), FLIP_CASES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_flipping_a_byte_in_any_region_is_refused(name, region, data):
    sample = VALID[name]
    start, end = _region(name, region)
    offset = data.draw(st.integers(start, end - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor mask")
    try:
        _verify(sample, data=_flip(sample.quote, offset, mask))
    except AttestationError as exc:
        assert isinstance(exc, AttestationError)
        assert str(exc)
    else:
        pytest.fail(f"{name}: flipping byte {offset} ({region}) with {mask:#04x} verified")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgx", "tdx"])
def test_flipping_every_byte_is_refused(name):
    """Exhaustive: each byte of the whole input, one mask per position (about 3 s)."""
    sample = VALID[name]
    quote, collateral = sample.quote, sample.collateral
    accepted = []
    for offset in range(len(quote)):
        mask = 1 << (offset % 8)
        try:
            dcap.verify(Evidence(sample.tee, _flip(quote, offset, mask), collateral),
                        at=sample.mid, config=CONFIG)
        except AttestationError:
            continue
        accepted.append(offset)
    assert accepted == []


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=6000), tee=st.sampled_from([Tee.SGX, Tee.TDX]))
def test_arbitrary_bytes_only_ever_raise_attestation_error(junk, tee):
    with pytest.raises(AttestationError):
        _verify(SGX, data=junk, tee=tee)


@pytest.mark.parametrize("name", sorted(VALID))
@pytest.mark.parametrize("replacement", [b"\x00", b"\r", b" "])
def test_replacing_the_chains_final_line_break_is_refused(name, replacement):
    """Regression (found by hypothesis): the final LF of the PEM chain is not covered by
    any signature, so it must be checked as text."""
    quote = VALID[name].quote
    end = quote.rstrip(b"\x00")
    assert end.endswith(b"-----\n")
    spliced = end[:-1] + replacement + quote[len(end):]
    with pytest.raises(AttestationError):
        _verify(VALID[name], data=spliced)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_splicing_garbage_into_a_quote_is_refused(name, data):
    sample = VALID[name]
    quote = sample.quote
    start = data.draw(st.integers(0, len(quote) - 1))
    length = data.draw(st.integers(1, 64))
    junk = data.draw(st.binary(min_size=length, max_size=length))
    spliced = quote[:start] + junk + quote[start + length:]
    if spliced == quote:
        return
    with pytest.raises(AttestationError):
        _verify(sample, data=spliced)
