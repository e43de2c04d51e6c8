"""The keyserver's logic, independent of HTTP: attestation, key release, administration.

:class:`Keyserver` takes its collaborators (store, KEK provider, token signer, verifier
configuration, clock) explicitly, so tests inject a clock and the HTTP layer (:mod:`.app`)
stays a thin translation of JSON to calls.  Every operation that decides something writes
an audit record; a release or state change writes it *in the same transaction* as the data
it depends on, so a key is never released without its record and a committed revocation
is seen by every later release.  Failures are audited in a separate transaction after the
failed one rolled back, so a refused request changes nothing but the audit log.

Admin tokens have a role (:class:`~.protocol.AdminRole`): ``admin`` may do everything,
``auditor`` only read the audit log, and ``owner`` manages only the models it registered.
To an owner, another owner's model does not exist: every operation on it answers
``404 key-unavailable`` exactly as for an unknown id, and the attempt is audited in a record
only admins and auditors can read.  Each audit record carries the ``owner`` of the model it
concerns, which decides which owner may read it.

Attested callers get the same discretion: evidence is checked against the deployment's
attestation policy (:class:`~sealedtorch.attest.policy.DeploymentPolicy`) before a token is
issued, and a key request for an unknown model is answered exactly like one the model's
policy refuses (``403 policy-denied``, same text, no reasons).  The reasons, which name
reference values, are written to the audit record only.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import attest, crypto
from ..attest import binding
from ..attest.evidence import Claims, Evidence, Tee
from ..attest.policy import Decision, DeploymentPolicy, Policy, load_policy
from ..errors import (
    AttestationError,
    AuthenticationError,
    BindingError,
    ConflictError,
    ForbiddenError,
    IntegrityError,
    KeyUnavailable,
    NonceError,
    PolicyDenied,
    RequestError,
    SealedTorchError,
    ServiceUnavailable,
    StoreIntegrityError,
)
from ..keys import ModelKey, validate_model_id
from . import audit, protocol, tlog
from .audit import ALLOW, DENY, ERROR, OK
from .kek import KekProvider
from .leases import issue_lease
from .metrics import KeyserverMetrics
from .protocol import AdminRole, Role, b64decode
from .rowmac import META_KEY, RowIntegrity, seal_all
from .store import (
    AdminTokenRecord,
    KeyRecord,
    KeyState,
    ModelRecord,
    Store,
    StoreTx,
    StoreUnavailable,
)
from .tokens import (
    AttestationToken,
    TokenSigner,
    admin_token_hash,
    admin_token_id,
    new_admin_token,
)

log = logging.getLogger("sealedtorch.keyserver")

Clock = Callable[[], float]

#: Purge used/expired nonces this long after they expire (until then a replay is reported
#: as "already used"/"expired" rather than "never issued").
NONCE_RETENTION = 3600.0
_PURGE_EVERY = 30.0
#: Audit records one ``GET /v1/admin/audit`` answers at most.
AUDIT_PAGE_MAX = 10_000
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: Default lifetime of an admin, owner or auditor token (``tokens create --expires``).
TOKEN_LIFETIME = 90 * 86400.0
#: The longest lifetime a token may be given.
TOKEN_LIFETIME_MAX = 5 * 365 * 86400.0


#: Unauthenticated failures audited one record each per window; the rest are counted.
FAILURE_BUDGET = 100
FAILURE_WINDOW = 60.0


class FailureSampler:
    """Decides which failures of *unauthenticated* requests get their own durable audit
    record: the first ``budget`` in each ``window`` seconds (per replica); the others are
    only counted (metrics) and, when the window closes, one summary record lists how many
    of each (event, problem) were left out.  So a flood of malformed or unauthenticated
    requests grows the audit log by at most ``budget + 1`` records a window, whatever its
    size, while authenticated failures (and every integrity failure) are always recorded.
    """

    def __init__(self, budget: int = FAILURE_BUDGET, window: float = FAILURE_WINDOW,
                 clock: Clock = time.monotonic) -> None:
        self.budget = budget
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._recorded = 0
        self._suppressed: dict[tuple[str, str], int] = {}

    def admit(self, event: str, problem: str) -> tuple[bool, dict[str, Any] | None]:
        """(record this one?, the summary of a window that just closed, if any)."""
        now = self.clock()
        with self._lock:
            summary = None
            if self._start is None or now - self._start >= self.window:
                summary = self._close()
                self._start = now
            if self._recorded < self.budget:
                self._recorded += 1
                return True, summary
            key = (event, problem)
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False, summary

    def flush(self) -> dict[str, Any] | None:
        """The summary of the current window if it has ended (else None)."""
        with self._lock:
            if self._start is None or self.clock() - self._start < self.window:
                return None
            summary = self._close()
            self._start = None
            return summary

    def _close(self) -> dict[str, Any] | None:
        suppressed, self._suppressed, self._recorded = self._suppressed, {}, 0
        if not suppressed:
            return None
        return {"event": "audit.failures.suppressed", "decision": DENY,
                "window_seconds": self.window, "recorded": self.budget,
                "suppressed_total": sum(suppressed.values()),
                "suppressed": [{"event": e, "problem": p, "count": n}
                               for (e, p), n in sorted(suppressed.items())],
                "reasons": [f"unauthenticated failures beyond {self.budget} a window are "
                            f"counted, not recorded one by one"]}


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: for audit records and logs."""

    client: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires_at: float


