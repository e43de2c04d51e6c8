"""AMD SEV-SNP verifier: attestation report + VCEK/VLEK → ASK/ASVK → pinned ARK.

Appraisal of one report (``Evidence.data``, 1184 bytes, versions 2 and 3):

1. parse the report (size, version, signature algorithm 1 = ECDSA P-384 with SHA-384,
   signing key VCEK or VLEK, signature padding all zero);
2. take the signing certificate from ``Evidence.certificates`` (PEM, DER, concatenated DER,
   or the SNP extended-report certificate table); fetch a missing VCEK from AMD KDS
   (:mod:`.kds`, cached on disk); take a missing ASK/ARK from the roots shipped in
   ``attest/roots/``;
3. verify the chain: the ARK must be self-signed *and* its SHA-256 DER fingerprint one of
   :data:`ARK_SHA256` (a presented ARK that is not pinned is refused, never skipped); ASK
   signed by the ARK, VCEK signed by the ASK, all RSA-PSS/SHA-384 and valid at ``at``;
4. bind the certificate to the report: its TCB extensions (blSPL, teeSPL, snpSPL,
   ucodeSPL, and fmcSPL on Turin) must equal ``reported_tcb``, and a VCEK's hwID must equal
   ``chip_id`` (unless the chip id is masked to zeros);
5. verify the report signature over bytes 0x000–0x29F with the certificate's P-384 key;
6. check the chain against AMD's CRL for the product when one can be had (cache, or the
   KDS with ``VerifierConfig.fetch_amd_crl``): claim ``crl_status`` is ``good`` or
   ``unavailable: <why>``; a revoked ASK/ASVK raises.

Every failure raises :class:`~sealedtorch.errors.AttestationError`
(:class:`~sealedtorch.errors.CollateralError` when the VCEK is missing and cannot be
fetched) whose message names the step that failed.  No policy is applied here: debug,
measurement, TCB floors and the like are the policy's.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from cryptography import x509
from cryptography.x509.oid import NameOID

from .. import crypto
from ..errors import AttestationError, CollateralError
from . import kds, layout
from .evidence import Evidence, SnpClaims, Tee

if TYPE_CHECKING:
    from . import VerifierConfig

__all__ = [
    "ARK_SHA256", "REPORT_SIZE", "SIGNED_SIZE", "SUPPORTED_VERSIONS", "CertificateSet", "Report",
    "TcbVersion", "certificate_tcb", "fingerprint", "parse_certificates", "parse_report",
    "product_from_cpuid", "shipped_roots", "verify",
]

# --- report layout (SEV-SNP firmware ABI, ATTESTATION_REPORT) ----------------------------

REPORT_SIZE = 0x4A0          # 1184 bytes
SIGNED_SIZE = 0x2A0          # the signature covers bytes 0x000-0x29F
SUPPORTED_VERSIONS = (2, 3)
SIG_ALGO_ECDSA_P384_SHA384 = 1
_R_OFFSET, _S_OFFSET, _SIG_COMPONENT_SIZE = 0x2A0, 0x2E8, 72
_SIG_RESERVED = slice(0x330, REPORT_SIZE)
POLICY_DEBUG_BIT = 19
# ATTESTATION_REPORT fields read as they are (bytes) and as little-endian integers.
_REPORT_BLOBS: dict[str, layout.Span] = {
    "family_id": (0x10, 0x20), "image_id": (0x20, 0x30), "current_tcb_raw": (0x38, 0x40),
    "report_data": (0x50, 0x90), "measurement": (0x90, 0xC0), "host_data": (0xC0, 0xE0),
    "id_key_digest": (0xE0, 0x110), "author_key_digest": (0x110, 0x140),
    "report_id": (0x140, 0x160), "report_id_ma": (0x160, 0x180),
    "reported_tcb_raw": (0x180, 0x188), "chip_id": (0x1A0, 0x1E0),
    "committed_tcb_raw": (0x1E0, 0x1E8), "launch_tcb_raw": (0x1F0, 0x1F8),
}
_REPORT_UINTS: dict[str, layout.Span] = {
    "guest_svn": (0x04, 0x08), "policy": (0x08, 0x10), "vmpl": (0x30, 0x34),
    "platform_info": (0x40, 0x48),
    "r": (_R_OFFSET, _R_OFFSET + _SIG_COMPONENT_SIZE),
    "s": (_S_OFFSET, _S_OFFSET + _SIG_COMPONENT_SIZE),
}

#: SHA-256 of the DER of AMD's root keys (ARK), per product.  These pins, not the PEM files
#: in attest/roots/, are what makes a chain trusted.  Sources: see docs/tee-snp.md.
ARK_SHA256: dict[str, str] = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}

# --- VCEK/VLEK certificate extensions (AMD VCEK certificate and KDS interface spec) -----

_AMD = "1.3.6.1.4.1.3704.1."
OID_BL_SPL = x509.ObjectIdentifier(_AMD + "3.1")
OID_TEE_SPL = x509.ObjectIdentifier(_AMD + "3.2")
OID_SNP_SPL = x509.ObjectIdentifier(_AMD + "3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(_AMD + "3.8")
OID_FMC_SPL = x509.ObjectIdentifier(_AMD + "3.9")
OID_HWID = x509.ObjectIdentifier(_AMD + "4")
# claim name -> (extension OID, extension name in AMD's spec)
_TCB_EXTENSIONS: dict[str, tuple[x509.ObjectIdentifier, str]] = {
    "bootloader": (OID_BL_SPL, "blSPL"),
    "tee": (OID_TEE_SPL, "teeSPL"),
    "snp": (OID_SNP_SPL, "snpSPL"),
    "microcode": (OID_UCODE_SPL, "ucodeSPL"),
    "fmc": (OID_FMC_SPL, "fmcSPL"),
}

# --- certificate table GUIDs (GHCB spec; SNP_GET_EXT_REPORT, configfs-tsm auxblob) -------

_TABLE_GUIDS: dict[str, str] = {
    "63da758d-e664-4564-adc5-f4b93be8accd": "vcek",
    "a8074bc2-a25a-483e-aae6-39c045a0b8a1": "vlek",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782": "ask",
    "c0b406a4-a803-4952-9743-3fb6014cd0ae": "ark",
}
# The table stores GUIDs in RFC 4122 byte order; accept the little-endian (Microsoft) form too.
_GUID_BYTES: dict[bytes, str] = {
    **{UUID(g).bytes: role for g, role in _TABLE_GUIDS.items()},
    **{UUID(g).bytes_le: role for g, role in _TABLE_GUIDS.items()},
}
_TABLE_ENTRY = struct.Struct("<16sII")

_KIND_NAMES = {"vcek": "VCEK", "vlek": "VLEK"}
_INTERMEDIATE_NAMES = {"vcek": "ASK", "vlek": "ASVK"}


# --- the report ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TcbVersion:
    """One 64-bit TCB_VERSION, decoded.  ``fmc`` is set only in Turin's layout.

    Milan/Genoa: byte 0 bootloader, 1 tee, 2-5 reserved, 6 snp, 7 microcode.
    Turin:       byte 0 fmc, 1 bootloader, 2 tee, 3 snp, 4-6 reserved, 7 microcode.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def parse(cls, raw: bytes, *, turin: bool = False) -> TcbVersion:
        if len(raw) != 8:
            raise AttestationError(f"TCB_VERSION must be 8 bytes, got {len(raw)}")
        if turin:
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def as_dict(self) -> dict[str, int]:
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp,
               "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out


