"""SEV-SNP verifier: real published reports, tampering, forged chains, KDS fetch + cache.

No SEV-SNP hardware is available here; the two reports under shared/evidence/snp are real
reports from real Milan machines, published as test data by virtee/sev and go-sev-guest.
"""

from __future__ import annotations

import datetime
import functools
import os
import struct
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import UUID

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from sealedtorch import crypto
from sealedtorch.attest import Evidence, SnpClaims, Tee, VerifierConfig, kds, snp
from sealedtorch.attest import verify as front_door_verify
from sealedtorch.errors import AttestationError, CollateralError

AT = 1_750_000_000  # 2025-06-15: inside every certificate's validity window
_env = os.environ.get("SEALEDTORCH_EVIDENCE_DIR")
EVIDENCE = (Path(_env) if _env
            else Path(__file__).resolve().parents[2].parent / "shared" / "evidence")
SNP_DIR = EVIDENCE / "snp"

GUID = {
    "vcek": UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes,
    "vlek": UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes,
    "ask": UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes,
    "ark": UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes,
    "crl": UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea").bytes,
}


@functools.cache
def sample(name: str) -> bytes:
    path = SNP_DIR / name
    if not path.is_file():
        pytest.fail(f"real SEV-SNP evidence not found at {path} (set SEALEDTORCH_EVIDENCE_DIR)")
    return path.read_bytes()


def report(which: str) -> bytes:
    return sample(f"{which}-report.bin")


def vcek(which: str) -> bytes:
    return sample(f"{which}-vcek.der")


def chain_pem(which: str) -> bytes:
    return sample(f"{which}-ask-ark.pem")


def chain_ders(which: str) -> tuple[bytes, bytes]:
    ask, ark = x509.load_pem_x509_certificates(chain_pem(which))
    return (ask.public_bytes(serialization.Encoding.DER),
            ark.public_bytes(serialization.Encoding.DER))


def ev(data: bytes, certificates: bytes | None) -> Evidence:
    return Evidence(tee=Tee.SNP, data=data, certificates=certificates)


def check(evidence: Evidence, *, at: int = AT, config: VerifierConfig | None = None) -> SnpClaims:
    claims = snp.verify(evidence, at=at, config=config or VerifierConfig())
    assert isinstance(claims, SnpClaims)
    return claims


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


def table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """An SNP extended-report certificate table (GUID, offset, length; zero terminator)."""
    header = 24 * (len(entries) + 1)
    out_header, out_body = b"", b""
    for guid, blob in entries:
        out_header += struct.pack("<16sII", guid, header + len(out_body), len(blob))
        out_body += blob
    return out_header + bytes(24) + out_body


# --- the real reports verify, with the claims read from them ------------------------------

def test_milan_report_verifies_with_its_claims():
    claims = check(ev(report("milan"), vcek("milan")))
    assert claims.tee is Tee.SNP
    assert claims.version == 2
    assert claims.guest_svn == 0
    assert claims.policy == 0x30000
    assert claims.debug is False
    assert claims.vmpl == 0
    assert claims.signing_key == "vcek"
    assert claims.measurement.hex() == (
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
        "3e1a0dc39b2c60bd95b9c480cd81841f")
    assert claims.report_data.hex() == (
        "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c64581"
        "0b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd")
    assert claims.chip_id.hex() == (
        "d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc"
        "15d7af38db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6")
    assert claims.reported_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert claims.committed_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    assert claims.host_data == bytes(32)
    assert claims.id_key_digest == bytes(48)
    assert claims.author_key_digest == bytes(48)
    assert claims.tcb_status is None
    assert claims.insecure is False


def test_second_report_verifies_with_its_claims():
    claims = check(ev(report("second"), vcek("second")))
    assert claims.version == 2
    assert claims.policy == 0xB0000
    assert claims.debug is True  # policy bit 19
    assert claims.vmpl == 0
    assert claims.signing_key == "vcek"
    assert claims.measurement.hex() == (
        "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b"
        "6bdf8a9ece31a5a608eb0cf2e4872b01")
    assert claims.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert claims.chip_id.hex().startswith("3ac3fe21e13fb0990eb28a802e3fb6a2")
    assert claims.reported_tcb == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}
    assert claims.committed_tcb == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}


