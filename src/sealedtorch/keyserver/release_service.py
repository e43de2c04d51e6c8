"""Key release: which keys an attested identity gets, HPKE-sealed to its attested public
key, each with a keyserver-signed lease and a transparency-log receipt.

Invariants:

- A key is never released without its ``allow`` audit record: the grant and the record are
  written in the same transaction, so a committed revocation is seen by every later
  release, and every released key's record is a transparency-log leaf the receipt proves.
- An unknown model and a model whose policy refuses are answered alike (``403
  policy-denied``, same text, no reasons); the reasons go to the audit record only.
- A model whose row fails its MAC is refused for everyone (and audited); the other models
  of a release-all are still served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .. import crypto
from ..attest.policy import Decision, Policy, load_policy
from ..errors import (
    AuthenticationError,
    IntegrityError,
    KeyUnavailable,
    PolicyDenied,
    SealedTorchError,
    StoreIntegrityError,
)
from . import protocol, tlog
from .audit import ALLOW, DENY, ERROR
from .audit_recorder import AuditRecorder, Clock, RequestContext, fail_reasons
from .kek_base import KekProvider
from .leases import issue_lease
from .metrics import KeyserverMetrics
from .protocol import Role
from .rowmac import RowIntegrity
from .store import KeyRecord, KeyState, ModelRecord, Store, StoreTx
from .tokens import AttestationToken, TokenSigner


@dataclass(frozen=True)
class KeyRelease:
    """A model key HPKE-sealed to the attested public key, with the policy it is under:
    one entry of a release answer.  (Not :class:`~.client.ReleasedKey`, which is the key
    a client opened from such an entry.)"""

    model_id: str
    version: int
    sealed: bytes
    policy: dict[str, Any]
    policy_digest: str
    lease: str | None = None  # keyserver-signed lease (see .leases)

    def to_json(self) -> dict[str, Any]:
        out = {"model_id": self.model_id, "version": self.version,
               "sealed_key": protocol.b64encode(self.sealed),
               "hpke_suite": protocol.HPKE_SUITE_NAME, "policy": self.policy,
               "policy_digest": self.policy_digest}
        if self.lease is not None:
            out["lease"] = self.lease
        return out


@dataclass(frozen=True)
class _Grant:
    model: ModelRecord
    key: KeyRecord
    secret: bytes


def not_released(model_id: str, reasons: Any) -> PolicyDenied:
    """The one answer a caller gets for "unknown model" and for "not allowed": same status,
    same problem type, same text, no reference values (so an attested caller cannot probe
    which model ids exist, nor read a policy).  ``reasons`` go to the audit record only."""
    return PolicyDenied("no key of the requested model is released to this attested "
                        "identity (unknown model, or the model's policy does not allow it)",
                        audit_reasons=[str(r) for r in reasons])


@dataclass(kw_only=True, eq=False)
class ReleaseService:
    """Release keys to the identity of a verified attestation-result token."""

    store: Store
    kek: KekProvider
    signer: TokenSigner
    rows: RowIntegrity
    #: Builds receipts (:mod:`.tlog`).
    transparency: tlog.TransparencyLog
    recorder: AuditRecorder
    metrics: KeyserverMetrics
    clock: Clock = time.time
    #: Parsed policies by digest (a policy is parsed once, not per release).
    _policies: dict[str, Policy] = field(default_factory=dict, init=False, repr=False)

    def release(self, token: str | None, ctx: RequestContext, *, model_id: str | None = None,
                version: int | None = None) -> list[KeyRelease]:
        """Keys for the identity in ``token``: every active version of every model whose
        policy it satisfies (``model_id`` None), or one version of one model."""
        return self.release_with_receipt(token, ctx, model_id=model_id, version=version)[0]

    def release_with_receipt(self, token: str | None, ctx: RequestContext, *,
                             model_id: str | None = None, version: int | None = None,
                             since: int | None = None) -> tuple[list[KeyRelease], dict[str, Any]]:
        """:meth:`release`, plus its transparency-log receipt: the signed checkpoint, the
        ``allow`` audit record of every released key with its inclusion proof, and a
        consistency proof from tree size ``since`` (what the caller saw before), so the
        caller can check that its release is on the public record before using the key."""
        start = time.perf_counter()
        entry = self.recorder.entry(ctx, "release", model_id=model_id, version=version)
        try:
            keys, leaves = self._release(token, ctx, entry, model_id, version)
            with self.store.snapshot() as tx:
                receipt = self.transparency.receipt(tx, leaves, since)
            return keys, receipt
        finally:
            self.metrics.release_seconds.observe(time.perf_counter() - start,
                                                 tee=str(entry.get("tee") or "none"))

    def _release(self, token: str | None, ctx: RequestContext, entry: dict[str, Any],
                 model_id: str | None, version: int | None
                 ) -> tuple[list[KeyRelease], list[tuple[int, str]]]:
        try:
            tok = self._token(token)
        except SealedTorchError as exc:
            self.recorder.failure(entry, exc)
            raise
        entry.update(role=tok.role.value, tee=tok.claims.tee.value, token_id=tok.token_id,
                     evidence_digest=tok.evidence_digest, claims=tok.claims.to_json(),
                     insecure=tok.claims.insecure, key_thumbprint=tok.thumbprint)
        leaves: list[tuple[int, str]] = []
        if model_id is None:
            grants = self._release_all(tok, entry, leaves)
        else:
            grants = [self._release_one(tok, entry, model_id, version, leaves)]
        return [self._seal(tok, g) for g in grants], leaves

    def _token(self, token: str | None) -> AttestationToken:
        if not token:
            raise AuthenticationError("missing attestation token: POST /v1/attest first and "
                                      "send the token as 'Authorization: Bearer <token>'")
        return self.signer.verify(token, now=self.clock())

    def _seal(self, tok: AttestationToken, grant: _Grant) -> KeyRelease:
        info = protocol.release_info(grant.model.model_id, grant.key.version,
                                     grant.model.policy_digest)
        sealed = crypto.hpke_seal(tok.public_key, grant.secret, info=info)
        lease = issue_lease(
            self.signer, model_id=grant.model.model_id, version=grant.key.version,
            policy_digest=grant.model.policy_digest,
            subject=f"{tok.claims.tee.value}:{tok.thumbprint}", role=tok.role.value,
            holder_thumbprint=tok.thumbprint, token_id=tok.token_id, now=self.clock(),
            seconds=self._policy(grant.model).lease_duration)
        return KeyRelease(grant.model.model_id, grant.key.version, sealed, grant.model.policy,
                         grant.model.policy_digest, lease)

    def _unwrap(self, key: KeyRecord) -> bytes:
        if key.wrapped is None:
            raise KeyUnavailable(
                f"model {key.model_id!r} version {key.version}: key material erased",
                http_status=410)
        return self.kek.unwrap(key.wrapped, model_id=key.model_id, version=key.version,
                               kek_id=key.kek_id)

    def _release_one(self, tok: AttestationToken, entry: dict[str, Any], model_id: str,
                     version: int | None, leaves: list[tuple[int, str]]) -> _Grant:
        failure: SealedTorchError | None = None
        grant: _Grant | None = None
        try:
            with self.store.transaction() as tx:
                try:
                    grant = self._grant_one(tx, tok, entry, model_id, version)
                    entry["decision"] = ALLOW
                except SealedTorchError as exc:
                    failure = exc
                    entry.update(decision=ERROR if isinstance(exc, IntegrityError) else DENY,
                                 problem=exc.problem_type, reasons=fail_reasons(exc))
                written = tx.append_audit(entry)
                if failure is None:
                    leaves.append((written.seq - 1, written.record_json))
        except SealedTorchError as exc:  # the store itself failed
            self.recorder.failure(entry, exc)
            raise
        self.recorder.log(entry)
        if failure is not None:
            raise failure
        assert grant is not None
        return grant

    def _grant_one(self, tx: StoreTx, tok: AttestationToken, entry: dict[str, Any],
                   model_id: str, version: int | None) -> _Grant:
        model = tx.get_model(model_id)
        if model is None:
            raise not_released(model_id, [f"unknown model {model_id!r}"])
        entry.update(policy_digest=model.policy_digest, owner=model.owner_id)
        self.rows.check_model(model)
        decision = self._decide(model, tok)
        entry["reasons"] = list(decision.reasons)
        if not decision.allowed:
            raise not_released(model_id, decision.reasons)
        keys = tx.key_versions(model_id)
        if version is not None:
            key = next((k for k in keys if k.version == version), None)
            if key is None:
                raise KeyUnavailable(f"model {model_id!r} has no key version {version}")
            if key.state is not KeyState.ACTIVE:
                raise KeyUnavailable(
                    f"model {model_id!r} key version {version} is {key.state.value}"
                    + (f": {key.reason}" if key.reason else ""), http_status=410)
        else:
            active = [k for k in keys if k.state is KeyState.ACTIVE]
            if not active:
                states = sorted({k.state.value for k in keys})
                raise KeyUnavailable(
                    f"model {model_id!r} has no active key: every version is "
                    f"{' or '.join(states)}", http_status=410)
            key = active[-1]
        entry["version"] = key.version
        self.rows.check_key(key)
        return _Grant(model, key, self._unwrap(key))

    def _release_all(self, tok: AttestationToken, entry: dict[str, Any],
                     leaves: list[tuple[int, str]]) -> list[_Grant]:
        grants: list[_Grant] = []
        withheld: list[dict[str, Any]] = []
        failure: SealedTorchError | None = None
        records: list[dict[str, Any]] = []
        try:
            with self.store.transaction() as tx:
                for model in tx.list_models():
                    try:
                        self.rows.check_model(model)
                    except StoreIntegrityError as exc:
                        # refused for everyone, audited; the other models are still served
                        broken = dict(entry, model_id=model.model_id, owner=model.owner_id,
                                      policy_digest=model.policy_digest, decision=ERROR,
                                      problem=exc.problem_type, reasons=fail_reasons(exc))
                        tx.append_audit(broken)
                        records.append(broken)
                        failure = failure or exc
                        continue
                    decision = self._decide(model, tok)
                    if not decision.allowed:
                        withheld.append({"model_id": model.model_id,
                                         "policy_digest": model.policy_digest,
                                         "reasons": list(decision.reasons)})
                        continue
                    active = [k for k in tx.key_versions(model.model_id)
                              if k.state is KeyState.ACTIVE]
                    if not active:
                        continue
                    rec = dict(entry, model_id=model.model_id, owner=model.owner_id,
                               versions=[k.version for k in active],
                               policy_digest=model.policy_digest, reasons=list(decision.reasons))
                    try:
                        for k in active:
                            self.rows.check_key(k)
                        grants.extend(_Grant(model, k, self._unwrap(k)) for k in active)
                        rec["decision"] = ALLOW
                    except SealedTorchError as exc:
                        failure = failure or exc
                        rec.update(decision=ERROR, problem=exc.problem_type,
                                   reasons=fail_reasons(exc))
                    written = tx.append_audit(rec)
                    if rec["decision"] == ALLOW:
                        leaves.append((written.seq - 1, written.record_json))
                    records.append(rec)
                if withheld or not records:
                    summary = dict(entry, decision=ALLOW if grants else DENY,
                                   released=[r["model_id"] for r in records
                                             if r["decision"] == ALLOW],
                                   withheld=withheld)
                    tx.append_audit(summary)
                    records.append(summary)
        except SealedTorchError as exc:
            self.recorder.failure(entry, exc)
            raise
        for rec in records:
            self.recorder.log(rec)
        if failure is not None and not (isinstance(failure, StoreIntegrityError) and grants):
            raise failure
        return grants


    def _policy(self, model: ModelRecord) -> Policy:
        policy = self._policies.get(model.policy_digest)
        if policy is None:
            policy = load_policy(model.policy)
            if len(self._policies) > 4096:
                self._policies.clear()
            self._policies[model.policy_digest] = policy
        return policy

    def _decide(self, model: ModelRecord, tok: AttestationToken) -> Decision:
        policy = self._policy(model)
        if tok.role is Role.HOLDER:
            return policy.decide_hold(tok.claims)
        return policy.decide_use(tok.claims)
