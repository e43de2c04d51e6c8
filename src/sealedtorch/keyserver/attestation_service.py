"""Attestation: challenges (single-use nonces), evidence verification and the
deployment's attestation policy, ending in an attestation-result token.

Invariants:

- A nonce is issued for one TEE kind and consumed by at most one successful attestation,
  in the same transaction as that attestation's audit record; any attempt that got as far
  as verification burns it, so a refused nonce cannot be retried.
- Evidence is checked against the deployment's :class:`DeploymentPolicy` before any token
  is issued; the caller learns only that it was refused, the reasons (which name reference
  values) go to the audit record.
- Malformed attacker input never becomes a 500: any verifier crash is an
  :class:`AttestationError`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .. import attest, crypto
from ..attest import binding
from ..attest.evidence import Claims, Evidence, Tee
from ..attest.policy import Decision, DeploymentPolicy
from ..errors import (
    AttestationError,
    BindingError,
    NonceError,
    PolicyDenied,
    RequestError,
    SealedTorchError,
    ServiceUnavailable,
)
from . import protocol
from .audit import OK
from .audit_recorder import AuditRecorder, Clock, RequestContext
from .metrics import KeyserverMetrics
from .protocol import b64decode
from .store import Store
from .tokens import AttestationToken, TokenSigner

log = logging.getLogger("sealedtorch.keyserver")

#: Purge used/expired nonces this long after they expire (until then a replay is reported
#: as "already used"/"expired" rather than "never issued").
NONCE_RETENTION = 3600.0
_PURGE_EVERY = 30.0
_TEE_VALUES = frozenset(t.value for t in Tee)


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires_at: float


@dataclass(frozen=True)
class IssuedToken:
    token: str
    info: AttestationToken


@dataclass(kw_only=True, eq=False)
class AttestationService:
    """Challenge and attest: turns verified, policy-accepted evidence into a token."""

    store: Store
    signer: TokenSigner
    verifier: attest.VerifierConfig
    recorder: AuditRecorder
    metrics: KeyserverMetrics
    clock: Clock = time.time
    nonce_ttl: float = 60.0
    token_ttl: float = 300.0
    #: The deployment's own attestation policy, checked before any token is issued.
    attestation_policy: DeploymentPolicy = field(default_factory=DeploymentPolicy)
    _last_purge: float = field(default=0.0, init=False, repr=False)

    def challenge(self, tee: str, ctx: RequestContext) -> Challenge:
        """Issue a single-use nonce for ``tee`` evidence, valid for ``nonce_ttl`` seconds.
        Not audited when it succeeds (it decides nothing); refused requests are."""
        try:
            kind = parse_tee(tee)
        except SealedTorchError as exc:
            entry = self.recorder.entry(ctx, "attest.challenge", tee=str(tee)[:32])
            self.recorder.failure(entry, exc)
            raise
        now = self.clock()
        nonce = crypto.random_bytes(binding.NONCE_SIZE)
        with self.store.transaction(durable=False) as tx:
            tx.insert_nonce(nonce, kind.value, now, now + self.nonce_ttl)
            if now - self._last_purge > _PURGE_EVERY:
                self._last_purge = now
                tx.purge_nonces(now - NONCE_RETENTION)
        return Challenge(nonce, now + self.nonce_ttl)

    def attest(self, req: protocol.AttestRequest, ctx: RequestContext) -> IssuedToken:
        """Verify evidence, its binding to the nonce and public key, and the nonce itself;
        burn the nonce; issue an attestation-result token."""
        start = time.perf_counter()
        try:
            return self._attest(req, ctx)
        finally:
            tee = req.tee if req.tee in _TEE_VALUES else "invalid"
            self.metrics.attest_seconds.observe(time.perf_counter() - start, tee=tee)

    def _attest(self, req: protocol.AttestRequest, ctx: RequestContext) -> IssuedToken:
        entry = self.recorder.entry(ctx, "attest", tee=str(req.tee)[:32], role=req.role.value)
        nonce = b""
        try:
            tee = parse_tee(req.tee)
            nonce = b64decode(req.nonce, field="nonce", size=binding.NONCE_SIZE)
            public_key = b64decode(req.public_key, field="public_key",
                                   size=crypto.X25519_PUBLIC_KEY_SIZE)
            evidence = Evidence(
                tee=tee, data=b64decode(req.evidence, field="evidence"),
                collateral=b64decode(req.collateral, field="collateral")
                if req.collateral is not None else None,
                certificates=b64decode(req.certificates, field="certificates")
                if req.certificates is not None else None)
            entry["evidence_digest"] = crypto.sha256(evidence.data).hex()
            entry["key_thumbprint"] = protocol.thumbprint(public_key)
            now = self.clock()
            with self.store.snapshot() as tx:  # cheap refusal before expensive verification
                tx.check_nonce(nonce, tee.value, now)
            claims = self._verify(evidence, nonce, public_key, now, entry)
            deployment = self._check_deployment_policy(claims)
            token, info = self.signer.issue(
                claims=claims, public_key=public_key, role=req.role,
                evidence_digest=entry["evidence_digest"], now=now, ttl=self.token_ttl)
            entry.update(decision=OK, token_id=info.token_id,
                         reasons=["evidence verified and bound to nonce and key",
                                  *deployment.reasons])
            with self.store.transaction() as tx:
                tx.consume_nonce(nonce, tee.value, self.clock())
                tx.append_audit(entry)
        except SealedTorchError as exc:
            if nonce and not isinstance(exc, (NonceError, RequestError, ServiceUnavailable)):
                self._burn(nonce)
            self.recorder.failure(entry, exc)
            raise
        self.recorder.log(entry)
        return IssuedToken(token, info)

    def _check_deployment_policy(self, claims: Claims) -> Decision:
        """Refuse evidence the deployment does not accept at all.  The caller learns only
        that it was refused; the reasons (which name the reference values) go to the audit
        record, which admins and auditors read."""
        decision = self.attestation_policy.decide(
            claims, sim_trusted=bool(self.verifier.sim_platform_keys))
        if decision.allowed:
            return decision
        raise PolicyDenied("the evidence does not satisfy this keyserver's attestation policy "
                           "(the operator can read the reasons in the audit log, request id "
                           "in this answer)", audit_reasons=decision.reasons)

    def _burn(self, nonce: bytes) -> None:
        """A nonce is spent by any attempt that got as far as verification."""
        try:
            with self.store.transaction() as tx:
                tx.burn_nonce(nonce, self.clock())
        except Exception:
            log.exception("could not burn a nonce after a failed attestation")

    def _verify(self, evidence: Evidence, nonce: bytes, public_key: bytes, now: float,
                entry: dict[str, Any]) -> Claims:
        """Appraise evidence bound to ``nonce`` and ``public_key``; the verified claims go
        into the audit ``entry``, also when the binding refuses them."""
        try:
            claims = attest.appraise(evidence, nonce=nonce, public_key=public_key, at=now,
                                     config=self.verifier)
        except BindingError as exc:
            if exc.claims is not None:
                entry.update(claims=exc.claims.to_json(), insecure=exc.claims.insecure)
            raise
        except SealedTorchError:
            raise
        except ImportError as exc:
            raise AttestationError(
                f"this keyserver cannot verify {evidence.tee} evidence: its verifier is not "
                f"installed ({exc.name})") from None
        except Exception as exc:  # malformed attacker input must never become a 500
            log.warning("verifier failed on malformed evidence: %s: %s",
                        type(exc).__name__, exc)
            raise AttestationError(
                f"{evidence.tee} evidence could not be parsed ({type(exc).__name__})") from None
        entry.update(claims=claims.to_json(), insecure=claims.insecure)
        return claims


def parse_tee(tee: str) -> Tee:
    try:
        return Tee(tee)
    except ValueError:
        raise RequestError(f"unknown tee {str(tee)[:32]!r}: expected one of "
                           f"{', '.join(t.value for t in Tee)}") from None