def test_front_door_dispatches_snp_and_claims_serialise():
    claims = front_door_verify(ev(report("milan"), vcek("milan")), at=AT,
                               config=VerifierConfig())
    assert isinstance(claims, SnpClaims)
    as_json = claims.to_json()
    assert as_json["tee"] == "snp"
    assert as_json["chip_id"] == claims.chip_id.hex()
    assert as_json["reported_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}


@pytest.mark.parametrize("form", [
    "der", "pem-bundle", "der+pem-chain", "der-concatenation", "cert-table", "cert-table-pem",
    "cert-table-crl-first", "cert-table-le-guids",
])
@pytest.mark.parametrize("which", ["milan", "second"])
def test_certificate_encodings(which, form):
    leaf = vcek(which)
    ask, ark = chain_ders(which)
    leaf_pem = x509.load_der_x509_certificate(leaf).public_bytes(serialization.Encoding.PEM)
    blob = {
        "der": leaf,
        "pem-bundle": leaf_pem + chain_pem(which),
        "der+pem-chain": leaf + b"\n" + chain_pem(which),
        "der-concatenation": leaf + ask + ark,
        "cert-table": table([(GUID["vcek"], leaf), (GUID["ask"], ask), (GUID["ark"], ark),
                             (GUID["crl"], b"not a certificate")]) + bytes(100),
        "cert-table-crl-first": table([(GUID["crl"], b"crl"), (GUID["vcek"], leaf)]),
        "cert-table-le-guids": table([(UUID(bytes=GUID["vcek"]).bytes_le, leaf)]),
        "cert-table-pem": table([(GUID["ark"], chain_pem(which)), (GUID["vcek"], leaf_pem)]),
    }[form]
    assert check(ev(report(which), blob)).chip_id == report(which)[0x1A0:0x1E0]


def test_vcek_serial_zero_warning_is_not_suppressed():
    """AMD VCEKs have serial 0; cryptography warns.  It must still work, warning visible."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(ev(report("milan"), vcek("milan")))
    assert all(issubclass(w.category, DeprecationWarning) or
               w.category.__name__ == "CryptographyDeprecationWarning" for w in caught)
    if caught:  # as of cryptography 50 it warns: it must reach the caller
        assert any("serial number" in str(w.message) for w in caught)


# --- tampering: every byte of the signed body and of r/s matters ---------------------------

@settings(max_examples=200, deadline=None)
@given(which=st.sampled_from(["milan", "second"]), index=st.integers(0, snp.SIGNED_SIZE - 1),
       mask=st.integers(1, 255))
def test_flipping_any_signed_byte_is_rejected(which, index, mask):
    with pytest.raises(AttestationError):
        check(ev(flip(report(which), index, mask), vcek(which)))


@settings(max_examples=100, deadline=None)
@given(which=st.sampled_from(["milan", "second"]), index=st.integers(0x2A0, 0x2E8 + 72 - 1),
       mask=st.integers(1, 255))
def test_flipping_any_byte_of_r_or_s_is_rejected(which, index, mask):
    with pytest.raises(AttestationError):
        check(ev(flip(report(which), index, mask), vcek(which)))


@settings(max_examples=30, deadline=None)
@given(index=st.integers(0x330, snp.REPORT_SIZE - 1), mask=st.integers(1, 255))
def test_nonzero_signature_padding_is_rejected(index, mask):
    with pytest.raises(AttestationError, match="reserved bytes"):
        check(ev(flip(report("milan"), index, mask), vcek("milan")))


def test_report_signature_failure_is_named():
    # measurement byte: not parsed or bound to the certificate, only signed
    with pytest.raises(AttestationError, match="report signature does not verify"):
        check(ev(flip(report("milan"), 0x90), vcek("milan")))


@pytest.mark.parametrize(("reported", "other"), [("milan", "second"), ("second", "milan")])
def test_vcek_of_the_other_machine_is_rejected(reported, other):
    with pytest.raises(AttestationError, match=r"TCB mismatch|chip id mismatch"):
        check(ev(report(reported), vcek(other)))


def test_chip_id_mismatch_is_named():
    # same TCB, other chip: rewrite the milan report's chip id (caught before the signature)
    with pytest.raises(AttestationError, match="chip id mismatch"):
        check(ev(flip(report("milan"), 0x1A0), vcek("milan")))


def test_tcb_mismatch_is_named():
    with pytest.raises(AttestationError, match=r"TCB mismatch.*blSPL 3 != reported 2"):
        check(ev(flip(report("milan"), 0x180, 0x01), vcek("milan")))


# --- report layout checks ------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1183, 1185, 2000])
def test_wrong_report_size_is_rejected(size):
    data = (report("milan") + bytes(1000))[:size]
    with pytest.raises(AttestationError, match="wrong size"):
        check(ev(data, vcek("milan")))


@pytest.mark.parametrize("version", [0, 1, 4, 5, 0xFFFFFFFF])
def test_unsupported_report_version_is_rejected(version):
    data = struct.pack("<I", version) + report("milan")[4:]
    with pytest.raises(AttestationError, match="unsupported SEV-SNP report version"):
        check(ev(data, vcek("milan")))


def test_other_signature_algorithm_is_rejected():
    data = bytearray(report("milan"))
    data[0x34:0x38] = struct.pack("<I", 2)
    with pytest.raises(AttestationError, match="signature algorithm"):
        check(ev(bytes(data), vcek("milan")))


@pytest.mark.parametrize(("flags", "message"), [
    (0b10, "MASK_CHIP_KEY"),
    (7 << 2, "not signed by a VCEK or VLEK"),
    (1 << 2, "no VLEK certificate"),
])
def test_signing_key_field(flags, message):
    data = bytearray(report("milan"))
    data[0x48:0x4C] = struct.pack("<I", flags)
    with pytest.raises(AttestationError, match=message):
        check(ev(bytes(data), vcek("milan")))


def test_turin_tcb_layout():
    raw = bytes([1, 2, 3, 4, 0, 0, 0, 0x55])
    assert snp.TcbVersion.parse(raw, turin=True).as_dict() == {
        "fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 0x55}
    assert snp.TcbVersion.parse(raw).as_dict() == {
        "bootloader": 1, "tee": 2, "snp": 0, "microcode": 0x55}
    assert snp.product_from_cpuid(0x1A, 0x02) == "Turin"
    assert snp.product_from_cpuid(0x19, 0x01) == "Milan"
    assert snp.product_from_cpuid(0x19, 0x11) == "Genoa"
    assert snp.product_from_cpuid(0x19, 0xA0) == "Genoa"
    assert snp.product_from_cpuid(0, 0) is None


def test_version_3_report_cpuid_must_match_the_chain():
    # A v3 report naming Genoa, checked against a Milan chain: refused (before or at the
    # signature, never accepted).
    data = bytearray(report("milan"))
    data[0:4] = struct.pack("<I", 3)
    data[0x188:0x18B] = bytes([0x19, 0x11, 0x01])
    parsed = snp.parse_report(bytes(data))
    assert (parsed.version, parsed.cpuid_product) == (3, "Genoa")
    with pytest.raises(AttestationError, match="product mismatch"):
        check(ev(bytes(data), vcek("milan")))


# --- the chain -------------------------------------------------------------------------------

def _tamper_signature(der: bytes) -> bytes:
    return flip(der, len(der) - 1)  # the last byte is inside the signature BIT STRING


def test_broken_vcek_signature_is_rejected():
    with pytest.raises(AttestationError, match="VCEK signature does not verify under the ASK"):
        check(ev(report("milan"), _tamper_signature(vcek("milan"))))


def test_broken_ask_signature_is_rejected():
    ask, ark = chain_ders("milan")
    with pytest.raises(AttestationError, match="ASK signature does not verify under ARK"):
        check(ev(report("milan"), vcek("milan") + _tamper_signature(ask) + ark))


def test_broken_ark_self_signature_is_rejected_as_unpinned():
    ask, ark = chain_ders("milan")
    with pytest.raises(AttestationError, match="untrusted root"):
        check(ev(report("milan"), vcek("milan") + ask + _tamper_signature(ark)))


@pytest.mark.parametrize(("at", "message"), [
    (int(datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC).timestamp()), "expired"),
    (int(datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC).timestamp()), "not yet valid"),
])
def test_certificate_validity_is_checked_at_the_given_time(at, message):
    with pytest.raises(AttestationError, match=f"VCEK certificate 'SEV-VCEK' {message}"):
        check(ev(report("milan"), vcek("milan")), at=at)


@pytest.mark.parametrize("blob", [
    b"garbage", b"\x30\x82\xff\xff", b"-----BEGIN CERTIFICATE-----\nAAAA",
    b"\x30\x03\x02\x01\x00", table([(GUID["vcek"], b"\x30\x00")]), GUID["vcek"] + bytes(4),
])
def test_malformed_certificates_raise_attestation_error(blob):
    with pytest.raises(AttestationError):
        check(ev(report("milan"), blob))


def test_shipped_roots_are_pinned_self_signed_and_sign_their_intermediates():
    roots = snp.shipped_roots()
    products = {snp._pinned_product(ark): ark for ark in roots.roots}
    assert set(products) == {"Milan", "Genoa", "Turin"}
    for ark in roots.roots:
        assert crypto.cert_signed_by(ark, ark)
    names = set()
    for mid in roots.intermediates:
        issuer = next(a for a in roots.roots if a.subject == mid.issuer)
        assert crypto.cert_signed_by(mid, issuer)
        names.add(mid.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    assert {"SEV-Milan", "SEV-Genoa", "SEV-Turin", "SEV-VLEK-Genoa", "SEV-VLEK-Turin"} <= names
    # the Milan chain in the evidence is the shipped one
    _, ark = chain_ders("milan")
    assert snp.fingerprint(x509.load_der_x509_certificate(ark)) == snp.ARK_SHA256["Milan"]


# --- forged chains: a self-made ARK --------------------------------------------------------

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@functools.cache
def _keys():
    return (rsa.generate_private_key(public_exponent=65537, key_size=2048),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ec.generate_private_key(ec.SECP384R1()))


@functools.cache
def _fake_ark(cn: str) -> x509.Certificate:
    """One self-made ARK per name (PSS signatures are randomised: re-signing changes the
    fingerprint)."""
    ark_key = _keys()[0]
    return _cert(_name(cn), _name(cn), ark_key, ark_key, ca=True)


def _name(cn: str) -> x509.Name:
    """AMD's distinguished-name layout, so forged names equal the real ones."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _cert(subject, issuer, key, signer, *, ca, extensions=(), days=3650):
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days)))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)