@dataclass(frozen=True)
class Report:
    """The fields of an SEV-SNP ATTESTATION_REPORT that the verifier uses (little-endian)."""

    raw: bytes = field(repr=False)
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb_raw: bytes
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key_sel: int      # 0 VCEK, 1 VLEK, 7 none
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb_raw: bytes
    cpuid_family: int         # version >= 3; 0 in version 2
    cpuid_model: int
    cpuid_stepping: int
    chip_id: bytes
    committed_tcb_raw: bytes
    launch_tcb_raw: bytes
    r: int
    s: int

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def debug(self) -> bool:
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    @property
    def chip_id_masked(self) -> bool:
        return not any(self.chip_id)

    @property
    def signing_key(self) -> str:
        if self.signing_key_sel == 0:
            return "vcek"
        if self.signing_key_sel == 1:
            return "vlek"
        raise AttestationError(
            f"report is not signed by a VCEK or VLEK (SIGNING_KEY = {self.signing_key_sel})")

    @property
    def cpuid_product(self) -> str | None:
        """The product line the (signed) CPUID fields name, for version >= 3 reports."""
        return product_from_cpuid(self.cpuid_family, self.cpuid_model)


def product_from_cpuid(family: int, model: int) -> str | None:
    """Milan: family 19h models 00h-0Fh; Genoa (with Bergamo, Siena): 19h models 10h-1Fh and
    A0h-AFh; Turin: family 1Ah.  None when unknown (e.g. a version 2 report: zeros)."""
    if family == 0x19:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    if family == 0x1A:
        return "Turin"
    return None


