"""Verifier for Intel SGX and TDX evidence (DCAP ECDSA quotes).

Appraisal of one quote, in order; each step raises a typed error naming what failed:

1. *Structure* (here, before any library call): size limits; header (version 3/4/5,
   ECDSA-P256 attestation key, Intel QE vendor ID, TEE type — which must match the evidence's
   label); report body size for the TEE; every length field of the signature data; the
   certification data must be an embedded PCK certificate chain in canonical PEM that ends in
   the pinned Intel SGX Root CA; nothing but zero padding may follow the quote.
   → :class:`~sealedtorch.errors.AttestationError`.
2. *Collateral*: from the evidence, or :func:`.collateral.obtain` (cache / PCCS / file);
   parsed, matched to the quote's TEE, FMSPC and PCK CA, and checked to be valid at ``at``.
   → :class:`~sealedtorch.errors.CollateralError` naming the missing or expired item.
3. *Cryptography and TCB evaluation* by ``dcap-qvl`` against the pinned Intel SGX Root CA:
   PCK chain and CRLs, QE report signature, QE report binding of the attestation key, quote
   signature, QE identity, TCB info signature and TCB level matching.  Its errors are
   translated into AttestationError/CollateralError with a message naming the step.
4. *Claims*: measurements read from the verified report body, plus the TCB status and
   advisory IDs dcap-qvl computed.  The TCB status is reported, not enforced: that is the
   policy's job (``OutOfDate`` etc. verify fine here; "no matching TCB level" does not).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import AttestationError, CollateralError
from . import collateral as _collateral
from . import layout
from .evidence import Evidence, SgxClaims, TdxClaims, Tee

if TYPE_CHECKING:
    from . import VerifierConfig

__all__ = [
    "INTEL_QE_VENDOR_ID",
    "MAX_QUOTE_SIZE",
    "QuoteLayout",
    "parse_quote",
    "verify",
]

#: Quotes larger than this are refused before parsing (a real one is about 5 KiB).
MAX_QUOTE_SIZE = 64 * 1024
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
QE_REPORT_SIZE = 384
ECDSA_SIG_SIZE = 64
ECDSA_KEY_SIZE = 64
_MIN_QUOTE_SIZE = HEADER_SIZE + SGX_REPORT_SIZE + 4

_TEE_TYPE = {0x00000000: Tee.SGX, 0x00000081: Tee.TDX}
_ATT_KEY_ECDSA_P256 = 2
_CERT_PCK_CHAIN = 5
_CERT_QE_REPORT = 6
_V5_BODY = {1: (Tee.SGX, SGX_REPORT_SIZE, "sgx"), 2: (Tee.TDX, TD10_REPORT_SIZE, "td10"),
            3: (Tee.TDX, TD15_REPORT_SIZE, "td15")}

_R = TypeVar("_R")

_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_END = "-----END CERTIFICATE-----"
_B64_LINE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _a(tee: Tee) -> str:
    return "an SGX" if tee is Tee.SGX else "a TDX"


@dataclass(frozen=True)
class QuoteLayout:
    """A structurally checked DCAP quote (nothing here is verified cryptographically)."""

    version: int
    tee: Tee
    body_kind: str  # "sgx", "td10" or "td15"
    body: bytes = field(repr=False)
    pck_chain: tuple[bytes, ...] = field(repr=False)  # DER, leaf first
    size: int  # bytes of quote proper; the rest of the input is zero padding
    #: Named byte ranges [start, end) of the input, for diagnostics and tests.
    regions: dict[str, tuple[int, int]] = field(repr=False)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.regions: dict[str, tuple[int, int]] = {}

    def take(self, n: int, what: str) -> bytes:
        left = len(self.data) - self.pos
        if n > left:
            raise AttestationError(
                f"quote is truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"only {left} left (wrong size)")
        start = self.pos
        self.pos += n
        self.regions[what] = (start, self.pos)
        return self.data[start:self.pos]

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def parse_quote(data: bytes, *, expected_tee: Tee | None = None) -> QuoteLayout:
    """Check the structure of a DCAP quote (v3 SGX, v4 SGX/TDX, v5) and split it.

    Raises :class:`AttestationError` naming the first problem (size, header field, TEE
    mismatch, length field, certification data).
    """
    data = _sized(data)
    r = _Reader(data)
    version, tee = _header(r, expected_tee)
    want_size, kind = _body_layout(r, version, tee)
    body = r.take(want_size, "report body")
    chain_pem = _signature_data(r, version)
    end = r.pos
    padding = data[end:]
    if padding.strip(b"\0"):
        raise AttestationError(
            f"quote parse error: {len(padding)} bytes after the end of the quote (offset "
            f"{end}) are not zero padding (wrong size or appended data)")
    chain = _pck_chain(chain_pem)
    return QuoteLayout(version=version, tee=tee, body_kind=kind, body=body,
                       pck_chain=chain, size=end, regions=r.regions)


def _sized(data: bytes) -> bytes:
    """``data`` as bytes, refused before parsing when it cannot be a quote by size alone."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AttestationError(f"quote must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise AttestationError("quote is empty (wrong size)")
    if len(data) > MAX_QUOTE_SIZE:
        raise AttestationError(
            f"quote is {len(data)} bytes, more than the {MAX_QUOTE_SIZE}-byte limit "
            "(wrong size)")
    if len(data) < _MIN_QUOTE_SIZE:
        raise AttestationError(
            f"quote is {len(data)} bytes, shorter than the smallest possible DCAP quote "
            f"({_MIN_QUOTE_SIZE} bytes before the signature; wrong size)")
    return data