def forge(*, tcb=(3, 0, 8, 115), hwid=None, leaf_cn="SEV-VCEK", signing_key=0,
          ark_cn="ARK-Milan", ask_cn="SEV-Milan", leaf_days=3650):
    """A complete, internally consistent chain under a self-made ARK, and the milan report
    re-signed with the self-made leaf key (optionally flagged as VLEK-signed)."""
    ark_key, ask_key, leaf_key = _keys()
    data = bytearray(report("milan"))
    data[0x48:0x4C] = struct.pack("<I", signing_key << 2)
    hwid = bytes(data[0x1A0:0x1E0]) if hwid is None else hwid
    ark = _fake_ark(ark_cn)
    ask = _cert(_name(ask_cn), ark.subject, ask_key, ark_key, ca=True)
    amd = "1.3.6.1.4.1.3704.1."
    exts = [x509.UnrecognizedExtension(x509.ObjectIdentifier(amd + oid), _der_int(v))
            for oid, v in zip(["3.1", "3.2", "3.3", "3.8"], tcb, strict=True)]
    exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(amd + "4"), hwid))
    leaf = _cert(_name(leaf_cn), ask.subject, leaf_key, ask_key, ca=False, extensions=exts,
                 days=leaf_days)
    signature = leaf_key.sign(bytes(data[:0x2A0]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(signature)
    data[0x2A0:0x2E8] = r.to_bytes(72, "little")
    data[0x2E8:0x330] = s.to_bytes(72, "little")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ask, ark))
    return bytes(data), pem, ark


