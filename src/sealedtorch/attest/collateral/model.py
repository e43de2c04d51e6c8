"""The collateral data model: dcap-qvl's JSON form, parsed, matched and dated.

Invariants: a :class:`Collateral` holds exactly the nine :data:`FIELDS`; every dated item
(TCB info, QE identity, CRLs, issuer chains) is a :class:`ValidityItem`, so an expiry is
always reported by name; the embedded Intel SGX Root CA matches its pinned fingerprint or
the module does not import.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cryptography import x509

from ... import crypto
from ...errors import CollateralError
from ..evidence import Tee
from .key import _CA_ISSUER_CN, CollateralKey

if TYPE_CHECKING:
    import dcap_qvl

log = logging.getLogger("sealedtorch.attest.collateral")

#: The nine fields of dcap-qvl's collateral JSON (``QuoteCollateralV3.to_json``).  CRLs and
#: signatures are hex strings; chains are PEM; ``tcb_info`` and ``qe_identity`` are the exact
#: JSON text Intel signed.
FIELDS = (
    "pck_crl_issuer_chain", "root_ca_crl", "pck_crl",
    "tcb_info_issuer_chain", "tcb_info", "tcb_info_signature",
    "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature",
)
_HEX_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")
_CHAIN_FIELDS = {
    "pck_crl_issuer_chain": "PCK CRL issuer chain",
    "tcb_info_issuer_chain": "TCB info issuer chain",
    "qe_identity_issuer_chain": "QE identity issuer chain",
}

# Intel SGX Root CA: the trust anchor of every DCAP quote and of all collateral (SGX and TDX).
# A public certificate (also served at https://certificates.trustedservices.intel.com/);
# pinned here by its SHA-256 DER fingerprint, which the module checks on import.
_INTEL_SGX_ROOT_CA_PEM = b"""-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
_INTEL_SGX_ROOT_CA = x509.load_pem_x509_certificate(_INTEL_SGX_ROOT_CA_PEM)
INTEL_SGX_ROOT_CA_DER = crypto.certificate_der(_INTEL_SGX_ROOT_CA)
if hashlib.sha256(INTEL_SGX_ROOT_CA_DER).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:
    raise ImportError("embedded Intel SGX Root CA does not match its pinned fingerprint")

_TCB_INFO_ID = {Tee.SGX: "SGX", Tee.TDX: "TDX"}
_QE_IDENTITY_ID = {Tee.SGX: "QE", Tee.TDX: "TD_QE"}


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ValidityItem:
    """One dated item of the collateral, in Unix seconds.

    Usable from ``not_before`` (inclusive) to ``not_after``: inclusive for TCB info, QE
    identity and certificates, exclusive for CRLs (a CRL is stale at its nextUpdate) —
    exactly as dcap-qvl decides, so this check and the library never disagree.
    """

    name: str
    not_before: int
    not_after: int
    start_label: str = "issued"
    end_label: str = "nextUpdate"
    end_inclusive: bool = True

    @property
    def last_valid(self) -> int:
        """The last second at which the item may be used."""
        return self.not_after if self.end_inclusive else self.not_after - 1