def _header(r: _Reader, expected_tee: Tee | None) -> tuple[int, Tee]:
    """The quote header: version, TEE (which must be the evidence's label), key type, QE
    vendor."""
    header = r.take(HEADER_SIZE, "header")
    version, key_type, tee_type = struct.unpack_from("<HHI", header)
    if version not in (3, 4, 5):
        raise AttestationError(f"quote parse error: unsupported quote version {version}")
    tee = _TEE_TYPE.get(tee_type)
    if tee is None:
        raise AttestationError(f"quote parse error: unknown TEE type 0x{tee_type:08x} in "
                               "the quote header")
    if expected_tee is not None and tee is not expected_tee:
        raise AttestationError(
            f"TEE mismatch: evidence is labelled {expected_tee.value} but the quote is "
            f"{_a(tee)} quote (header TEE type 0x{tee_type:08x})")
    if version == 3 and tee is not Tee.SGX:
        raise AttestationError("quote parse error: a version 3 quote must be an SGX quote")
    if key_type != _ATT_KEY_ECDSA_P256:
        raise AttestationError(f"quote parse error: unsupported attestation key type "
                               f"{key_type} (only ECDSA-256-with-P-256 is used by DCAP)")
    if header[12:28] != INTEL_QE_VENDOR_ID:
        raise AttestationError(f"quote parse error: QE vendor ID {header[12:28].hex()} is "
                               "not Intel's")
    return int(version), tee


def _body_layout(r: _Reader, version: int, tee: Tee) -> tuple[int, str]:
    """Size and kind of the report body: declared by a v5 quote, implied by v3/v4's TEE."""
    if version != 5:
        return (SGX_REPORT_SIZE, "sgx") if tee is Tee.SGX else (TD10_REPORT_SIZE, "td10")
    body_type = r.u16("report body type")
    body_size = r.u32("report body size")
    if body_type not in _V5_BODY:
        raise AttestationError(f"quote parse error: unknown v5 report body type "
                               f"{body_type}")
    body_tee, want_size, kind = _V5_BODY[body_type]
    if body_tee is not tee:
        raise AttestationError(f"quote parse error: report body type {body_type} does "
                               f"not belong to {_a(tee)} quote")
    if body_size != want_size:
        raise AttestationError(f"quote parse error: report body size {body_size} for "
                               f"body type {body_type}, expected {want_size} (wrong size)")
    return want_size, kind


def _signature_data(r: _Reader, version: int) -> bytes:
    """The signature data (quote signature, attestation key, certification data), every
    length field checked against what it covers; returns the PCK chain's bytes."""
    sig_len = r.u32("signature data length")
    sig_start = r.pos
    r.take(ECDSA_SIG_SIZE, "quote signature")
    r.take(ECDSA_KEY_SIZE, "attestation key")
    if version == 3:
        chain_pem = _qe_certification(r, outer_end=None)
    else:
        cert_type = r.u16("certification data type")
        cert_size = r.u32("certification data size")
        if cert_type != _CERT_QE_REPORT:
            raise AttestationError(
                f"quote parse error: certification data type {cert_type}, expected "
                f"{_CERT_QE_REPORT} (QE report certification data)")
        outer_end = r.pos + cert_size
        chain_pem = _qe_certification(r, outer_end=outer_end)
        if r.pos != outer_end:
            raise AttestationError(
                f"quote parse error: certification data size {cert_size} does not match its "
                f"contents ({r.pos - (outer_end - cert_size)} bytes)")
    if r.pos - sig_start != sig_len:
        raise AttestationError(
            f"quote parse error: signature data length field says {sig_len} bytes but the "
            f"signature data is {r.pos - sig_start} bytes")
    return chain_pem