def test_self_made_ark_alone_is_an_untrusted_root():
    _, _, fake_ark = forge()
    ask, _ = chain_ders("milan")
    certs = vcek("milan") + ask + fake_ark.public_bytes(serialization.Encoding.DER)
    with pytest.raises(AttestationError, match=r"untrusted root.*not a pinned AMD ARK"):
        check(ev(report("milan"), certs))


def test_fully_forged_chain_is_rejected_only_by_the_pin(monkeypatch):
    data, certs, fake_ark = forge()
    with pytest.raises(AttestationError, match="untrusted root"):
        check(ev(data, certs))
    # Without the fake ARK in the evidence, the shipped ARK-Milan is used and the forged ASK
    # does not verify under it.
    leaf_and_ask = b"".join(c.public_bytes(serialization.Encoding.PEM)
                            for c in x509.load_pem_x509_certificates(certs)[:2])
    with pytest.raises(AttestationError, match="ASK signature does not verify under ARK"):
        check(ev(data, leaf_and_ask))
    # The forgery is otherwise complete: trusting its ARK makes it verify.
    monkeypatch.setitem(snp.ARK_SHA256, "Forged", snp.fingerprint(fake_ark))
    claims = check(ev(data, certs))
    assert claims.reported_tcb == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}


def test_forged_but_pinned_chain_still_checks_tcb_hwid_and_validity(monkeypatch):
    _, _, fake_ark = forge()
    monkeypatch.setitem(snp.ARK_SHA256, "Forged", snp.fingerprint(fake_ark))
    data, certs, _ = forge(tcb=(3, 0, 9, 115))
    with pytest.raises(AttestationError, match=r"TCB mismatch.*snpSPL 9 != reported 8"):
        check(ev(data, certs))
    data, certs, _ = forge(hwid=bytes(range(64)))
    with pytest.raises(AttestationError, match="chip id mismatch"):
        check(ev(data, certs))
    data, certs, _ = forge(leaf_days=30)
    with pytest.raises(AttestationError, match="VCEK certificate 'SEV-VCEK' expired"):
        check(ev(data, certs))