def parse_report(data: bytes) -> Report:
    """Parse and sanity-check a report; does not verify anything cryptographic."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AttestationError("SEV-SNP report must be bytes")
    raw = bytes(data)
    if len(raw) != REPORT_SIZE:
        raise AttestationError(
            f"SEV-SNP report has the wrong size: {len(raw)} bytes, expected {REPORT_SIZE}")

    def u32(off: int) -> int:
        return int.from_bytes(raw[off:off + 4], "little")

    version = u32(0x00)
    if version not in SUPPORTED_VERSIONS:
        raise AttestationError(f"unsupported SEV-SNP report version {version} "
                               f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    sig_algo = u32(0x34)
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise AttestationError(f"unsupported report signature algorithm {sig_algo} "
                               "(expected 1: ECDSA P-384 with SHA-384)")
    flags = u32(0x48)
    if flags >> 1 & 1:
        raise AttestationError("report is not signed: MASK_CHIP_KEY is set")
    if any(raw[_SIG_RESERVED]):
        raise AttestationError("report signature block is malformed: reserved bytes after "
                               "r and s (0x330-0x49F) are not zero")
    v3 = version >= 3  # CPUID fields exist from version 3 on; zero before
    return Report(
        raw=raw, version=version, signature_algo=sig_algo,
        author_key_en=bool(flags & 1), mask_chip_key=bool(flags >> 1 & 1),
        signing_key_sel=flags >> 2 & 0b111,
        cpuid_family=raw[0x188] if v3 else 0, cpuid_model=raw[0x189] if v3 else 0,
        cpuid_stepping=raw[0x18A] if v3 else 0,
        **layout.read(raw, blobs=_REPORT_BLOBS, uints=_REPORT_UINTS))


# --- certificates ---------------------------------------------------------------------------

@dataclass
class CertificateSet:
    """Certificates sorted by role: leaves (VCEK/VLEK), intermediates (ASK/ASVK), roots."""

    leaves: dict[str, list[x509.Certificate]] = field(
        default_factory=lambda: {"vcek": [], "vlek": []})
    intermediates: list[x509.Certificate] = field(default_factory=list)
    roots: list[x509.Certificate] = field(default_factory=list)


def parse_certificates(blob: bytes | None) -> CertificateSet:
    """Split ``Evidence.certificates`` into roles.

    Accepts a PEM bundle, one DER certificate, concatenated DER certificates, or the SNP
    extended-report certificate table (24-byte entries: GUID, offset, length; all-zero GUID
    terminates; unknown GUIDs are skipped).
    """
    out = CertificateSet()
    if not blob:
        return out
    blob = bytes(blob)
    seen: set[bytes] = set()
    for hint, cert in _split(blob):
        der = crypto.certificate_der(cert)
        if der in seen:
            continue
        seen.add(der)
        if cert.subject == cert.issuer:
            out.roots.append(cert)
        elif hint in ("ask", "ark") or _is_ca(cert):
            out.intermediates.append(cert)
        else:
            out.leaves[_leaf_kind(cert, hint)].append(cert)
    return out


def _split(blob: bytes) -> list[tuple[str | None, x509.Certificate]]:
    if blob[:16] in _GUID_BYTES or _plausible_table(blob):
        return _split_table(blob)
    return [(None, c) for c in _split_pem_der(blob, "evidence certificates")]


_PEM_BEGIN, _PEM_END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"


def _split_pem_der(blob: bytes, what: str) -> list[x509.Certificate]:
    """PEM blocks and DER certificates in any order (``cat vcek.der ask_ark.pem`` works);
    whitespace and NUL padding between them are skipped, text before a PEM block too."""
    out: list[x509.Certificate] = []
    pos = 0
    while pos < len(blob):
        if blob[pos] in b" \t\r\n\x00":
            pos += 1
            continue
        size = kds.der_element_size(blob, pos) if blob[pos] == 0x30 else None
        if size is not None:
            out.append(_load_der(blob[pos:pos + size], f"{what} (certificate {len(out) + 1})"))
            pos += size
            continue
        begin = blob.find(_PEM_BEGIN, pos)
        if begin < 0:
            raise AttestationError(f"{what}: not PEM, DER or an SNP certificate table "
                                   f"(unrecognised data at offset {pos})")
        end = blob.find(_PEM_END, begin)
        if end < 0:
            raise AttestationError(f"{what}: truncated PEM certificate at offset {begin}")
        end += len(_PEM_END)
        out.extend(_load_pem(blob[begin:end], f"{what} (certificate {len(out) + 1})"))
        pos = end
    if not out:
        raise AttestationError(f"{what}: no certificate found")
    return out


def _plausible_table(blob: bytes) -> bool:
    """A table whose first entry has a GUID we do not know (a CRL, say): still a table if
    it is not DER/PEM and its first entry points past the entries into the blob."""
    if len(blob) < 2 * _TABLE_ENTRY.size or blob[0] == 0x30 or blob.lstrip()[:5] == b"-----":
        return False
    _, offset, length = _TABLE_ENTRY.unpack_from(blob, 0)
    return (offset % _TABLE_ENTRY.size == 0 and _TABLE_ENTRY.size * 2 <= offset
            and 0 < length and offset + length <= len(blob))


def _split_table(blob: bytes) -> list[tuple[str | None, x509.Certificate]]:
    out: list[tuple[str | None, x509.Certificate]] = []
    pos = 0
    while True:
        if pos + _TABLE_ENTRY.size > len(blob):
            raise AttestationError("SNP certificate table is truncated (no all-zero terminator)")
        guid, offset, length = _TABLE_ENTRY.unpack_from(blob, pos)
        pos += _TABLE_ENTRY.size
        if guid == bytes(16):
            return out
        if length == 0 or offset + length > len(blob):
            raise AttestationError(f"SNP certificate table entry {UUID(bytes=guid)} points "
                                   f"outside the table (offset {offset}, length {length})")
        role = _GUID_BYTES.get(guid)
        if role is None:
            continue  # e.g. a CRL or a vendor entry: not ours to interpret
        entry = blob[offset:offset + length]
        certs = _split_pem_der(entry, f"{role.upper()} entry of the SNP certificate table")
        out.extend((role, c) for c in certs)


def _load_der(der: bytes, what: str) -> x509.Certificate:
    # AMD VCEKs have serial number 0: cryptography loads them with a deprecation warning,
    # which is deliberately left visible.
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise AttestationError(f"{what} is not a valid X.509 certificate: {exc}") from None


def _load_pem(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise AttestationError(f"{what}: malformed PEM certificate: {exc}") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
    except ValueError as exc:
        raise AttestationError(f"certificate {_cn(cert.subject)!r} has malformed extensions: "
                               f"{exc}") from None


def _leaf_kind(cert: x509.Certificate, hint: str | None) -> str:
    cn = _cn(cert.subject)
    if cn == "SEV-VLEK" or (hint == "vlek" and cn != "SEV-VCEK"):
        return "vlek"
    return "vcek"


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex (what :data:`ARK_SHA256` pins)."""
    return crypto.certificate_sha256(cert)


