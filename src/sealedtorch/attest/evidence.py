"""The attestation data model (RFC 9334 vocabulary).

*Evidence* is what an attester produces inside a TEE; a *verifier* appraises it and yields
*Claims*, normalised per TEE so that a policy (the relying party's reference values) can be
matched field by field without knowing quote layouts.  Claims are plain data: they go into
attestation-result tokens and audit records as JSON via :meth:`Claims.to_json`.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Tee(StrEnum):
    SGX = "sgx"
    TDX = "tdx"
    SNP = "snp"
    SIM = "sim"


@dataclass(frozen=True)
class Evidence:
    """Raw evidence plus whatever the verifier needs beside it.

    - ``sgx``/``tdx``: ``data`` is the DCAP quote; ``collateral`` is dcap-qvl's collateral
      JSON (optional: a verifier may fetch and cache it from a PCCS).
    - ``snp``: ``data`` is the 1184-byte attestation report; ``certificates`` holds the VCEK
      (or VLEK) and optionally the ASK/ARK chain, as PEM/DER or an SNP certificate table
      (configfs-tsm ``auxblob``).
    - ``sim``: ``data`` is the signed sim statement.
    """

    tee: Tee
    data: bytes = field(repr=False)
    collateral: bytes | None = field(default=None, repr=False)
    certificates: bytes | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tee": self.tee.value, "evidence": _b64(self.data)}
        if self.collateral is not None:
            out["collateral"] = _b64(self.collateral)
        if self.certificates is not None:
            out["certificates"] = _b64(self.certificates)
        return out


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, StrEnum):
        return value.value
    return value


@dataclass(frozen=True, kw_only=True)
class Claims:
    """What a verifier vouches for.  Subclasses add the TEE-specific measurements.

    ``tcb_status`` is the platform's TCB status as the vendor reports it (``UpToDate``,
    ``OutOfDate``, ``ConfigurationAndSWHardeningNeeded``, ...) or ``None`` where the TEE
    has no such notion; enforcing it is the policy's job, not the verifier's.
    ``insecure`` is true for evidence that proves nothing about hardware (the sim TEE).
    """

    tee: Tee
    report_data: bytes
    debug: bool
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    insecure: bool = False

    def to_json(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class SgxClaims(Claims):
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    attributes: bytes
    cpu_svn: bytes = b""
    fmspc: str | None = None
    #: Key Separation and Sharing (KSS) identity; empty when the verifier did not report it.
    isv_ext_prod_id: bytes = b""
    isv_family_id: bytes = b""
    config_id: bytes = b""
    config_svn: int | None = None


@dataclass(frozen=True, kw_only=True)
class TdxClaims(Claims):
    mr_td: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    mr_seam: bytes
    td_attributes: bytes
    tee_tcb_svn: bytes
    fmspc: str | None = None
    #: XFAM (extended features the TD may use, 8 bytes); empty when not reported.
    xfam: bytes = b""


@dataclass(frozen=True, kw_only=True)
class SnpClaims(Claims):
    version: int
    guest_svn: int
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    policy: int
    reported_tcb: dict[str, int]
    committed_tcb: dict[str, int]
    chip_id: bytes
    vmpl: int
    signing_key: str  # "vcek" or "vlek"
    #: PLATFORM_INFO (bit 0 SMT_EN, 1 TSME_EN, ...); None when not reported.
    platform_info: int | None = None
    #: AMD CRL check of the certificate chain: "good" (checked, nothing revoked) or
    #: "unavailable: <why>" (no CRL could be had; the policy decides whether that is enough).
    crl_status: str | None = None


@dataclass(frozen=True, kw_only=True)
class SimClaims(Claims):
    measurement: bytes
    svn: int
    platform_key: bytes  # raw Ed25519 public key of the sim platform that signed