@dataclass(frozen=True)
class IssuedToken:
    token: str
    info: AttestationToken


@dataclass(frozen=True)
class SealedKey:
    """A model key HPKE-sealed to the attested public key, with the policy it is under."""

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


def _fail_reasons(exc: SealedTorchError) -> list[str]:
    if exc.audit_reasons is not None:  # for the audit log only, not the client
        return list(exc.audit_reasons)
    if isinstance(exc, PolicyDenied) and exc.reasons:
        return list(exc.reasons)
    return [str(exc)]


def _not_released(model_id: str, reasons: Any) -> PolicyDenied:
    """The one answer a caller gets for "unknown model" and for "not allowed": same status,
    same problem type, same text, no reference values (so an attested caller cannot probe
    which model ids exist, nor read a policy).  ``reasons`` go to the audit record only."""
    return PolicyDenied("no key of the requested model is released to this attested "
                        "identity (unknown model, or the model's policy does not allow it)",
                        audit_reasons=[str(r) for r in reasons])


class Keyserver:
    def __init__(self, *, store: Store, kek: KekProvider, signer: TokenSigner,
                 verifier: attest.VerifierConfig, clock: Clock = time.time,
                 nonce_ttl: float = 60.0, token_ttl: float = 300.0,
                 metrics: KeyserverMetrics | None = None,
                 attestation_policy: DeploymentPolicy | None = None,
                 transparency: tlog.TransparencyLog | None = None) -> None:
        self.store = store
        #: The deployment's own attestation policy, checked before any token is issued.
        self.attestation_policy = attestation_policy or DeploymentPolicy()
        if transparency is None:
            # no data directory (an embedded keyserver): a log key for this process only
            transparency = tlog.TransparencyLog(tlog.Signer.generate())
            log.warning("transparency log: no signing key given; checkpoints are signed "
                        "with a key that lives only in this process (%s)",
                        transparency.verifier.vkey)
        #: Signs checkpoints and builds receipts (:mod:`.tlog`).
        self.tlog = transparency
        self.metrics = metrics or KeyserverMetrics()
        self.kek = kek
        self.signer = signer
        self.verifier = verifier
        self.clock = clock
        self.nonce_ttl = nonce_ttl
        self.token_ttl = token_ttl
        self._policies: dict[str, Policy] = {}
        self._last_purge = 0.0
        self.rows = RowIntegrity(kek, on_failure=self._integrity_failure)
        self.failures = FailureSampler()

    def _integrity_failure(self, table: str) -> None:
        self.metrics.integrity_failures.inc(table=table)

    # ------------------------------------------------------------------ store integrity

    def prepare_store(self, *, allow_upgrade: bool) -> int:
        """Make sure every row that decides who gets a key is sealed under the KEK.

        A store whose marker (a MAC'd ``meta`` row) is valid is ready.  A store without it
        was written by a sealedtorch before row MACs: with ``allow_upgrade`` its rows are
        sealed now, as they are (trust on upgrade: whatever they say at this moment is
        taken as genuine), audited, and the marker written; without, it is refused (the
        data directory says its store was sealed already, so a missing marker means
        someone removed it).  Returns how many rows were sealed."""
        with self.store.transaction() as tx:
            value = tx.get_meta(META_KEY)
            if value is not None:
                if not self.rows.marker_ok(value):
                    self._integrity_failure("meta")
                    raise StoreIntegrityError("the store's row-MAC marker fails its MAC "
                                              "under the KEK (changed behind the "
                                              "keyserver's back, or another KEK)",
                                              table="meta")
                return 0
            if not allow_upgrade:
                self._integrity_failure("meta")
                raise StoreIntegrityError(
                    "the store has no row-MAC marker, but this data directory's store was "
                    "sealed before (keyserver.json: row_macs=required): someone removed it; "
                    "refusing to seal rows that may have been changed", table="meta")
            sealed = seal_all(tx, self.rows, only_unsealed=True)
            tx.set_meta(META_KEY, self.rows.marker())
            tx.append_audit({"time": self.clock(), "event": "store.integrity.upgrade",
                             "decision": OK, "actor": "local", "sealed_rows": sealed,
                             "kek": self.rows.kek.kek_id,
                             "reasons": ["rows written before row MACs sealed as they are "
                                         "(trust on upgrade)"]})
        log.warning("store integrity: sealed %d existing rows under the KEK (trust on "
                    "upgrade)", sealed, extra={"fields": {"sealed_rows": sealed}})
        return sealed

    # ------------------------------------------------------------------ audit helpers

    def _entry(self, ctx: RequestContext, event: str, **fields: Any) -> dict[str, Any]:
        return {"time": self.clock(), "event": event, "client": ctx.client,
                "request_id": ctx.request_id, **fields}

    def _audit(self, entry: dict[str, Any]) -> None:
        with self.store.transaction() as tx:
            tx.append_audit(entry)

    def _audit_failure(self, entry: dict[str, Any], exc: SealedTorchError) -> None:
        entry.update(decision=ERROR if isinstance(exc, IntegrityError) else DENY,
                     problem=exc.problem_type, reasons=_fail_reasons(exc))
        if isinstance(exc, StoreUnavailable):
            # nothing was decided, and the store cannot take a record anyway
            self.metrics.unavailable.inc()
            log.warning("%s: %s", entry.get("event"), exc,
                        extra={"fields": {"event": entry.get("event"), "problem":
                                          exc.problem_type,
                                          "request_id": entry.get("request_id")}})
            return
        if _unauthenticated(entry, exc):
            record, summary = self.failures.admit(str(entry.get("event")), exc.problem_type)
            if summary is not None:
                self._write_summary(summary)
            if not record:  # counted, not recorded: a flood costs the log nothing
                self.metrics.record(entry)
                self.metrics.audit_suppressed.inc(event=str(entry.get("event")))
                return
        try:
            self._audit(entry)
        except ServiceUnavailable as store_exc:  # the refusal stands all the same
            log.warning("could not audit a refused request: %s", store_exc,
                        extra={"fields": {"event": entry.get("event"),
                                          "request_id": entry.get("request_id")}})
        except Exception:  # the refusal stands even if it cannot be recorded
            log.exception("could not write the audit record for a refused request",
                          extra={"fields": {"event": entry.get("event"),
                                            "request_id": entry.get("request_id")}})
        self._log(entry)

    def _log(self, entry: dict[str, Any]) -> None:
        self.metrics.record(entry)
        fields = {k: entry.get(k) for k in (
            "event", "decision", "problem", "model_id", "versions", "version", "client",
            "request_id", "actor", "role", "tee", "insecure", "policy_digest") if
            entry.get(k) is not None}
        if entry.get("decision") in (DENY, ERROR):
            fields["reasons"] = entry.get("reasons")
        level = logging.INFO
        if entry.get("insecure") and entry.get("decision") == ALLOW:
            level = logging.WARNING
        elif entry.get("decision") == ERROR:
            level = logging.ERROR
        msg = f"{entry.get('event')}: {entry.get('decision')}"
        if entry.get("insecure") and entry.get("decision") == ALLOW:
            msg += " (INSECURE sim evidence: development only)"
        log.log(level, msg, extra={"fields": fields})

    def record_request_error(self, ctx: RequestContext, event: str,
                             exc: SealedTorchError) -> None:
        """Audit a request the HTTP layer refused before it reached an operation (malformed
        JSON, an oversized body, ...): nobody was authenticated yet, so it is sampled."""
        self._audit_failure(self._entry(ctx, event, unauthenticated=True), exc)

    def _write_summary(self, summary: dict[str, Any]) -> None:
        summary = {"time": self.clock(), **summary}
        try:
            self._audit(summary)
        except Exception:  # the counters still hold the numbers
            log.exception("could not write the summary of suppressed failures")
            return
        log.warning("%d unauthenticated failures were counted, not recorded one by one",
                    summary["suppressed_total"],
                    extra={"fields": {"event": summary["event"],
                                      "suppressed": summary["suppressed"]}})

    def flush_failures(self) -> None:
        """Write the summary of a closed window of suppressed failures (if any)."""
        summary = self.failures.flush()
        if summary is not None:
            self._write_summary(summary)

    # ------------------------------------------------------------------ attestation

    def challenge(self, tee: str, ctx: RequestContext) -> Challenge:
        """Issue a single-use nonce for ``tee`` evidence, valid for ``nonce_ttl`` seconds.
        Not audited when it succeeds (it decides nothing); refused requests are."""
        try:
            kind = _parse_tee(tee)
        except SealedTorchError as exc:
            self._audit_failure(self._entry(ctx, "attest.challenge", tee=str(tee)[:32]), exc)
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
        entry = self._entry(ctx, "attest", tee=str(req.tee)[:32], role=req.role.value)
        nonce = b""
        try:
            tee = _parse_tee(req.tee)
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
            self._audit_failure(entry, exc)
            raise
        self._log(entry)
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

    # ------------------------------------------------------------------ key release

    def release(self, token: str | None, ctx: RequestContext, *, model_id: str | None = None,
                version: int | None = None) -> list[SealedKey]:
        """Keys for the identity in ``token``: every active version of every model whose
        policy it satisfies (``model_id`` None), or one version of one model."""
        return self.release_with_receipt(token, ctx, model_id=model_id, version=version)[0]

    def release_with_receipt(self, token: str | None, ctx: RequestContext, *,
                             model_id: str | None = None, version: int | None = None,
                             since: int | None = None) -> tuple[list[SealedKey], dict[str, Any]]:
        """:meth:`release`, plus its transparency-log receipt: the signed checkpoint, the
        ``allow`` audit record of every released key with its inclusion proof, and a
        consistency proof from tree size ``since`` (what the caller saw before), so the
        caller can check that its release is on the public record before using the key."""
        start = time.perf_counter()
        entry = self._entry(ctx, "release", model_id=model_id, version=version)
        try:
            keys, leaves = self._release(token, ctx, entry, model_id, version)
            with self.store.snapshot() as tx:
                receipt = self.tlog.receipt(tx, leaves, since)
            return keys, receipt
        finally:
            self.metrics.release_seconds.observe(time.perf_counter() - start,
                                                 tee=str(entry.get("tee") or "none"))

    def _release(self, token: str | None, ctx: RequestContext, entry: dict[str, Any],
                 model_id: str | None, version: int | None
                 ) -> tuple[list[SealedKey], list[tuple[int, str]]]:
        try:
            tok = self._token(token)
        except SealedTorchError as exc:
            self._audit_failure(entry, exc)
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

    def _seal(self, tok: AttestationToken, grant: _Grant) -> SealedKey:
        info = protocol.release_info(grant.model.model_id, grant.key.version,
                                     grant.model.policy_digest)
        sealed = crypto.hpke_seal(tok.public_key, grant.secret, info=info)
        lease = issue_lease(
            self.signer, model_id=grant.model.model_id, version=grant.key.version,
            policy_digest=grant.model.policy_digest,
            subject=f"{tok.claims.tee.value}:{tok.thumbprint}", role=tok.role.value,
            holder_thumbprint=tok.thumbprint, token_id=tok.token_id, now=self.clock(),
            seconds=self._policy(grant.model).lease_duration)
        return SealedKey(grant.model.model_id, grant.key.version, sealed, grant.model.policy,
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
                                 problem=exc.problem_type, reasons=_fail_reasons(exc))
                written = tx.append_audit(entry)
                if failure is None:
                    leaves.append((written.seq - 1, written.record_json))
        except SealedTorchError as exc:  # the store itself failed
            self._audit_failure(entry, exc)
            raise
        self._log(entry)
        if failure is not None:
            raise failure
        assert grant is not None
        return grant

    def _grant_one(self, tx: StoreTx, tok: AttestationToken, entry: dict[str, Any],
                   model_id: str, version: int | None) -> _Grant:
        model = tx.get_model(model_id)
        if model is None:
            raise _not_released(model_id, [f"unknown model {model_id!r}"])
        entry.update(policy_digest=model.policy_digest, owner=model.owner_id)
        self.rows.check_model(model)
        decision = self._decide(model, tok)
        entry["reasons"] = list(decision.reasons)
        if not decision.allowed:
            raise _not_released(model_id, decision.reasons)
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
                                      problem=exc.problem_type, reasons=_fail_reasons(exc))
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
                                   reasons=_fail_reasons(exc))
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
            self._audit_failure(entry, exc)
            raise
        for rec in records:
            self._log(rec)
        if failure is not None and not (isinstance(failure, StoreIntegrityError) and grants):
            raise failure
        return grants

    # ------------------------------------------------------------------ administration

    def authenticate_admin(self, token: str | None, ctx: RequestContext,
                           action: str) -> AdminTokenRecord:
        """The admin token's record, or :class:`AuthenticationError` (audited)."""
        try:
            if not token:
                raise AuthenticationError("missing admin token ('Authorization: Bearer "
                                          "<token>'; see DIR/admin-token)")
            token_hash = admin_token_hash(token)
            with self.store.snapshot() as tx:
                record = tx.admin_token(token_hash)
            if record is None:
                raise AuthenticationError("unknown admin token")
            self.rows.check_token(record)
            if record.revoked_at is not None:
                raise AuthenticationError(f"admin token {record.token_id} was revoked")
            if record.expires_at is not None and self.clock() >= record.expires_at:
                raise AuthenticationError(
                    f"admin token {record.token_id} expired at {audit.iso(record.expires_at)}"
                    f"; an admin can issue its successor with `keyserver tokens rotate`")
        except (AuthenticationError, StoreIntegrityError) as exc:
            self._audit_failure(self._entry(ctx, "admin.denied", action=action), exc)
            raise
        return record

    def _admin_write(self, entry: dict[str, Any],
                     body: Callable[[StoreTx, dict[str, Any]], Any]) -> Any:
        try:
            with self.store.transaction() as tx:
                result = body(tx, entry)
                entry.setdefault("decision", OK)
                tx.append_audit(entry)
        except SealedTorchError as exc:
            self._audit_failure(entry, exc)
            raise
        self._log(entry)
        return result

    def _admin_entry(self, who: AdminTokenRecord, ctx: RequestContext, event: str,
                     **fields: Any) -> dict[str, Any]:
        return self._entry(ctx, event, actor=who.token_id, actor_role=who.role, **fields)

    @staticmethod
    def _require(who: AdminTokenRecord, action: str, *roles: AdminRole) -> None:
        if who.role not in roles:
            raise ForbiddenError(f"a {who.role} token may not {action} (needs "
                                 f"{' or '.join(r.value for r in roles)})")

    def _owned(self, tx: StoreTx, who: AdminTokenRecord, model_id: str,
               entry: dict[str, Any]) -> ModelRecord:
        """The model, if this token may manage it.  For an owner, another owner's model
        is indistinguishable from an unknown one (same 404, same text); the audit record of
        the attempt says what happened and is readable by admins and auditors only."""
        model = tx.get_model(model_id)
        if model is not None and (who.role != AdminRole.OWNER
                                  or model.owner_id == _principal(who)):
            entry["owner"] = model.owner_id
            return self.rows.check_model(model)
        raise KeyUnavailable(f"unknown model {str(model_id)[:128]!r}", audit_reasons=None
                             if model is None else [f"model {model_id!r} belongs to another "
                                                    f"owner; answered as unknown"])

    def register(self, admin: AdminTokenRecord, ctx: RequestContext,
                 req: protocol.RegisterRequest) -> protocol.ModelInfo:
        entry = self._admin_entry(admin, ctx, "register", model_id=str(req.model_id)[:128])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.ModelInfo:
            self._require(admin, "register models", AdminRole.ADMIN, AdminRole.OWNER)
            model_id = _model_id(req.model_id)
            key = _model_key(model_id, req.key)
            policy = load_policy(req.policy)
            existing = tx.get_model(model_id)
            if existing is not None:
                if admin.role != AdminRole.OWNER:
                    raise ConflictError(f"model {model_id!r} is already registered; use "
                                        f"`keys rotate` for a new key or `keys policy set`")
                mine = existing.owner_id == _principal(admin)
                if mine:
                    entry["owner"] = existing.owner_id
                raise ConflictError(
                    f"model id {model_id!r} is already registered (model ids are unique on "
                    f"a keyserver: if it is not yours, choose another)", audit_reasons=None
                    if mine else [f"model {model_id!r} belongs to another owner"])
            now = self.clock()
            owner = admin.name if admin.role == AdminRole.OWNER else None
            owner_id = _principal(admin) if admin.role == AdminRole.OWNER else None
            model = self.rows.seal_model(ModelRecord(model_id, policy.to_json(),
                                                     policy.digest(), now, now, owner,
                                                     owner_id))
            tx.insert_model(model)
            tx.insert_key(self.rows.seal_key(self._wrapped(key, now)))
            entry.update(version=key.version, policy_digest=model.policy_digest,
                         owner=owner_id)
            return _model_info(model, tx.key_versions(model_id))

        result: protocol.ModelInfo = self._admin_write(entry, body)
        return result

    def set_policy(self, admin: AdminTokenRecord, ctx: RequestContext,
                   req: protocol.PolicyRequest) -> protocol.ModelInfo:
        entry = self._admin_entry(admin, ctx, "policy.set", model_id=str(req.model_id)[:128])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.ModelInfo:
            self._require(admin, "change policies", AdminRole.ADMIN, AdminRole.OWNER)
            model = self._owned(tx, admin, req.model_id, entry)
            policy = load_policy(req.policy)
            entry.update(previous_policy_digest=model.policy_digest,
                         policy_digest=policy.digest())
            now = self.clock()
            sealed = self.rows.seal_model(dataclasses.replace(
                model, policy=policy.to_json(), policy_digest=policy.digest(), updated_at=now))
            tx.update_policy(model.model_id, policy.to_json(), policy.digest(), now,
                             row_mac=sealed.row_mac, mac_kek=sealed.mac_kek)
            updated = tx.get_model(model.model_id)
            assert updated is not None
            return _model_info(updated, tx.key_versions(model.model_id))

        result: protocol.ModelInfo = self._admin_write(entry, body)
        return result

    def rotate(self, admin: AdminTokenRecord, ctx: RequestContext,
               req: protocol.RotateRequest) -> protocol.RotateResponse:
        """Add a key version: uploaded (``key``) or generated here and returned HPKE-sealed
        to ``recipient_public_key``.  Older versions stay active until revoked or retired."""
        entry = self._admin_entry(admin, ctx, "rotate", model_id=str(req.model_id)[:128])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.RotateResponse:
            self._require(admin, "rotate keys", AdminRole.ADMIN, AdminRole.OWNER)
            if (req.key is None) == (req.recipient_public_key is None):
                raise RequestError("rotate needs exactly one of 'key' (upload) and "
                                   "'recipient_public_key' (generate server-side)")
            model = self._owned(tx, admin, req.model_id, entry)
            latest = max((k.version for k in tx.key_versions(model.model_id)), default=0)
            now = self.clock()
            sealed: bytes | None = None
            if req.key is not None:
                key = _model_key(model.model_id, req.key)
                if key.version <= latest:
                    raise ConflictError(f"model {model.model_id!r} already has version "
                                        f"{latest}; a new key needs a higher version")
                entry["source"] = "uploaded"
            else:
                assert req.recipient_public_key is not None
                recipient = b64decode(req.recipient_public_key, field="recipient_public_key",
                                      size=crypto.X25519_PUBLIC_KEY_SIZE)
                if latest >= 2**32 - 1:
                    raise ConflictError(f"model {model.model_id!r} has no key version left")
                key = ModelKey.generate(model.model_id, latest + 1)
                sealed = crypto.hpke_seal(recipient, key.secret,
                                          info=protocol.rotate_info(key.model_id, key.version))
                entry["source"] = "generated"
            tx.insert_key(self.rows.seal_key(self._wrapped(key, now)))
            entry.update(version=key.version, policy_digest=model.policy_digest)
            return protocol.RotateResponse(
                model_id=key.model_id, version=key.version,
                sealed_key=protocol.b64encode(sealed) if sealed is not None else None)

        result: protocol.RotateResponse = self._admin_write(entry, body)
        return result

    def change_state(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.StateChangeRequest,
                     state: KeyState) -> protocol.StateChangeResponse:
        """Revoke (stop releasing) or retire (stop releasing and erase) one version or all."""
        event = "revoke" if state is KeyState.REVOKED else "retire"
        entry = self._admin_entry(admin, ctx, event, model_id=str(req.model_id)[:128],
                                  version=req.version, reason=req.reason or None)

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.StateChangeResponse:
            self._require(admin, f"{event} keys", AdminRole.ADMIN, AdminRole.OWNER)
            model = self._owned(tx, admin, req.model_id, entry)
            keys = tx.key_versions(model.model_id)
            movable = {KeyState.ACTIVE} if state is KeyState.REVOKED else \
                {KeyState.ACTIVE, KeyState.REVOKED}
            if req.version is not None:
                key = next((k for k in keys if k.version == req.version), None)
                if key is None:
                    raise KeyUnavailable(f"model {model.model_id!r} has no key version "
                                         f"{req.version}")
                if key.state not in movable:
                    raise ConflictError(f"model {model.model_id!r} version {req.version} is "
                                        f"already {key.state.value}")
                targets = [key]
            else:
                targets = [k for k in keys if k.state in movable]
                if not targets:
                    raise ConflictError(f"model {model.model_id!r} has no version left to "
                                        f"{event}")
            now = self.clock()
            for key in targets:
                sealed = self.rows.seal_key(dataclasses.replace(key, state=state))
                tx.set_key_state(model.model_id, key.version, state, now, req.reason,
                                 erase=state is KeyState.RETIRED, row_mac=sealed.row_mac,
                                 mac_kek=sealed.mac_kek)
            changed = [k.version for k in targets]
            entry.update(versions=changed, policy_digest=model.policy_digest)
            return protocol.StateChangeResponse(model_id=model.model_id, changed=changed,
                                                state=state.value)

        result: protocol.StateChangeResponse = self._admin_write(entry, body)
        return result

    def list_models(self, admin: AdminTokenRecord, ctx: RequestContext,
                    model_id: str | None = None) -> list[protocol.ModelInfo]:
        entry = self._admin_entry(admin, ctx, "admin.list" if model_id is None else "admin.get",
                                  model_id=model_id)

        def body(tx: StoreTx, entry: dict[str, Any]) -> list[protocol.ModelInfo]:
            self._require(admin, "read models", AdminRole.ADMIN, AdminRole.OWNER)
            if model_id is not None:
                models = [self._owned(tx, admin, model_id, entry)]
            elif admin.role == AdminRole.OWNER:
                entry["owner"] = _principal(admin)
                models = tx.list_models(owner_id=_principal(admin))
            else:
                models = tx.list_models()
            for m in models:
                self.rows.check_model(m)
            return [_model_info(m, tx.key_versions(m.model_id)) for m in models]

        result: list[protocol.ModelInfo] = self._admin_write(entry, body)
        return result

    # ------------------------------------------------------------------ tokens and audit

    def create_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.TokenCreateRequest) -> protocol.TokenCreateResponse:
        """A new admin/owner/auditor token (admins only).  The token is in the answer once;
        the store keeps its hash.  It expires after ``expires_in`` seconds (default 90
        days).  The token belongs to an identity (``principal_id``, immutable): while a
        valid token of this name and role exists, the new one joins that identity (a second
        credential for the same owner); otherwise it is a *new* identity, so a name whose
        tokens were all revoked or expired never hands their models to whoever gets the
        name next."""
        entry = self._admin_entry(admin, ctx, "token.create", token_role=str(req.role),
                                  token_name=str(req.name)[:64])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.TokenCreateResponse:
            self._require(admin, "create tokens", AdminRole.ADMIN)
            role = AdminRole(req.role)
            if not _TOKEN_NAME.fullmatch(req.name):
                raise RequestError("token name: 1-64 characters, letters, digits and ._@- "
                                   "(starting with a letter or digit)")
            now = self.clock()
            lifetime = _lifetime(req.expires_in)
            existing = tx.list_admin_tokens()
            clash = next((t for t in existing if t.name == req.name and t.role != role), None)
            if clash is not None:
                raise ConflictError(f"the name {req.name!r} already belongs to a {clash.role} "
                                    f"token; one name, one role")
            live = next((t for t in existing if t.name == req.name and t.role == role
                         and self._live(t, now)), None)
            if live is not None:
                principal = _principal(live)
            else:
                taken = {_principal(t) for t in existing}
                principal, n = req.name, 1
                while principal in taken:
                    n += 1
                    principal = f"{req.name}#{n}"
            token = new_admin_token()
            token_hash = admin_token_hash(token)
            record = self.rows.seal_token(AdminTokenRecord(
                admin_token_id(token_hash), req.name, role.value, now,
                principal_id=principal, expires_at=now + lifetime, token_hash=token_hash))
            tx.insert_admin_token(record, token_hash)
            entry.update(token_id=record.token_id, principal_id=principal,
                         expires_at=record.expires_at)
            return protocol.TokenCreateResponse(token=token, **_token_info(record).model_dump())

        result: protocol.TokenCreateResponse = self._admin_write(entry, body)
        return result

    def _live(self, t: AdminTokenRecord, now: float) -> bool:
        """Not revoked, not expired, and its row verifies."""
        return (t.revoked_at is None and (t.expires_at is None or now < t.expires_at)
                and self.rows.token_ok(t))

    def rotate_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.TokenRotateRequest) -> protocol.TokenCreateResponse:
        """The successor of a token (admins only): same identity, name and role, a fresh
        secret and expiry; the old token is revoked in the same transaction.  Works on an
        expired token too (that is how an expired credential is renewed), never on a
        revoked one."""
        entry = self._admin_entry(admin, ctx, "token.rotate", token_id=str(req.token_id)[:64])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.TokenCreateResponse:
            self._require(admin, "rotate tokens", AdminRole.ADMIN)
            old = tx.admin_token_by_id(req.token_id)
            if old is None:
                raise KeyUnavailable(f"unknown token {str(req.token_id)[:64]!r}")
            self.rows.check_token(old)
            if old.revoked_at is not None:
                raise ConflictError(f"token {old.token_id} is revoked; a revoked identity "
                                    f"cannot be rotated (create a new token)")
            now = self.clock()
            lifetime = _lifetime(req.expires_in)
            token = new_admin_token()
            token_hash = admin_token_hash(token)
            record = self.rows.seal_token(AdminTokenRecord(
                admin_token_id(token_hash), old.name, old.role, now,
                principal_id=_principal(old), expires_at=now + lifetime,
                token_hash=token_hash, rotated_from=old.token_id))
            tx.insert_admin_token(record, token_hash)
            revoked = self.rows.seal_token(dataclasses.replace(old, revoked_at=now))
            tx.revoke_admin_token(old.token_id, now, row_mac=revoked.row_mac,
                                  mac_kek=revoked.mac_kek)
            entry.update(new_token_id=record.token_id, token_name=old.name,
                         principal_id=_principal(old), expires_at=record.expires_at)
            return protocol.TokenCreateResponse(token=token, **_token_info(record).model_dump())

        result: protocol.TokenCreateResponse = self._admin_write(entry, body)
        return result

    def list_tokens(self, admin: AdminTokenRecord,
                    ctx: RequestContext) -> list[protocol.TokenInfo]:
        entry = self._admin_entry(admin, ctx, "token.list")

        def body(tx: StoreTx, entry: dict[str, Any]) -> list[protocol.TokenInfo]:
            self._require(admin, "list tokens", AdminRole.ADMIN)
            return [_token_info(t, intact=self.rows.token_ok(t))
                    for t in tx.list_admin_tokens()]

        result: list[protocol.TokenInfo] = self._admin_write(entry, body)
        return result

    def revoke_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     token_id: str) -> protocol.TokenInfo:
        """Revoke a token at once (admins only).  The last valid admin token cannot be
        revoked (that would lock everyone out)."""
        entry = self._admin_entry(admin, ctx, "token.revoke", token_id=str(token_id)[:64])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.TokenInfo:
            self._require(admin, "revoke tokens", AdminRole.ADMIN)
            target = tx.admin_token_by_id(token_id)
            if target is None:
                raise KeyUnavailable(f"unknown token {str(token_id)[:64]!r}")
            if target.revoked_at is not None:
                raise ConflictError(f"token {token_id} is already revoked")
            now = self.clock()
            if target.role == AdminRole.ADMIN and not any(
                    t.role == AdminRole.ADMIN and self._live(t, now)
                    and t.token_id != token_id for t in tx.list_admin_tokens()):
                raise ConflictError("refusing to revoke the last valid admin token")
            # revoking is allowed even for a row that fails its MAC (it only takes rights),
            # but such a row is never sealed: it stays refused and marked as tampered
            revoked = dataclasses.replace(target, revoked_at=now)
            if self.rows.token_ok(target):
                revoked = self.rows.seal_token(revoked)
            else:
                entry["row_intact"] = False
            tx.revoke_admin_token(token_id, now, row_mac=revoked.row_mac,
                                  mac_kek=revoked.mac_kek)
            updated = tx.admin_token_by_id(token_id)
            assert updated is not None
            entry["token_name"] = updated.name
            return _token_info(updated)

        result: protocol.TokenInfo = self._admin_write(entry, body)
        return result

    def read_audit(self, admin: AdminTokenRecord, ctx: RequestContext, *,
                   model_id: str | None = None, since: float | None = None,
                   after_seq: int | None = None,
                   limit: int = 1000) -> protocol.AuditResponse:
        """Audit records in chain order.  Admins and auditors read everything (and get the
        chain head); an owner reads only the records of its own models and actions.
        The read itself is audited."""
        entry = self._admin_entry(admin, ctx, "audit.read", model_id=model_id)

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.AuditResponse:
            self._require(admin, "read the audit log", AdminRole.ADMIN, AdminRole.AUDITOR,
                          AdminRole.OWNER)
            owner = _principal(admin) if admin.role == AdminRole.OWNER else None
            if owner is not None:
                entry["owner"] = owner
            count = max(1, min(int(limit), AUDIT_PAGE_MAX))
            records = tx.audit_records(model_id=model_id, since=since, after_seq=after_seq,
                                       limit=count, owner=owner)
            head = None
            if owner is None:
                seq, digest = tx.audit_head()
                head = {"seq": seq, "hash": digest}
            entry["count"] = len(records)
            return protocol.AuditResponse(
                records=[protocol.AuditRecordModel(**r.body, hash=r.hash) for r in records],
                head=head)

        result: protocol.AuditResponse = self._admin_write(entry, body)
        return result

    # ------------------------------------------------------------------ transparency log

    def _log_reader(self, admin: AdminTokenRecord) -> None:
        # hashes only, no record content: every admin-token role may witness the log
        self._require(admin, "read the transparency log", AdminRole.ADMIN, AdminRole.AUDITOR,
                      AdminRole.OWNER)

    def audit_checkpoint(self, admin: AdminTokenRecord) -> protocol.CheckpointResponse:
        """The current signed checkpoint.  Not audited (it decides nothing, and witnesses
        poll it: an audit record per poll would grow the log it watches)."""
        self._log_reader(admin)
        with self.store.snapshot() as tx:
            cp, note = self.tlog.checkpoint(tx)
        return protocol.CheckpointResponse(checkpoint=note, log_key=self.tlog.verifier.vkey,
                                           size=cp.size,
                                           root=protocol.b64encode(cp.root))

    def audit_inclusion(self, admin: AdminTokenRecord, index: int,
                        size: int | None) -> protocol.InclusionProofResponse:
        """RFC 9162 inclusion proof of leaf ``index`` in the tree of ``size`` leaves
        (default: the current size)."""
        self._log_reader(admin)
        with self.store.snapshot() as tx:
            current = tx.tlog_size()
            size = current if size is None else size
            if not 0 <= index < size <= current:
                raise RequestError(f"no inclusion proof of leaf {index} in a tree of {size} "
                                   f"leaves (the log has {current})")
            proof = tlog.inclusion_proof(tx, index, size)
        return protocol.InclusionProofResponse(leaf_index=index, tree_size=size,
                                               proof=[protocol.b64encode(h) for h in proof])

    def audit_consistency(self, admin: AdminTokenRecord, first: int,
                          second: int | None) -> protocol.ConsistencyProofResponse:
        """RFC 9162 consistency proof between tree sizes ``first`` and ``second`` (default:
        the current size)."""
        self._log_reader(admin)
        with self.store.snapshot() as tx:
            current = tx.tlog_size()
            second = current if second is None else second
            if not 0 <= first <= second <= current:
                raise RequestError(f"no consistency proof from {first} to {second} leaves "
                                   f"(the log has {current}; a smaller size than a saved "
                                   f"checkpoint's means the log was truncated)")
            proof = tlog.consistency_proof(tx, first, second)
        return protocol.ConsistencyProofResponse(
            first=first, second=second, proof=[protocol.b64encode(h) for h in proof])

    def _wrapped(self, key: ModelKey, now: float) -> KeyRecord:
        wrapped, kek_id = self.kek.wrap_with_id(key.secret, model_id=key.model_id,
                                                version=key.version)
        return KeyRecord(key.model_id, key.version, KeyState.ACTIVE, wrapped, kek_id, now)

    # ------------------------------------------------------------------ operations

    def ready(self) -> None:
        self.store.ping()

    def metrics_text(self) -> str:
        """Prometheus text: this replica's counters, and gauges read from the store now."""
        m = self.metrics
        try:
            self.flush_failures()
        except Exception:
            log.exception("metrics: flushing suppressed failures failed")
        try:
            with self.store.snapshot() as tx:
                nonces = tx.count_nonces()
                length, _ = tx.audit_head()
            m.nonces.set(nonces)
            m.audit_length.set(length)
            m.store_up.set(1)
        except Exception as exc:
            log.warning("metrics: store unavailable: %s", exc)
            m.store_up.set(0)
        return m.render()