@functools.cache
def shipped_roots() -> CertificateSet:
    """The AMD ARK/ASK/ASVK certificates shipped in ``sealedtorch/attest/roots/*.pem``."""
    out = CertificateSet()
    folder = resources.files(__package__).joinpath("roots")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".pem"):
            continue
        for cert in _load_pem(entry.read_bytes(), f"shipped root file {entry.name}"):
            (out.roots if cert.subject == cert.issuer else out.intermediates).append(cert)
    return out


# --- the chain --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Chain:
    product: str
    leaf: x509.Certificate
    intermediate: x509.Certificate
    ark: x509.Certificate


def _pinned_product(cert: x509.Certificate) -> str | None:
    fp = fingerprint(cert)
    for product, pin in ARK_SHA256.items():
        if crypto.constant_time_equal(fp.encode(), pin.lower().encode()):
            return product
    return None


def _verify_chain(leaf: x509.Certificate, kind: str, given: CertificateSet,
                  at: int) -> _Chain:
    """leaf → ASK/ASVK → pinned ARK, every signature, algorithm, validity and key type
    checked (step 3 of the module docstring)."""
    leaf_name, mid_name = _KIND_NAMES[kind], _INTERMEDIATE_NAMES[kind]
    _refuse_unpinned_roots(given)
    mid = _intermediate(leaf, given, leaf_name, mid_name)
    ark, product = _pinned_ark(mid, given, mid_name)
    for cert, name in ((ark, "ARK"), (mid, mid_name), (leaf, leaf_name)):
        _check_algorithm(cert, name)
        _check_validity(cert, name, at)
    for cert, name in ((ark, "ARK"), (mid, mid_name)):
        if not _is_ca(cert):
            raise AttestationError(f"{name} {_cn(cert.subject)!r} is not a CA certificate")
        if not crypto.holds_rsa_key(cert):
            raise AttestationError(f"{name} {_cn(cert.subject)!r} does not hold an RSA key")
    if not crypto.holds_ecdsa_p384_key(leaf):
        raise AttestationError(f"{leaf_name} does not hold an ECDSA P-384 public key")
    return _Chain(product=product, leaf=leaf, intermediate=mid, ark=ark)