def _qe_certification(r: _Reader, *, outer_end: int | None) -> bytes:
    """QE report, its signature, QE auth data and the PCK chain; returns the chain's bytes."""
    r.take(QE_REPORT_SIZE, "QE report")
    r.take(ECDSA_SIG_SIZE, "QE report signature")
    auth_len = r.u16("QE authentication data size")
    r.take(auth_len, "QE authentication data")
    cert_type = r.u16("PCK certification data type")
    cert_size = r.u32("PCK certification data size")
    if cert_type != _CERT_PCK_CHAIN:
        raise AttestationError(
            f"quote parse error: PCK certification data type {cert_type} is not supported: "
            f"only type {_CERT_PCK_CHAIN} (PCK certificate chain embedded in the quote) is")
    if outer_end is not None and r.pos + cert_size > outer_end:
        raise AttestationError("quote parse error: PCK certification data size runs past "
                               "the certification data (wrong size)")
    return r.take(cert_size, "PCK certificate chain")


def _pck_chain(pem: bytes) -> tuple[bytes, ...]:
    """Strictly parse the embedded PCK chain: canonical PEM, leaf first, Intel root last.

    Strict on purpose: the chain is not covered by any signature as text, so every byte of
    it must be meaningful — whitespace variants, non-canonical base64 or a root other than
    the pinned one are refused instead of being silently ignored.
    """
    text_bytes = pem.rstrip(b"\0")
    if not text_bytes.endswith(b"\n"):  # every line, the last included, ends in LF (or CRLF)
        raise AttestationError("PCK certificate chain: does not end with a line break")
    try:
        text = text_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise AttestationError("PCK certificate chain: not ASCII PEM") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    certs: list[bytes] = []
    body: list[str] | None = None
    for number, raw_line in enumerate(lines, 1):
        line = raw_line.removesuffix("\r")
        if body is None:
            if line != _PEM_BEGIN:
                raise AttestationError(f"PCK certificate chain: line {number} is not a PEM "
                                       "BEGIN CERTIFICATE line")
            body = []
        elif line == _PEM_END:
            b64 = "".join(body)
            try:
                der = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise AttestationError(f"PCK certificate chain: certificate {len(certs) + 1} "
                                       "is not valid base64") from None
            if not der or base64.b64encode(der).decode() != b64:
                raise AttestationError(f"PCK certificate chain: certificate {len(certs) + 1} "
                                       "is not canonical base64")
            certs.append(der)
            body = None
        elif _B64_LINE.fullmatch(line) and len(line) <= 76:
            body.append(line)
        else:
            raise AttestationError(f"PCK certificate chain: line {number} is not base64 "
                                   "certificate data")
    if body is not None:
        raise AttestationError("PCK certificate chain: last certificate has no END line")
    if len(certs) < 2:
        raise AttestationError(f"PCK certificate chain: {len(certs)} certificate(s), "
                               "expected PCK leaf, intermediate CA and root CA")
    if certs[-1] != _collateral.INTEL_SGX_ROOT_CA_DER:
        raise AttestationError("PCK certificate chain: does not end in the pinned Intel SGX "
                               "Root CA (untrusted root)")
    return tuple(certs)


# --- dcap-qvl ----------------------------------------------------------------------------