# ---------------------------------------------------------------------- helpers

_TEE_VALUES = frozenset(t.value for t in Tee)
#: Events whose caller has proven nothing yet (their failures are sampled).
_UNAUTHENTICATED_EVENTS = frozenset({"attest", "attest.challenge"})


def _unauthenticated(entry: dict[str, Any], exc: SealedTorchError) -> bool:
    """A failure of a caller who has not authenticated: malformed requests, attestation
    attempts, bad bearer tokens.  Never an integrity failure, never a caller whose token
    verified (those are always recorded)."""
    if isinstance(exc, StoreIntegrityError):
        return False
    if entry.get("unauthenticated") or entry.get("event") in _UNAUTHENTICATED_EVENTS:
        return True
    return type(exc) is AuthenticationError  # a missing/forged/expired/revoked token


def _token_info(t: AdminTokenRecord, *, intact: bool = True) -> protocol.TokenInfo:
    return protocol.TokenInfo(token_id=t.token_id, name=t.name, role=AdminRole(t.role),
                              created_at=audit.iso(t.created_at),
                              revoked_at=audit.iso(t.revoked_at)
                              if t.revoked_at is not None else None,
                              expires_at=audit.iso(t.expires_at)
                              if t.expires_at is not None else None,
                              principal_id=_principal(t), rotated_from=t.rotated_from,
                              intact=intact)