def _refuse_unpinned_roots(given: CertificateSet) -> None:
    """Any root the evidence presents must be one of AMD's pinned ARKs: a self-made root is
    a forgery attempt, not something to skip over."""
    for root in given.roots:
        if _pinned_product(root) is None:
            raise AttestationError(
                f"untrusted root: the evidence presents a root certificate "
                f"{_cn(root.subject)!r} (SHA-256 {fingerprint(root)}) that is not a pinned "
                f"AMD ARK ({', '.join(ARK_SHA256)}); ARK not pinned")


def _intermediate(leaf: x509.Certificate, given: CertificateSet, leaf_name: str,
                  mid_name: str) -> x509.Certificate:
    """The ASK/ASVK that signed ``leaf``: the evidence's own, else the shipped one with the
    right name."""
    candidates = [c for c in given.intermediates if c.subject == leaf.issuer]
    source = "evidence"
    if not candidates:
        candidates = [c for c in shipped_roots().intermediates if c.subject == leaf.issuer]
        source = "shipped roots"
    if not candidates:
        raise AttestationError(
            f"untrusted root: no {mid_name} named {_cn(leaf.issuer)!r} (the {leaf_name}'s "
            "issuer) in the evidence or among the shipped AMD certificates")
    signed = [c for c in candidates if crypto.cert_signed_by(leaf, c)]
    if not signed:
        raise AttestationError(
            f"{leaf_name} signature does not verify under the {mid_name} "
            f"{_cn(leaf.issuer)!r} (from the {source}): {leaf_name} certificate is forged "
            "or damaged")
    return signed[0]


def _pinned_ark(mid: x509.Certificate, given: CertificateSet,
                mid_name: str) -> tuple[x509.Certificate, str]:
    """The pinned, self-signed ARK that signed ``mid``, and its product line."""
    roots = [c for c in given.roots if c.subject == mid.issuer]
    if not roots:
        roots = [c for c in shipped_roots().roots if c.subject == mid.issuer]
    if not roots:
        raise AttestationError(f"untrusted root: no pinned AMD ARK named {_cn(mid.issuer)!r} "
                               f"issued the {mid_name}")
    ark = roots[0]
    product = _pinned_product(ark)
    if product is None:  # a shipped file that does not match its pin
        raise AttestationError(f"untrusted root: ARK {_cn(ark.subject)!r} (SHA-256 "
                               f"{fingerprint(ark)}) is not pinned")
    if not crypto.cert_signed_by(ark, ark):
        raise AttestationError(f"ARK {_cn(ark.subject)!r} is not validly self-signed")
    if not crypto.cert_signed_by(mid, ark):
        raise AttestationError(f"{mid_name} signature does not verify under ARK "
                               f"{_cn(ark.subject)!r}: {mid_name} certificate is forged or "
                               "damaged")
    return ark, product