def test_vlek_signed_report(monkeypatch):
    _, _, fake_ark = forge()
    monkeypatch.setitem(snp.ARK_SHA256, "Forged", snp.fingerprint(fake_ark))
    data, certs, _ = forge(leaf_cn="SEV-VLEK", signing_key=1, ask_cn="SEV-VLEK-Milan",
                           hwid=b"\x00" * 64)  # a VLEK's hwID is not checked
    claims = check(ev(data, certs))
    assert claims.signing_key == "vlek"
    # A VCEK-flagged report with only a VLEK in the evidence has no VCEK: KDS is tried.
    with pytest.raises(CollateralError):
        check(ev(flip(data, 0x48, 1 << 2), certs),
              config=VerifierConfig(kds_url="http://127.0.0.1:9"))


# --- fetching the VCEK from AMD KDS --------------------------------------------------------

class _KdsHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def kds_server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KdsHandler)
    server.routes, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


MILAN_KDS_PATH = (
    "/vcek/v1/Milan/d49554ec717f4e5b0fe6b143bcf0405bd7ae304727edf46603f2a76aef6a3abc15d7af38"
    "db757039029f0efacfd08e244324884738c72b082e2f87a44d541eb6"
    "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")


def test_missing_vcek_is_fetched_once_then_served_from_cache(kds_server, tmp_path):
    kds_server.routes[MILAN_KDS_PATH] = vcek("milan")
    config = VerifierConfig(kds_url=kds_server.url, cache_dir=tmp_path)
    first = check(ev(report("milan"), None), config=config)
    assert kds_server.requests == [MILAN_KDS_PATH]
    second = check(ev(report("milan"), None), config=config)
    assert second == first
    assert kds_server.requests == [MILAN_KDS_PATH]  # no second request
    cached = list((tmp_path / kds.CACHE_SUBDIR).iterdir())
    assert [p.read_bytes() for p in cached] == [vcek("milan")]
    # the cache alone suffices: KDS unreachable, still verifies
    offline = VerifierConfig(kds_url="http://127.0.0.1:9", cache_dir=tmp_path)
    assert check(ev(report("milan"), None), config=offline) == first