@dataclass(frozen=True)
class Collateral:
    """Validated collateral for one quote family, in dcap-qvl's JSON form.

    Construct it with :func:`parse`; :meth:`to_dcap` gives the library object and
    :meth:`check_valid_at` the expiry check.
    """

    fields: Mapping[str, str]
    tcb_info: Mapping[str, Any]
    qe_identity: Mapping[str, Any]
    items: tuple[ValidityItem, ...]
    pck_crl_issuer_cn: str
    #: ``tcbEvaluationDataNumber`` of the TCB info and of the QE identity (None: absent).
    tcb_evaluation_data_numbers: Mapping[str, int | None] = field(
        default_factory=lambda: MappingProxyType({}))

    def check_tcb_evaluation_data_number(self, minimum: int | None) -> None:
        """Raise :class:`CollateralError` unless both the TCB info and the QE identity come
        from TCB recovery ``minimum`` or later (Intel's ``tcbEvaluationDataNumber``)."""
        if minimum is None:
            return
        low = [f"{what} has {'none' if number is None else number}"
               for what, number in self.tcb_evaluation_data_numbers.items()
               if number is None or number < minimum]
        if low or not self.tcb_evaluation_data_numbers:
            raise CollateralError(
                f"collateral is older than the TCB recovery this verifier requires: "
                f"tcbEvaluationDataNumber must be >= {minimum}, but "
                f"{'; '.join(low) or 'it is absent'}")

    @property
    def tcb_info_id(self) -> str:
        return str(self.tcb_info.get("id", ""))

    @property
    def fmspc(self) -> str:
        return str(self.tcb_info.get("fmspc", "")).upper()

    @property
    def not_before(self) -> int:
        """Earliest time at which *every* item is valid."""
        return max(i.not_before for i in self.items)

    @property
    def not_after(self) -> int:
        """Last second at which every item is still valid (about the earliest nextUpdate)."""
        return min(i.last_valid for i in self.items)

    def valid_at(self, at: int) -> bool:
        return self.not_before <= at <= self.not_after

    def check_valid_at(self, at: int) -> None:
        """Raise :class:`CollateralError` naming every item not valid at ``at``."""
        expired = [i for i in self.items if at > i.last_valid]
        early = [i for i in self.items if at < i.not_before]
        if expired:
            expired.sort(key=lambda i: i.not_after)
            names = "; ".join(f"{i.name} expired at {_iso(i.not_after)} ({i.end_label})"
                              for i in expired)
            raise CollateralError(
                f"collateral has expired at verification time {_iso(at)}: {names}")
        if early:
            early.sort(key=lambda i: i.not_before, reverse=True)
            names = "; ".join(f"{i.name} is valid only from {_iso(i.not_before)} "
                              f"({i.start_label})" for i in early)
            raise CollateralError(
                f"collateral is not yet valid at verification time {_iso(at)}: {names}")

    def check_for(self, key: CollateralKey) -> None:
        """Raise :class:`CollateralError` unless this collateral is for ``key``'s platform."""
        want_tcb = _TCB_INFO_ID[key.tee]
        if self.tcb_info_id != want_tcb:
            raise CollateralError(
                f"collateral mismatch: TCB info is for {self.tcb_info_id or '?'} but the quote "
                f"is a{'n' if key.tee is Tee.SGX else ''} {want_tcb} quote")
        if self.fmspc != key.fmspc:
            raise CollateralError(
                f"collateral mismatch: TCB info is for FMSPC {self.fmspc or '?'} but the "
                f"quote's PCK certificate has FMSPC {key.fmspc}")
        want_qe = _QE_IDENTITY_ID[key.tee]
        got_qe = str(self.qe_identity.get("id", ""))
        if got_qe != want_qe:
            raise CollateralError(
                f"collateral mismatch: QE identity is {got_qe or '?'} but a {key.tee.value} "
                f"quote needs the {want_qe} identity")
        want_cn = _CA_ISSUER_CN[key.ca]
        if self.pck_crl_issuer_cn != want_cn:
            raise CollateralError(
                f"collateral mismatch: PCK CRL is issued by {self.pck_crl_issuer_cn!r} but the "
                f"quote's PCK certificate comes from {want_cn!r}")

    def to_json_bytes(self) -> bytes:
        return json.dumps({k: self.fields[k] for k in FIELDS}, indent=1).encode()

    def to_dcap(self) -> dcap_qvl.QuoteCollateralV3:
        import dcap_qvl

        try:
            return dcap_qvl.QuoteCollateralV3.from_json(
                json.dumps({k: self.fields[k] for k in FIELDS}))
        except Exception as exc:  # the library reports every problem as ValueError
            raise CollateralError(f"collateral rejected by dcap-qvl: {exc}") from None


def _parse_time(value: Any, what: str) -> int:
    if not isinstance(value, str):
        raise CollateralError(f"collateral parse error: {what} is missing or not a string")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise CollateralError(
            f"collateral parse error: {what} {value!r} is not an RFC 3339 time") from None
    if dt.tzinfo is None:
        raise CollateralError(f"collateral parse error: {what} {value!r} has no time zone")
    return int(dt.timestamp())


def _crl_item(der: bytes, name: str) -> tuple[ValidityItem, x509.CertificateRevocationList, str]:
    # cryptography parses a CRL's fields lazily: a malformed issuer or date raises ValueError
    # only when read, so every field used later is read here, inside the try.
    try:
        crl = x509.load_der_x509_crl(der)
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
        cns = crl.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        issuer_cn = str(cns[0].value) if cns else ""
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise CollateralError(f"collateral parse error: {name} is not a DER CRL ({exc})") \
            from None
    if next_update is None:
        raise CollateralError(f"collateral parse error: {name} has no nextUpdate")
    item = ValidityItem(name, int(this_update.timestamp()), int(next_update.timestamp()),
                        "thisUpdate", "nextUpdate", end_inclusive=False)
    return item, crl, issuer_cn