def _check_algorithm(cert: x509.Certificate, name: str) -> None:
    if not crypto.signed_with_rsa_pss_sha384(cert):
        raise AttestationError(f"{name} certificate is not signed with RSA-PSS/SHA-384 "
                               f"({cert.signature_algorithm_oid.dotted_string})")


def _check_validity(cert: x509.Certificate, name: str, at: int) -> None:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not nb.timestamp() <= at <= na.timestamp():
        when = datetime.fromtimestamp(at, UTC).isoformat()
        state = "expired" if at > na.timestamp() else "not yet valid"
        raise AttestationError(f"{name} certificate {_cn(cert.subject)!r} {state} at {when} "
                               f"(valid {nb.isoformat()} to {na.isoformat()})")


# --- binding the certificate to the report ----------------------------------------------------

def _amd_extensions(cert: x509.Certificate, name: str) -> dict[str, bytes]:
    try:
        return {e.oid.dotted_string: e.value.value for e in cert.extensions
                if isinstance(e.value, x509.UnrecognizedExtension)}
    except ValueError as exc:
        raise AttestationError(f"{name} certificate has malformed extensions: {exc}") from None


def _der_uint(value: bytes, what: str) -> int:
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 8:
        raise AttestationError(f"{what} is not a DER INTEGER")
    number = int.from_bytes(value[2:], "big", signed=True)
    if number < 0:
        raise AttestationError(f"{what} is negative")
    return number


def certificate_tcb(cert: x509.Certificate, *, turin: bool, name: str = "VCEK") -> dict[str, int]:
    """The TCB a VCEK/VLEK was issued for, from its AMD extensions."""
    ext = _amd_extensions(cert, name)
    out = {}
    for claim, (oid, spec_name) in _TCB_EXTENSIONS.items():
        if claim == "fmc" and not turin:
            continue
        raw = ext.get(oid.dotted_string)
        if raw is None:
            raise AttestationError(f"{name} certificate lacks the {spec_name} extension "
                                   f"({oid.dotted_string})")
        out[claim] = _der_uint(raw, f"{name} {spec_name} extension")
    return out


def _check_binding(chain: _Chain, kind: str, report: Report, tcb: TcbVersion) -> None:
    name = _KIND_NAMES[kind]
    turin = chain.product == "Turin"
    issued_for = certificate_tcb(chain.leaf, turin=turin, name=name)
    reported = tcb.as_dict()
    wrong = [f"{_TCB_EXTENSIONS[k][1]} {issued_for[k]} != reported {reported[k]}"
             for k in issued_for if issued_for[k] != reported.get(k)]
    if wrong:
        raise AttestationError(f"TCB mismatch: the {name} was issued for another TCB than the "
                               f"report's reported_tcb ({'; '.join(wrong)})")
    if kind != "vcek" or report.chip_id_masked:
        return
    hwid = _amd_extensions(chain.leaf, name).get(OID_HWID.dotted_string)
    if hwid is None:
        raise AttestationError("VCEK certificate lacks the hwID extension (1.3.6.1.4.1.3704.1.4)")
    if len(hwid) == 66 and hwid[:2] == b"\x04\x40":  # tolerate a DER-wrapped OCTET STRING
        hwid = hwid[2:]
    if len(hwid) == 64:
        match = crypto.constant_time_equal(hwid, report.chip_id)
    elif len(hwid) == 8 and turin:
        match = crypto.constant_time_equal(hwid, report.chip_id[:8])
    else:
        match = False
    if not match:
        raise AttestationError(f"chip id mismatch: the VCEK's hwID {hwid.hex()[:32]}… is not "
                               f"the report's chip_id {report.chip_id.hex()[:32]}… (VCEK of "
                               "another machine)")


# --- fetching a missing VCEK -----------------------------------------------------------------

@dataclass(frozen=True)
class _Fetched:
    der: bytes
    product: str
    tcb: dict[str, int]
    from_cache: bool


def _candidate_products(report: Report, given: CertificateSet) -> list[str]:
    if report.cpuid_product:
        return [report.cpuid_product]
    named: list[str] = []
    for cert in [*given.intermediates, *given.roots]:
        for product in kds.PRODUCTS:
            if _cn(cert.subject).endswith("-" + product) and product not in named:
                named.append(product)
    # Version 2 reports do not name their product; Turin always emits version >= 3.
    return named or ["Milan", "Genoa"]