# Library messages → (error class, what failed).  First match wins.
_LIBRARY_ERRORS: tuple[tuple[str, type[AttestationError], str], ...] = (
    ("certexpired", AttestationError,
     "certificate expired (PCK chain in the quote or a collateral issuer chain)"),
    ("certnotvalidyet", AttestationError,
     "certificate not yet valid (PCK chain in the quote or a collateral issuer chain)"),
    ("expired", CollateralError, "collateral expired"),
    ("in the future", CollateralError, "collateral not yet valid"),
    ("crlexpired", CollateralError, "CRL expired"),
    ("failed to decode tcbinfo", AttestationError, "TCB info parse error"),
    ("failed to decode qeidentity", AttestationError, "QE identity parse error"),
    ("certrevoked", AttestationError, "certificate revoked (CRL)"),
    ("no matching tcb level", AttestationError,
     "TCB evaluation failed: no matching TCB level for this platform in the TCB info"),
    ("failed to decode quote", AttestationError, "quote parse error"),
    ("isv enclave report signature", AttestationError,
     "quote signature invalid (attestation key over header and report body)"),
    ("signature is invalid for qe_report", AttestationError,
     "QE report signature invalid (not signed by the PCK key)"),
    ("qe report hash mismatch", AttestationError,
     "QE report does not bind the attestation key and QE authentication data"),
    ("signature is invalid for tcb_info", AttestationError, "TCB info signature invalid"),
    ("signature is invalid for qe_identity", AttestationError,
     "QE identity signature invalid"),
    ("crl", AttestationError, "CRL check failed"),
    ("pck certificate", AttestationError, "PCK certificate chain invalid"),
    ("certificate chain", AttestationError,
     "certificate chain invalid (PCK chain in the quote or an issuer chain in the collateral)"),
    ("tcbinfo", AttestationError, "TCB info invalid"),
    ("tcb info", AttestationError, "TCB info invalid"),
    ("qeidentity", AttestationError, "QE identity invalid"),
    ("qe identity", AttestationError, "QE identity invalid"),
    ("fmspc", AttestationError, "FMSPC check failed"),
    ("qe vendor", AttestationError, "quote parse error"),
    ("attestation key type", AttestationError, "quote parse error"),
)


def _library_error(exc: BaseException) -> AttestationError:
    text = str(exc).strip()
    text = text.removeprefix("Verification failed:").strip()
    detail = " ".join(part.strip() for part in text.splitlines() if part.strip())
    detail = detail.replace("Caused by: ", "caused by: ")
    low = detail.lower()
    for needle, cls, what in _LIBRARY_ERRORS:
        if needle in low:
            return cls(f"{what}: {detail} (dcap-qvl)")
    return AttestationError(f"DCAP quote verification failed: {detail or type(exc).__name__} "
                            "(dcap-qvl)")


def _call(fn: Callable[..., _R], *args: Any, context: str | None = None) -> _R:
    """Call into dcap-qvl; whatever it raises (ValueError, a Rust panic) becomes ours.

    pyo3 turns Rust panics into ``PanicException``, which derives from BaseException.
    """
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        if context is None:
            raise _library_error(exc) from None
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AttestationError(f"{context}: {detail} (dcap-qvl)") from None


# --- claims ------------------------------------------------------------------------------

# SGX REPORTBODY and TDX TDREPORT (1.0; TD 1.5 bodies extend it at the end) offsets.
_SGX_BLOBS: dict[str, layout.Span] = {
    "cpu_svn": (0, 16), "isv_ext_prod_id": (32, 48), "attributes": (48, 64),
    "mr_enclave": (64, 96), "mr_signer": (128, 160), "config_id": (192, 256),
    "isv_family_id": (304, 320), "report_data": (320, 384),
}
_SGX_UINTS: dict[str, layout.Span] = {
    "isv_prod_id": (256, 258), "isv_svn": (258, 260), "config_svn": (260, 262),
}
_TDX_BLOBS: dict[str, layout.Span] = {
    "tee_tcb_svn": (0, 16), "mr_seam": (16, 64), "td_attributes": (120, 128),
    "xfam": (128, 136), "mr_td": (136, 184), "mr_config_id": (184, 232),
    "mr_owner": (232, 280), "mr_owner_config": (280, 328), "rtmr0": (328, 376),
    "rtmr1": (376, 424), "rtmr2": (424, 472), "rtmr3": (472, 520), "report_data": (520, 584),
}
_SGX_DEBUG = (48, 0x02)   # ATTRIBUTES.DEBUG: (byte offset, bit mask)
_TDX_DEBUG = (120, 0x01)  # TDATTRIBUTES.TUD.DEBUG


def _sgx_claims(body: bytes, *, status: str, advisories: tuple[str, ...],
                fmspc: str) -> SgxClaims:
    offset, mask = _SGX_DEBUG
    return SgxClaims(tee=Tee.SGX, debug=bool(body[offset] & mask), tcb_status=status,
                     advisory_ids=advisories, fmspc=fmspc,
                     **layout.read(body, blobs=_SGX_BLOBS, uints=_SGX_UINTS))


def _tdx_claims(body: bytes, *, status: str, advisories: tuple[str, ...],
                fmspc: str) -> TdxClaims:
    offset, mask = _TDX_DEBUG
    return TdxClaims(tee=Tee.TDX, debug=bool(body[offset] & mask), tcb_status=status,
                     advisory_ids=advisories, fmspc=fmspc,
                     **layout.read(body, blobs=_TDX_BLOBS))


