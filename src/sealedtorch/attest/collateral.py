"""Intel DCAP collateral: what it is, where it comes from, and how long it may be used.

A DCAP quote is only as good as the *collateral* it is appraised with: the TCB info for the
platform's FMSPC, the quoting enclave's identity, the PCK and root-CA revocation lists, and
the issuer chains that sign them.  Collateral is signed by Intel, but it is also *dated*:
every item carries an issue date and a ``nextUpdate`` after which it must not be used.

This module holds the collateral data model (:class:`Collateral`, in dcap-qvl's JSON form),
the validity window check that names the item that expired, a small client for the PCCS v4
API (Intel PCS-compatible), and an on-disk cache keyed by (TEE, FMSPC, CA) so that a
keyserver appraises quotes without a network round trip.

Collateral sources, in order (see :func:`obtain`):

1. the evidence itself (``Evidence.collateral``; handled by :mod:`.dcap`);
2. a fresh cache entry in ``VerifierConfig.cache_dir`` (``<cache_dir>/dcap/<key>.json``);
3. ``VerifierConfig.pccs_url``: an ``http(s)://`` PCCS or Intel PCS base URL, or a
   ``file://`` path to one collateral JSON file or to a directory of ``<key>.json`` files;
4. a stale cache entry that is still valid at the verification time, when the source above
   cannot be reached.

Every time decision uses the verification time ``at`` (the wall clock in production), so a
verifier can be tested at any instant.  Every failure raises
:class:`~sealedtorch.errors.CollateralError`, whose message names what is missing, which
source failed, or which item expired and when.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..atomicfile import write_atomically
from ..errors import CollateralError
from .evidence import Tee

if TYPE_CHECKING:
    import dcap_qvl

    from . import VerifierConfig

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_REFRESH_INTERVAL",
    "FIELDS",
    "INTEL_SGX_ROOT_CA_DER",
    "INTEL_SGX_ROOT_CA_SHA256",
    "CacheEntry",
    "Collateral",
    "CollateralCache",
    "CollateralKey",
    "PccsClient",
    "ValidityItem",
    "load_file",
    "obtain",
    "parse",
]

log = logging.getLogger(__name__)

#: Cache entries older than this (by the verification clock) are refreshed from the source,
#: even when Intel's ``nextUpdate`` is still ahead.  Intel reissues TCB info and CRLs well
#: before ``nextUpdate`` when it publishes a TCB recovery, so a day-old copy is re-checked.
DEFAULT_REFRESH_INTERVAL = 24 * 3600

CACHE_FORMAT = "sealedtorch.dcap-collateral/1"

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
INTEL_SGX_ROOT_CA_DER = _INTEL_SGX_ROOT_CA.public_bytes(serialization.Encoding.DER)
if hashlib.sha256(INTEL_SGX_ROOT_CA_DER).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:
    raise ImportError("embedded Intel SGX Root CA does not match its pinned fingerprint")

_CA_ISSUER_CN = {"processor": "Intel SGX PCK Processor CA", "platform": "Intel SGX PCK Platform CA"}
_TCB_INFO_ID = {Tee.SGX: "SGX", Tee.TDX: "TDX"}
_QE_IDENTITY_ID = {Tee.SGX: "QE", Tee.TDX: "TD_QE"}


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the key -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CollateralKey:
    """What a piece of collateral is for: TEE, platform FMSPC and the PCK issuing CA.

    TCB info depends on (TEE, FMSPC), the QE identity on the TEE, the PCK CRL on the CA.
    """

    tee: Tee
    fmspc: str
    ca: str

    def __post_init__(self) -> None:
        tee = Tee(self.tee)
        if tee not in (Tee.SGX, Tee.TDX):
            raise CollateralError(f"DCAP collateral exists only for sgx and tdx, not {tee}")
        fmspc = str(self.fmspc).upper()
        if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
            raise CollateralError(f"FMSPC must be 12 hex digits, got {self.fmspc!r}")
        ca = str(self.ca).lower()
        if ca not in _CA_ISSUER_CN:
            raise CollateralError(f"PCK CA must be 'processor' or 'platform', got {self.ca!r}")
        object.__setattr__(self, "tee", tee)
        object.__setattr__(self, "fmspc", fmspc)
        object.__setattr__(self, "ca", ca)

    @property
    def filename(self) -> str:
        return f"{self.tee.value}-{self.fmspc}-{self.ca}.json"

    def __str__(self) -> str:
        return f"{self.tee.value} FMSPC {self.fmspc} ({self.ca} CA)"


# --- the data model ----------------------------------------------------------------------

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
    if certs[-1].public_bytes(serialization.Encoding.DER) != INTEL_SGX_ROOT_CA_DER:
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


# --- PCCS / Intel PCS client -------------------------------------------------------------

def _top_level_raw(body: str, what: str) -> dict[str, str]:
    """The exact text of each top-level value of a JSON object.

    Intel signs the bytes of ``tcbInfo`` / ``enclaveIdentity`` exactly as served, so they
    must be cut out of the response, never re-serialised.
    """
    dec = json.JSONDecoder()
    out: dict[str, str] = {}
    n = len(body)

    def skip(i: int) -> int:
        while i < n and body[i] in " \t\r\n":
            i += 1
        return i

    try:
        i = skip(0)
        if i >= n or body[i] != "{":
            raise ValueError("expected '{'")
        i = skip(i + 1)
        if i < n and body[i] == "}":
            return out
        while True:
            key, i = dec.raw_decode(body, i)
            if not isinstance(key, str):
                raise ValueError("object key is not a string")
            i = skip(i)
            if i >= n or body[i] != ":":
                raise ValueError("expected ':'")
            start = skip(i + 1)
            _, end = dec.raw_decode(body, start)
            out[key] = body[start:end]
            i = skip(end)
            if i < n and body[i] == ",":
                i = skip(i + 1)
                continue
            if i < n and body[i] == "}":
                break
            raise ValueError("expected ',' or '}'")
        if skip(i + 1) != n:
            raise ValueError("trailing data after the object")
    except ValueError as exc:
        raise CollateralError(f"PCCS returned malformed {what}: {exc}") from None
    return out


def _crl_der(body: bytes, what: str) -> bytes:
    """Accept a CRL as DER, PEM or hex text (PCCS serves the root CA CRL as hex)."""
    data = body.strip()
    if data[:1] == b"\x30":
        return body
    if data.startswith(b"-----BEGIN X509 CRL-----"):
        try:
            return x509.load_pem_x509_crl(data).public_bytes(serialization.Encoding.DER)
        except ValueError as exc:
            raise CollateralError(f"PCCS returned a malformed {what}: {exc}") from None
    try:
        return binascii.unhexlify(data)
    except (binascii.Error, ValueError):
        raise CollateralError(f"PCCS returned a {what} that is neither DER, PEM nor hex") \
            from None


class PccsClient:
    """A minimal client of the PCCS v4 API (also Intel PCS, ``api.trustedservices.intel.com``).

    ``base_url`` is the service root; a trailing ``/sgx/certification/v4`` or
    ``/tdx/certification/v4`` is accepted and removed.  Intel PCS has no ``rootcacrl``
    endpoint; the root CA CRL is then fetched from ``root_ca_crl_url`` (default: the CRL
    distribution point of the pinned Intel SGX Root CA).
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0,
                 root_ca_crl_url: str | None = None,
                 client: httpx.Client | None = None) -> None:
        base = base_url.strip().rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            base = base.removesuffix(suffix)
        self.base_url = base
        self.timeout = timeout
        self.root_ca_crl_url = root_ca_crl_url or _root_crl_distribution_point()
        self._client = client

    def _url(self, tee: str, path: str) -> str:
        return f"{self.base_url}/{tee}/certification/v4/{path}"

    def _get(self, client: httpx.Client, url: str, what: str) -> httpx.Response:
        try:
            resp = client.get(url)
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise CollateralError(f"cannot fetch {what} from {url}: "
                                  f"{type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            hint = " (not known to this PCCS)" if resp.status_code == 404 else ""
            raise CollateralError(f"cannot fetch {what} from {url}: HTTP "
                                  f"{resp.status_code}{hint}")
        return resp

    @staticmethod
    def _chain(resp: httpx.Response, names: tuple[str, ...], what: str) -> str:
        for name in names:
            value = resp.headers.get(name)
            if value:
                return urllib.parse.unquote(value)
        raise CollateralError(f"PCCS response for {what} lacks the issuer chain header "
                              f"({' or '.join(names)})")

    def _signed_json(self, resp: httpx.Response, member: str, what: str) -> tuple[str, str]:
        parts = _top_level_raw(resp.text, what)
        if member not in parts or "signature" not in parts:
            raise CollateralError(f"PCCS returned malformed {what}: needs '{member}' and "
                                  "'signature'")
        try:
            signature = json.loads(parts["signature"])
            bytes.fromhex(signature)
        except (ValueError, TypeError):
            raise CollateralError(f"PCCS returned malformed {what}: signature is not a hex "
                                  "string") from None
        return parts[member], signature

    def fetch(self, key: CollateralKey) -> Collateral:
        """Fetch TCB info, QE identity, PCK CRL and root CA CRL for ``key``."""
        if self._client is not None:
            return self._fetch(self._client, key)
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            return self._fetch(client, key)

    def _fetch(self, client: httpx.Client, key: CollateralKey) -> Collateral:
        tee = key.tee.value
        resp = self._get(client, self._url("sgx", f"pckcrl?ca={key.ca}&encoding=der"),
                         "PCK CRL")
        pck_crl = _crl_der(resp.content, "PCK CRL")
        pck_chain = self._chain(resp, ("SGX-PCK-CRL-Issuer-Chain",), "PCK CRL")

        resp = self._get(client, self._url(tee, f"tcb?fmspc={key.fmspc}"), "TCB info")
        tcb_chain = self._chain(resp, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"),
                                "TCB info")
        tcb_info, tcb_sig = self._signed_json(resp, "tcbInfo", "TCB info")

        resp = self._get(client, self._url(tee, "qe/identity"), "QE identity")
        qe_chain = self._chain(resp, ("SGX-Enclave-Identity-Issuer-Chain",
                                      "Enclave-Identity-Issuer-Chain"), "QE identity")
        qe_identity, qe_sig = self._signed_json(resp, "enclaveIdentity", "QE identity")

        root_crl = self._root_ca_crl(client)
        collateral = parse({
            "pck_crl_issuer_chain": pck_chain, "root_ca_crl": root_crl.hex(),
            "pck_crl": pck_crl.hex(), "tcb_info_issuer_chain": tcb_chain,
            "tcb_info": tcb_info, "tcb_info_signature": tcb_sig,
            "qe_identity_issuer_chain": qe_chain, "qe_identity": qe_identity,
            "qe_identity_signature": qe_sig,
        })
        collateral.check_for(key)
        return collateral

    def _root_ca_crl(self, client: httpx.Client) -> bytes:
        url = self._url("sgx", "rootcacrl")
        try:
            resp = client.get(url)
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise CollateralError(f"cannot fetch root CA CRL from {url}: "
                                  f"{type(exc).__name__}: {exc}") from None
        if resp.status_code == 200:
            return _crl_der(resp.content, "root CA CRL")
        if resp.status_code != 404:
            raise CollateralError(f"cannot fetch root CA CRL from {url}: HTTP "
                                  f"{resp.status_code}")
        # Intel PCS has no rootcacrl endpoint: use the root's CRL distribution point.
        resp = self._get(client, self.root_ca_crl_url, "root CA CRL")
        return _crl_der(resp.content, "root CA CRL")


def _root_crl_distribution_point() -> str:
    ext = _INTEL_SGX_ROOT_CA.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    for point in ext.value:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    raise CollateralError("Intel SGX Root CA has no CRL distribution point")  # pragma: no cover


# --- on-disk cache -----------------------------------------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    key: CollateralKey
    collateral: Collateral
    fetched_at: int
    source: str

    def fresh(self, at: int, refresh_interval: int) -> bool:
        """Usable without asking the source again: valid now and recently fetched."""
        return self.collateral.valid_at(at) and 0 <= at - self.fetched_at < refresh_interval


class CollateralCache:
    """Collateral files under ``<cache_dir>/dcap/``, one per :class:`CollateralKey`.

    Files are JSON, written atomically (temporary file in the same directory, fsync,
    rename), so concurrent readers see either the old or the new entry, never half a file.
    An unreadable or mismatched entry is treated as absent (and logged).
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(cache_dir) / "dcap"

    def path(self, key: CollateralKey) -> Path:
        return self.directory / key.filename

    def get(self, key: CollateralKey) -> CacheEntry | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring unreadable DCAP collateral cache entry %s: %s", path, exc)
            return None
        try:
            obj = json.loads(data)
            if obj.get("format") != CACHE_FORMAT:
                raise CollateralError(f"unknown cache format {obj.get('format')!r}")
            entry_key = CollateralKey(obj["tee"], obj["fmspc"], obj["ca"])
            if entry_key != key:
                raise CollateralError(f"entry is for {entry_key}, not {key}")
            collateral = parse(obj["collateral"])
            collateral.check_for(key)
            fetched_at = obj["fetched_at"]
            if not isinstance(fetched_at, int):
                raise CollateralError("fetched_at is not an integer")
            return CacheEntry(key, collateral, fetched_at, str(obj.get("source", "")))
        except (CollateralError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring corrupt DCAP collateral cache entry %s: %s", path, exc)
            return None

    def put(self, key: CollateralKey, collateral: Collateral, *, fetched_at: int,
            source: str) -> Path:
        path = self.path(key)
        body = json.dumps({
            "format": CACHE_FORMAT, "tee": key.tee.value, "fmspc": key.fmspc, "ca": key.ca,
            "fetched_at": int(fetched_at), "source": source,
            "collateral": {k: collateral.fields[k] for k in FIELDS},
        }, indent=1).encode()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(path, body)
        except OSError as exc:
            # A cache that cannot be written costs a round trip next time, nothing more.
            log.warning("cannot write DCAP collateral cache entry %s: %s", path, exc)
        return path


# --- where collateral comes from ---------------------------------------------------------

_locks_guard = threading.Lock()
_locks: dict[CollateralKey, threading.Lock] = {}


def _lock_for(key: CollateralKey) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _from_file_source(url: str, key: CollateralKey) -> Collateral:
    parsed = urllib.parse.urlparse(url)
    path = Path(urllib.parse.unquote(parsed.path))
    if path.is_dir():
        path = path / key.filename
    collateral = load_file(path)
    try:
        collateral.check_for(key)
    except CollateralError as exc:
        raise CollateralError(f"collateral file {path}: {exc}") from None
    return collateral


def _fetch(url: str, key: CollateralKey, config: VerifierConfig) -> Collateral:
    if url.startswith("file:"):
        return _from_file_source(url, key)
    if not url.startswith(("http://", "https://")):
        raise CollateralError(f"the PCCS URL (--pccs-url, pccs_url) must be an http(s):// or "
                              f"file: URL, got {url!r}")
    return PccsClient(url, timeout=config.http_timeout).fetch(key)


def obtain(key: CollateralKey, *, at: int, config: VerifierConfig,
           refresh_interval: int = DEFAULT_REFRESH_INTERVAL) -> Collateral:
    """Collateral for ``key`` at verification time ``at``, from cache or source.

    - A cache entry valid at ``at`` and fetched less than ``refresh_interval`` seconds ago
      is used as is (no network).
    - Otherwise the source (``config.pccs_url``) is asked; a usable answer is cached.
    - If the source cannot be reached or answers badly, a cache entry that is still valid at
      ``at`` is used (logged); one that has expired raises :class:`CollateralError` naming
      the expired item and the source's failure.
    The returned collateral may still be outside its window at ``at`` (e.g. the source only
    has expired collateral); the verifier's window check names the item in that case.
    """
    cache = CollateralCache(config.cache_dir) if config.cache_dir is not None else None
    url = (config.pccs_url or "").strip() or None
    if cache is None and url is None:
        raise CollateralError(
            f"no collateral for {key}: the evidence carries none and no collateral source "
            "is configured (pass --pccs-url URL and/or --cache-dir DIR; on the keyserver: "
            "pccs_url in keyserver.json)")
    with _lock_for(key):
        entry = cache.get(key) if cache is not None else None
        if entry is not None and entry.fresh(at, refresh_interval):
            return entry.collateral
        if url is None:
            if entry is not None and entry.collateral.valid_at(at):
                return entry.collateral  # stale by age, but nothing to refresh from
            return _no_source(key, entry, at, "no pccs_url is configured to refresh it")
        try:
            fetched = _fetch(url, key, config)
        except CollateralError as exc:
            if entry is not None and entry.collateral.valid_at(at):
                log.warning("using cached DCAP collateral for %s (fetched %s): refresh "
                            "failed: %s", key, _iso(entry.fetched_at), exc)
                return entry.collateral
            if entry is None:
                cached = "nothing cached and " if cache is not None else ""
                raise CollateralError(f"no collateral for {key}: {cached}fetching it "
                                      f"failed: {exc}") from None
            return _no_source(key, entry, at, f"refresh failed: {exc}")
        if entry is not None and entry.collateral.valid_at(at) and not fetched.valid_at(at):
            log.warning("source %s served DCAP collateral for %s that is not valid at %s; "
                        "keeping the cached copy", url, key, _iso(at))
            return entry.collateral
        if cache is not None and not url.startswith("file:"):
            cache.put(key, fetched, fetched_at=at, source=url)
        return fetched


def _no_source(key: CollateralKey, entry: CacheEntry | None, at: int, why: str) -> Collateral:
    if entry is None:
        raise CollateralError(f"no collateral for {key}: nothing cached and {why}")
    try:
        entry.collateral.check_valid_at(at)
    except CollateralError as exc:
        raise CollateralError(f"cached {exc} [{key}]; {why}") from None
    raise CollateralError(f"cached collateral for {key} is unusable; {why}")  # pragma: no cover