def _vcek_from_kds(report: Report, given: CertificateSet, config: VerifierConfig) -> _Fetched:
    if report.chip_id_masked:
        raise CollateralError("the evidence carries no VCEK and the report's chip id is masked, "
                              "so the VCEK cannot be fetched from AMD KDS")
    cache_dir = _cache_dir(config)
    base_url = config.kds_url or kds.DEFAULT_KDS_URL
    timeout = float(config.http_timeout)
    products = _candidate_products(report, given)
    tcbs = {p: TcbVersion.parse(report.reported_tcb_raw, turin=p == "Turin").as_dict()
            for p in products}
    for product in products:
        der = kds.cached_vcek(cache_dir, product, report.chip_id, tcbs[product])
        if der is not None:
            return _Fetched(der, product, tcbs[product], from_cache=True)
    errors = []
    for product in products:
        try:
            der = kds.fetch_vcek(product, report.chip_id, tcbs[product], base_url=base_url,
                                 timeout=timeout)
        except CollateralError as exc:
            errors.append(str(exc))
            continue
        return _Fetched(der, product, tcbs[product], from_cache=False)
    raise CollateralError("the evidence carries no VCEK and AMD KDS did not provide one: "
                          + " | ".join(errors))


# --- the front door ---------------------------------------------------------------------------

def verify(evidence: Evidence, *, at: int, config: VerifierConfig | None = None) -> SnpClaims:
    """Verify SEV-SNP ``evidence`` at Unix time ``at``; return its claims or raise.

    ``config`` is a :class:`sealedtorch.attest.VerifierConfig` (``kds_url``, ``cache_dir``,
    ``http_timeout`` are used).  Raises AttestationError / CollateralError naming what failed.
    """
    from . import VerifierConfig  # the package is loaded before any of its verifiers

    try:
        return _verify(evidence, at=int(at), config=config or VerifierConfig())
    except AttestationError:
        raise
    except Exception as exc:  # fail closed: nothing from cryptography/httpx escapes raw
        raise AttestationError(f"SEV-SNP evidence could not be verified: "
                               f"{type(exc).__name__}: {exc}") from exc


def _verify(evidence: Evidence, *, at: int, config: VerifierConfig) -> SnpClaims:
    if Tee(evidence.tee) is not Tee.SNP:
        raise AttestationError(f"not SEV-SNP evidence (tee={evidence.tee!r})")
    report = parse_report(evidence.data)
    kind = report.signing_key
    given = parse_certificates(evidence.certificates)

    fetched: _Fetched | None = None
    leaves = given.leaves[kind]
    if len(leaves) > 1:
        raise AttestationError(f"the evidence carries {len(leaves)} different "
                               f"{_KIND_NAMES[kind]} certificates; expected one")
    if leaves:
        leaf = leaves[0]
    elif kind == "vlek":
        raise CollateralError("the report is signed by a VLEK but the evidence carries no VLEK "
                              "certificate (VLEKs cannot be fetched from AMD KDS by chip id)")
    else:
        fetched = _vcek_from_kds(report, given, config)
        source = "cached VCEK" if fetched.from_cache else "VCEK from AMD KDS"
        leaf = _load_der(fetched.der, source)

    chain = _verify_chain(leaf, kind, given, at)
    cpuid_product = report.cpuid_product
    if cpuid_product is not None and cpuid_product != chain.product:
        raise AttestationError(f"product mismatch: the report's CPUID names {cpuid_product} but "
                               f"its certificate chain is rooted in ARK-{chain.product}")
    turin = chain.product == "Turin"
    reported = TcbVersion.parse(report.reported_tcb_raw, turin=turin)
    committed = TcbVersion.parse(report.committed_tcb_raw, turin=turin)
    _check_binding(chain, kind, report, reported)

    if not crypto.verify_ecdsa_p384_sha384(leaf.public_key(), report.r, report.s,
                                           report.signed_bytes):
        raise AttestationError(f"report signature does not verify with the "
                               f"{_KIND_NAMES[kind]}'s public key (ECDSA P-384/SHA-384 over "
                               "bytes 0x000-0x29F): the report was modified or signed by "
                               "another key")

    if fetched is not None and not fetched.from_cache:
        kds.store_vcek(_cache_dir(config), fetched.product, report.chip_id,
                       fetched.tcb, fetched.der)
    crl_status = _crl_status(chain, config, at)

    return SnpClaims(
        tee=Tee.SNP,
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=None,
        version=report.version,
        guest_svn=report.guest_svn,
        measurement=report.measurement,
        host_data=report.host_data,
        id_key_digest=report.id_key_digest,
        author_key_digest=report.author_key_digest,
        policy=report.policy,
        reported_tcb=reported.as_dict(),
        committed_tcb=committed.as_dict(),
        chip_id=report.chip_id,
        vmpl=report.vmpl,
        signing_key=kind,
        platform_info=report.platform_info,
        crl_status=crl_status,
    )


