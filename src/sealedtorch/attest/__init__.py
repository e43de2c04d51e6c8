"""Attestation: one front door for every TEE.

Services call :func:`verify` (evidence → claims) and :func:`sealedtorch.attest.policy.decide`
(claims → decision); they never import a particular verifier.  Verifiers are imported lazily
so a sim-only deployment does not load the DCAP library.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AttestationError
from .evidence import Claims, Evidence, SgxClaims, SimClaims, SnpClaims, TdxClaims, Tee

__all__ = [
    "Claims", "Evidence", "SgxClaims", "SimClaims", "SnpClaims", "TdxClaims", "Tee",
    "VerifierConfig", "verify",
]


@dataclass(frozen=True)
class VerifierConfig:
    """What verifiers may rely on besides the evidence itself.

    - ``sim_platform_keys``: raw Ed25519 public keys of sim platforms this relying party has
      chosen to trust (empty: sim evidence is refused).
    - ``pccs_url``: a PCCS / Intel-PCS-compatible base URL for SGX/TDX collateral when the
      evidence carries none.  ``kds_url``: AMD KDS base URL for VCEKs.
    - ``cache_dir``: on-disk cache for fetched collateral, VCEKs and AMD CRLs.
    - ``prefer_verifier_collateral``: for SGX/TDX, use the verifier's own (cached or
      PCCS-fetched) collateral when it has one, and the attester's only otherwise; False:
      the attester's collateral is used whenever it sends one.
    - ``min_tcb_evaluation_data_number``: refuse DCAP collateral from before this TCB
      recovery (Intel's ``tcbEvaluationDataNumber`` in TCB info and QE identity).
    - ``fetch_amd_crl``: fetch AMD's CRL from the KDS when none is cached (the keyserver
      does); otherwise only a cached CRL is checked and the claims say it was unavailable.
    """

    sim_platform_keys: tuple[bytes, ...] = ()
    pccs_url: str | None = None
    kds_url: str | None = None
    cache_dir: Path | None = None
    http_timeout: float = field(default=10.0)
    prefer_verifier_collateral: bool = True
    min_tcb_evaluation_data_number: int | None = None
    fetch_amd_crl: bool = False


_MODULES = {Tee.SGX: "dcap", Tee.TDX: "dcap", Tee.SNP: "snp", Tee.SIM: "sim"}


def verify(evidence: Evidence, *, at: float | None = None,
           config: VerifierConfig | None = None) -> Claims:
    """Appraise ``evidence`` at Unix time ``at`` (default: now) and return its claims.

    Raises :class:`~sealedtorch.errors.AttestationError` (or a subclass) naming what failed.
    Does not apply any policy: TCB status, debug mode and measurements are the policy's.
    """
    try:
        tee = Tee(evidence.tee)
    except ValueError:
        raise AttestationError(f"unknown TEE type {evidence.tee!r}") from None
    module = importlib.import_module(f".{_MODULES[tee]}", __name__)
    when = int(time.time() if at is None else at)
    return module.verify(evidence, at=when, config=config or VerifierConfig())