def _chain_items(pem: str, name: str) -> list[ValidityItem]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except (ValueError, x509.InvalidVersion) as exc:
        raise CollateralError(f"collateral parse error: {name} is not a PEM certificate "
                              f"chain ({exc})") from None
    if crypto.certificate_der(certs[-1]) != INTEL_SGX_ROOT_CA_DER:
        raise CollateralError(f"collateral chain error: {name} does not end in the pinned "
                              "Intel SGX Root CA")
    items = []
    for index, cert in enumerate(certs, 1):
        try:  # lazily parsed: a malformed subject or validity raises only when read
            cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            cn = str(cns[0].value) if cns else cert.subject.rfc4514_string()
            not_before = int(cert.not_valid_before_utc.timestamp())
            not_after = int(cert.not_valid_after_utc.timestamp())
        except ValueError as exc:
            raise CollateralError(f"collateral parse error: {name} certificate {index} is "
                                  f"malformed ({exc})") from None
        items.append(ValidityItem(f"{name} certificate {cn!r}", not_before, not_after,
                                  "notBefore", "notAfter"))
    return items


def parse(data: bytes | str | Mapping[str, Any]) -> Collateral:
    """Parse and structurally validate collateral in dcap-qvl's JSON form.

    Checks that every field is present and well-formed (hex, PEM, DER CRLs, JSON), that
    every issuer chain ends in the pinned Intel SGX Root CA, and records each item's
    validity window.  Signatures are checked later, by dcap-qvl, on every verification.
    """
    if isinstance(data, bytes | str):
        return _parse_cached(data)
    return _parse(data)


@functools.lru_cache(maxsize=64)
def _parse_cached(data: bytes | str) -> Collateral:
    # Parsing costs more than verifying; a keyserver sees the same few collateral sets.
    return _parse(data)


def _parse(data: bytes | str | Mapping[str, Any]) -> Collateral:
    try:
        return _parse_fields(data)
    except CollateralError:
        raise
    except Exception as exc:  # fail closed: every parse failure is a CollateralError
        log.warning("unexpected %s parsing DCAP collateral: %s", type(exc).__name__, exc)
        raise CollateralError(f"collateral parse error: {type(exc).__name__}: {exc}") \
            from None


def _parse_fields(data: bytes | str | Mapping[str, Any]) -> Collateral:
    if isinstance(data, Mapping):
        obj: Any = dict(data)
    else:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CollateralError(f"collateral parse error: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CollateralError("collateral parse error: expected a JSON object")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise CollateralError(f"collateral parse error: missing field(s) {', '.join(missing)}")
    fields: dict[str, str] = {}
    for k in FIELDS:
        v = obj[k]
        if not isinstance(v, str) or not v:
            raise CollateralError(f"collateral parse error: {k} must be a non-empty string")
        fields[k] = v
    raw: dict[str, bytes] = {}
    for k in _HEX_FIELDS:
        try:
            raw[k] = bytes.fromhex(fields[k])
        except ValueError:
            raise CollateralError(f"collateral parse error: {k} is not hex") from None
    try:
        tcb_info = json.loads(fields["tcb_info"])
        qe_identity = json.loads(fields["qe_identity"])
    except ValueError as exc:
        raise CollateralError(f"collateral parse error: TCB info or QE identity is not "
                              f"JSON ({exc})") from None
    if not isinstance(tcb_info, dict) or not isinstance(qe_identity, dict):
        raise CollateralError("collateral parse error: TCB info and QE identity must be "
                              "JSON objects")
    items = [
        ValidityItem("TCB info", _parse_time(tcb_info.get("issueDate"), "TCB info issueDate"),
                     _parse_time(tcb_info.get("nextUpdate"), "TCB info nextUpdate")),
        ValidityItem("QE identity",
                     _parse_time(qe_identity.get("issueDate"), "QE identity issueDate"),
                     _parse_time(qe_identity.get("nextUpdate"), "QE identity nextUpdate")),
    ]
    pck_item, _, issuer_cn = _crl_item(raw["pck_crl"], "PCK CRL")
    root_item, _, _ = _crl_item(raw["root_ca_crl"], "root CA CRL")
    items += [pck_item, root_item]
    for k, name in _CHAIN_FIELDS.items():
        items += _chain_items(fields[k], name)
    numbers = {}
    for what, doc in (("TCB info", tcb_info), ("QE identity", qe_identity)):
        number = doc.get("tcbEvaluationDataNumber")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)
                                   or number < 0):
            raise CollateralError(f"collateral parse error: {what} tcbEvaluationDataNumber "
                                  f"{number!r} is not a non-negative integer")
        numbers[what] = number
    return Collateral(fields=MappingProxyType(fields), tcb_info=tcb_info, qe_identity=qe_identity,
                      items=tuple(items), pck_crl_issuer_cn=issuer_cn,
                      tcb_evaluation_data_numbers=MappingProxyType(numbers))


def load_file(path: str | os.PathLike[str]) -> Collateral:
    """Read collateral from a JSON file in dcap-qvl's form (e.g. saved from a PCCS)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CollateralError(f"cannot read collateral file {p}: {exc.strerror or exc}") \
            from None
    try:
        return parse(data)
    except CollateralError as exc:
        raise CollateralError(f"collateral file {p}: {exc}") from None