# --- AMD's CRL ----------------------------------------------------------------------------

def check_crl(crl_der: bytes, issuer: x509.Certificate,
              certs: Sequence[tuple[str, x509.Certificate]], at: int) -> None:
    """Check a DER CRL against ``certs`` (name, certificate) issued under ``issuer``.

    The CRL must be a CRL, signed by ``issuer`` (AMD's ARK for a real chain), and current at
    ``at`` (thisUpdate <= at < nextUpdate): otherwise :class:`CollateralError`.  A listed
    serial number of an intermediate (ASK/ASVK) or leaf issued under this CRL's issuer
    raises :class:`AttestationError` naming the revoked certificate.
    """
    try:
        crl = x509.load_der_x509_crl(crl_der)
        this_update = crl.last_update_utc
        next_update = crl.next_update_utc
    except ValueError as exc:
        raise CollateralError(f"AMD CRL is not a DER CRL: {exc}") from None
    if not crypto.crl_signed_by(crl, issuer):
        raise CollateralError(f"AMD CRL is not signed by the ARK {_cn(issuer.subject)!r} "
                              "(forged, damaged or for another product)")
    if next_update is None:
        raise CollateralError("AMD CRL has no nextUpdate")
    if not this_update.timestamp() <= at < next_update.timestamp():
        when = datetime.fromtimestamp(at, UTC).isoformat()
        raise CollateralError(f"AMD CRL is not current at {when} (thisUpdate "
                              f"{this_update.isoformat()}, nextUpdate {next_update.isoformat()})")
    try:
        revoked = {entry.serial_number for entry in crl}
    except ValueError as exc:
        raise CollateralError(f"AMD CRL has malformed entries: {exc}") from None
    for name, cert in certs:
        if cert.issuer == crl.issuer and cert.serial_number in revoked:
            raise AttestationError(f"{name} certificate {_cn(cert.subject)!r} (serial "
                                   f"{cert.serial_number:x}) is revoked by AMD's CRL")


def _crl_status(chain: _Chain, config: VerifierConfig, at: int) -> str:
    """Check the chain against AMD's CRL when one can be had (cache, then the KDS when
    ``config.fetch_amd_crl``); return "good" or "unavailable: <why>".  A revoked certificate
    raises; a cached CRL that fails its checks is ignored (and refreshed when fetching)."""
    certs = [("ASK/ASVK", chain.intermediate), ("VCEK/VLEK", chain.leaf)]
    cache_dir = _cache_dir(config)
    problems: list[str] = []
    cached = kds.cached_crl(cache_dir, chain.product)
    if cached is not None:
        try:
            check_crl(cached, chain.ark, certs, at)
            return "good"
        except CollateralError as exc:
            problems.append(f"cached CRL unusable: {exc}")
    if not config.fetch_amd_crl:
        problems.append("fetching AMD's CRL is not enabled" if cached is None else
                        "fetching a fresh one is not enabled")
        return "unavailable: " + "; ".join(problems)
    try:
        der = kds.fetch_crl(chain.product, base_url=config.kds_url,
                            timeout=float(config.http_timeout))
        check_crl(der, chain.ark, certs, at)
    except CollateralError as exc:
        problems.append(str(exc))
        return "unavailable: " + "; ".join(problems)
    kds.store_crl(cache_dir, chain.product, der)
    return "good"


def _cache_dir(config: VerifierConfig) -> Path | None:
    return Path(config.cache_dir) if config.cache_dir is not None else None