def _principal(t: AdminTokenRecord) -> str:
    """The token's immutable identity (rows from before migration 3 got their name)."""
    return t.principal_id if t.principal_id is not None else t.name


def _lifetime(expires_in: float | None) -> float:
    if expires_in is None:
        return TOKEN_LIFETIME
    if not 60 <= expires_in <= TOKEN_LIFETIME_MAX:
        raise RequestError(f"expires_in: a token lives between 60 s and "
                           f"{int(TOKEN_LIFETIME_MAX // 86400)} days")
    return float(expires_in)


def _parse_tee(tee: str) -> Tee:
    try:
        return Tee(tee)
    except ValueError:
        raise RequestError(f"unknown tee {str(tee)[:32]!r}: expected one of "
                           f"{', '.join(t.value for t in Tee)}") from None


def _model_id(model_id: str) -> str:
    try:
        return validate_model_id(model_id)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def _model_key(model_id: str, material: protocol.KeyMaterial) -> ModelKey:
    secret = b64decode(material.key, field="key.key", size=crypto.KEY_SIZE)
    try:
        return ModelKey(model_id, material.version, secret)
    except ValueError as exc:
        raise RequestError(f"key: {exc}") from None


def _model_info(model: ModelRecord, keys: list[KeyRecord]) -> protocol.ModelInfo:
    return protocol.ModelInfo(
        model_id=model.model_id, policy=model.policy, policy_digest=model.policy_digest,
        created_at=audit.iso(model.created_at), updated_at=audit.iso(model.updated_at),
        owner=model.owner, versions=[protocol.KeyVersionInfo(
            version=k.version, state=k.state.value, created_at=audit.iso(k.created_at),
            changed_at=audit.iso(k.changed_at) if k.changed_at is not None else None,
            reason=k.reason or None) for k in keys])
