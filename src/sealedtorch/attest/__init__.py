"""Attestation: one front door for every TEE.

Services call :func:`appraise` (evidence → claims bound to one challenge and one key) and
:func:`sealedtorch.attest.policy.decide` (claims → decision).  They never import a
particular verifier and never check the binding themselves:

- :func:`appraise` = :func:`verify` + :func:`.binding.check_claims`.  It returns claims only
  when the evidence verified *and* its report_data binds ``nonce`` and ``public_key`` under
  ``domain``; otherwise it raises :class:`~sealedtorch.errors.AttestationError` (or a
  subclass: :class:`~sealedtorch.errors.BindingError` carries the verified claims, for the
  audit record).
- :func:`verify` appraises evidence without a binding (for callers that bind something else,
  or nothing: tests, ``sealedtorch attest verify``).
- A :class:`Verifier` is one TEE family's appraisal (evidence → claims, no policy, no
  binding).  The implementations are the modules :mod:`.dcap` (SGX, TDX), :mod:`.snp` and
  :mod:`.sim`, chosen by ``evidence.tee`` in :func:`verifier_for` and imported lazily, so a
  sim-only deployment does not load the DCAP library.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import AttestationError
from . import binding
from .evidence import Claims, Evidence, SgxClaims, SimClaims, SnpClaims, TdxClaims, Tee

__all__ = [
    "Claims", "Evidence", "SgxClaims", "SimClaims", "SnpClaims", "TdxClaims", "Tee",
    "Verifier", "VerifierConfig", "appraise", "verifier_for", "verify",
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


class Verifier(Protocol):
    """One TEE family's appraisal: evidence → claims, or an error naming what failed.

    A verifier checks signatures, certificate chains and collateral at Unix time ``at``; it
    applies no policy (TCB status, debug mode and measurements are the policy's) and does not
    check the binding (:func:`appraise` does, the same way for every TEE).  Implemented by
    the modules :mod:`.dcap`, :mod:`.snp` and :mod:`.sim` (a module is a protocol
    implementation when its functions match)."""

    def verify(self, evidence: Evidence, *, at: int, config: VerifierConfig) -> Claims:
        ...


def verifier_for(tee: Tee | str) -> Verifier:
    """The verifier for evidence labelled ``tee``, imported on first use."""
    try:
        kind = Tee(tee)
    except ValueError:
        raise AttestationError(f"unknown TEE type {tee!r}") from None
    if kind is Tee.SIM:
        from . import sim
        return sim
    if kind is Tee.SNP:
        from . import snp
        return snp
    from . import dcap  # SGX and TDX: DCAP quotes
    return dcap


def verify(evidence: Evidence, *, at: float | None = None,
           config: VerifierConfig | None = None) -> Claims:
    """Appraise ``evidence`` at Unix time ``at`` (default: now) and return its claims.

    Raises :class:`~sealedtorch.errors.AttestationError` (or a subclass) naming what failed.
    Does not apply any policy and does not check the binding: use :func:`appraise` for
    evidence that must answer a challenge.
    """
    verifier = verifier_for(evidence.tee)
    when = int(time.time() if at is None else at)
    return verifier.verify(evidence, at=when, config=config or VerifierConfig())


def appraise(evidence: Evidence, *, nonce: bytes, public_key: bytes, at: float | None = None,
             config: VerifierConfig | None = None, domain: bytes = binding.DOMAIN) -> Claims:
    """Verify ``evidence`` and that it binds ``nonce`` and ``public_key`` (under ``domain``).

    The one way services turn evidence into claims they act on: evidence that verifies but
    answers another challenge, or names another key, is as good as none.  Raises what
    :func:`verify` raises, or :class:`~sealedtorch.errors.BindingError` (carrying the
    verified claims in ``.claims``) when the binding does not match.
    """
    claims = verify(evidence, at=at, config=config)
    binding.check_claims(claims, nonce, public_key, domain=domain)
    return claims