# --- collateral ----------------------------------------------------------------------------

def _usable(col: _collateral.Collateral, key: _collateral.CollateralKey, *, at: int,
            config: VerifierConfig) -> _collateral.Collateral:
    col.check_for(key)
    col.check_valid_at(at)
    col.check_tcb_evaluation_data_number(config.min_tcb_evaluation_data_number)
    return col


def _choose_collateral(evidence: Evidence, key: _collateral.CollateralKey, *, at: int,
                       config: VerifierConfig) -> _collateral.Collateral:
    """The collateral to appraise this quote with.

    With ``config.prefer_verifier_collateral`` (the default) and a collateral source or cache
    configured, the verifier's own collateral is used when it has a usable one: an attester
    cannot then choose which (older, still-dated) TCB info it is judged by.  The attester's
    collateral is the fallback, and the only source when the preference is off.  Whichever
    is used must be for this platform, valid at ``at`` and from the required TCB recovery
    (``min_tcb_evaluation_data_number``).  Every failure is a :class:`CollateralError`.
    """
    own_error: CollateralError | None = None
    has_own = bool((config.pccs_url or "").strip()) or config.cache_dir is not None
    if has_own and (config.prefer_verifier_collateral or evidence.collateral is None):
        try:
            return _usable(_collateral.obtain(key, at=at, config=config), key, at=at,
                           config=config)
        except CollateralError as exc:
            if evidence.collateral is None:
                raise
            own_error = exc
    if evidence.collateral is None:
        return _usable(_collateral.obtain(key, at=at, config=config), key, at=at,
                       config=config)  # raises: no source is configured
    try:
        col = _collateral.parse(evidence.collateral)
        return _usable(col, key, at=at, config=config)
    except CollateralError as exc:
        also = f" (the verifier's own collateral was not usable either: {own_error})" \
            if own_error is not None else ""
        raise CollateralError(f"collateral in the evidence: {exc}{also}") from None


# --- the verifier ------------------------------------------------------------------------

def verify(evidence: Evidence, *, at: int,
           config: VerifierConfig) -> SgxClaims | TdxClaims:
    """Appraise an SGX or TDX DCAP quote at Unix time ``at`` and return its claims.

    Collateral comes from ``evidence.collateral`` (dcap-qvl's JSON form) or, when absent,
    from :func:`.collateral.obtain` (cache, then ``config.pccs_url``).  Raises
    :class:`AttestationError` or :class:`CollateralError` naming what failed; never
    enforces the TCB status.
    """
    import dcap_qvl

    try:
        tee = Tee(evidence.tee)
    except ValueError:
        raise AttestationError(f"unknown TEE type {evidence.tee!r}") from None
    if tee not in (Tee.SGX, Tee.TDX):
        raise AttestationError(f"the DCAP verifier handles sgx and tdx evidence, not {tee}")
    at = int(at)
    layout = parse_quote(evidence.data, expected_tee=tee)
    quote = bytes(evidence.data[:layout.size])

    parsed = _call(dcap_qvl.parse_quote, quote, context="quote parse error")
    if bool(parsed.is_tdx()) != (tee is Tee.TDX):  # the library must agree with us
        raise AttestationError(f"TEE mismatch: dcap-qvl does not read this as {_a(tee)} quote")
    fmspc = str(_call(parsed.fmspc, context="PCK certificate invalid: cannot read its FMSPC "
                      "(malformed or tampered certificate)")).upper()
    ca = str(_call(parsed.ca, context="PCK certificate invalid: cannot tell its issuing CA "
                   "(malformed or tampered certificate)"))
    try:
        key = _collateral.CollateralKey(tee, fmspc, ca)
    except CollateralError as exc:
        raise AttestationError(f"PCK certificate invalid: {exc}") from None

    col = _choose_collateral(evidence, key, at=at, config=config)

    report = _call(dcap_qvl.verify_with_root_ca, quote, col.to_dcap(),
                   _collateral.INTEL_SGX_ROOT_CA_DER, at)
    status = str(report.status)
    advisories = tuple(str(a) for a in report.advisory_ids)
    if tee is Tee.SGX:
        return _sgx_claims(layout.body, status=status, advisories=advisories, fmspc=fmspc)
    return _tdx_claims(layout.body, status=status, advisories=advisories, fmspc=fmspc)