def test_fetch_uses_the_product_named_by_the_given_ask(kds_server, tmp_path):
    kds_server.routes[MILAN_KDS_PATH] = vcek("milan")
    config = VerifierConfig(kds_url=kds_server.url, cache_dir=tmp_path)
    check(ev(report("milan"), chain_pem("milan")), config=config)
    assert kds_server.requests == [MILAN_KDS_PATH]


def test_without_cache_dir_every_verification_fetches(kds_server):
    kds_server.routes[MILAN_KDS_PATH] = vcek("milan")
    config = VerifierConfig(kds_url=kds_server.url)
    check(ev(report("milan"), None), config=config)
    check(ev(report("milan"), None), config=config)
    assert kds_server.requests == [MILAN_KDS_PATH] * 2


def test_kds_without_the_vcek_is_a_collateral_error(kds_server, tmp_path):
    config = VerifierConfig(kds_url=kds_server.url, cache_dir=tmp_path)
    with pytest.raises(CollateralError, match="HTTP 404"):
        check(ev(report("milan"), None), config=config)
    # a version 2 report does not name its product: Milan, then Genoa
    assert [p.split("/")[3] for p in kds_server.requests] == ["Milan", "Genoa"]


def test_kds_garbage_or_wrong_vcek_is_rejected_and_not_cached(kds_server, tmp_path):
    config = VerifierConfig(kds_url=kds_server.url, cache_dir=tmp_path)
    kds_server.routes[MILAN_KDS_PATH] = b"<html>maintenance</html>"
    with pytest.raises(CollateralError, match="not a DER certificate"):
        check(ev(report("milan"), None), config=config)
    kds_server.routes[MILAN_KDS_PATH] = vcek("second")  # a real VCEK, another machine's
    with pytest.raises(AttestationError, match=r"TCB mismatch|chip id mismatch"):
        check(ev(report("milan"), None), config=config)
    assert not (tmp_path / kds.CACHE_SUBDIR).exists() or not any(
        (tmp_path / kds.CACHE_SUBDIR).iterdir())


def test_corrupt_cache_entry_is_replaced(kds_server, tmp_path):
    kds_server.routes[MILAN_KDS_PATH] = vcek("milan")
    config = VerifierConfig(kds_url=kds_server.url, cache_dir=tmp_path)
    chip_id = report("milan")[0x1A0:0x1E0]
    tcb = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
    path = kds.cache_file(tmp_path, "Milan", chip_id, tcb)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x30\x03truncated")
    check(ev(report("milan"), None), config=config)
    assert path.read_bytes() == vcek("milan")
    assert len(kds_server.requests) == 1


def test_kds_unreachable_is_a_collateral_error(tmp_path):
    config = VerifierConfig(kds_url="http://127.0.0.1:9", cache_dir=tmp_path, http_timeout=2)
    with pytest.raises(CollateralError, match="unreachable"):
        check(ev(report("milan"), None), config=config)


def test_masked_chip_id_without_vcek_cannot_be_fetched():
    data = bytearray(report("milan"))
    data[0x1A0:0x1E0] = bytes(64)
    with pytest.raises(CollateralError, match="masked"):
        check(ev(bytes(data), None), config=VerifierConfig(kds_url="http://127.0.0.1:9"))


def test_kds_paths():
    chip = bytes(range(64))
    assert kds.vcek_path("Milan", chip, {"bootloader": 3, "tee": 0, "snp": 8,
                                         "microcode": 115}) == (
        f"/vcek/v1/Milan/{chip.hex()}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115")
    assert kds.vcek_path("Turin", chip, {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4,
                                         "microcode": 5}) == (
        f"/vcek/v1/Turin/{chip[:8].hex()}?fmcSPL=1&blSPL=2&teeSPL=3&snpSPL=4&ucodeSPL=5")
    with pytest.raises(CollateralError):
        kds.vcek_path("Naples", chip, {})
    with pytest.raises(CollateralError):
        kds.vcek_path("Turin", chip, {"bootloader": 2, "tee": 3, "snp": 4, "microcode": 5})
