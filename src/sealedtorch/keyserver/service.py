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
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import attest, crypto
from ..attest import binding
from ..attest.evidence import Claims, Evidence, Tee
from ..attest.policy import Decision, Policy, load_policy
from ..errors import (
    AttestationError,
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    KeyUnavailable,
    PolicyDenied,
    RequestError,
    SealedTorchError,
    ServiceUnavailable,
)
from ..keys import ModelKey, validate_model_id
from . import audit, protocol, tlog
from .audit import ALLOW, DENY, ERROR, OK
from .kek import KekProvider
from .metrics import KeyserverMetrics
from .problems import with_status
from .protocol import AdminRole, Role, b64decode
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
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


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

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "version": self.version,
                "sealed_key": protocol.b64encode(self.sealed),
                "hpke_suite": protocol.HPKE_SUITE_NAME, "policy": self.policy,
                "policy_digest": self.policy_digest}


@dataclass(frozen=True)
class _Grant:
    model: ModelRecord
    key: KeyRecord
    secret: bytes


def _fail_reasons(exc: SealedTorchError) -> list[str]:
    private = getattr(exc, "audit_reasons", None)  # for the audit log only, not the client
    if isinstance(private, list):
        return [str(r) for r in private]
    if isinstance(exc, PolicyDenied) and exc.reasons:
        return list(exc.reasons)
    return [str(exc)]


class Keyserver:
    def __init__(self, *, store: Store, kek: KekProvider, signer: TokenSigner,
                 verifier: attest.VerifierConfig, clock: Clock = time.time,
                 nonce_ttl: float = 60.0, token_ttl: float = 300.0,
                 metrics: KeyserverMetrics | None = None,
                 transparency: tlog.TransparencyLog | None = None) -> None:
        self.store = store
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

    # ------------------------------------------------------------------ audit helpers

    def _entry(self, ctx: RequestContext, event: str, **fields: Any) -> dict[str, Any]:
        return {"time": self.clock(), "event": event, "client": ctx.client,
                "request_id": ctx.request_id, **fields}

    def _audit(self, entry: dict[str, Any]) -> None:
        with self.store.transaction() as tx:
            tx.append_audit(entry)

    def _audit_failure(self, entry: dict[str, Any], exc: SealedTorchError) -> None:
        entry.update(decision=ERROR if exc.problem_type in ("integrity", "internal") else DENY,
                     problem=exc.problem_type, reasons=_fail_reasons(exc))
        if isinstance(exc, StoreUnavailable):
            # nothing was decided, and the store cannot take a record anyway
            self.metrics.unavailable.inc()
            log.warning("%s: %s", entry.get("event"), exc,
                        extra={"fields": {"event": entry.get("event"), "problem":
                                          exc.problem_type,
                                          "request_id": entry.get("request_id")}})
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
        JSON, an oversized body, ...)."""
        self._audit_failure(self._entry(ctx, event), exc)

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
            claims = self._verify(evidence, now)
            entry["claims"] = claims.to_json()
            entry["insecure"] = claims.insecure
            binding.check(claims.report_data, nonce, public_key)
            token, info = self.signer.issue(
                claims=claims, public_key=public_key, role=req.role,
                evidence_digest=entry["evidence_digest"], now=now, ttl=self.token_ttl)
            entry.update(decision=OK, token_id=info.token_id,
                         reasons=["evidence verified and bound to nonce and key"])
            with self.store.transaction() as tx:
                tx.consume_nonce(nonce, tee.value, self.clock())
                tx.append_audit(entry)
        except SealedTorchError as exc:
            if nonce and exc.problem_type not in ("nonce", "bad-request", "unavailable"):
                self._burn(nonce)
            self._audit_failure(entry, exc)
            raise
        self._log(entry)
        return IssuedToken(token, info)

    def _burn(self, nonce: bytes) -> None:
        """A nonce is spent by any attempt that got as far as verification."""
        try:
            with self.store.transaction() as tx:
                tx.burn_nonce(nonce, self.clock())
        except Exception:
            log.exception("could not burn a nonce after a failed attestation")

    def _verify(self, evidence: Evidence, now: float) -> Claims:
        try:
            return attest.verify(evidence, at=now, config=self.verifier)
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
        return SealedKey(grant.model.model_id, grant.key.version, sealed, grant.model.policy,
                         grant.model.policy_digest)

    def _unwrap(self, key: KeyRecord) -> bytes:
        if key.wrapped is None:
            raise with_status(KeyUnavailable(
                f"model {key.model_id!r} version {key.version}: key material erased"), 410)
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
                    entry.update(decision=ERROR if exc.problem_type == "integrity" else DENY,
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
            raise KeyUnavailable(f"unknown model {model_id!r}")
        entry.update(policy_digest=model.policy_digest, owner=model.owner)
        decision = self._decide(model, tok)
        entry["reasons"] = list(decision.reasons)
        decision.raise_if_denied()
        keys = tx.key_versions(model_id)
        if version is not None:
            key = next((k for k in keys if k.version == version), None)
            if key is None:
                raise KeyUnavailable(f"model {model_id!r} has no key version {version}")
            if key.state is not KeyState.ACTIVE:
                raise with_status(KeyUnavailable(
                    f"model {model_id!r} key version {version} is {key.state.value}"
                    + (f": {key.reason}" if key.reason else "")), 410)
        else:
            active = [k for k in keys if k.state is KeyState.ACTIVE]
            if not active:
                states = sorted({k.state.value for k in keys})
                raise with_status(KeyUnavailable(
                    f"model {model_id!r} has no active key: every version is "
                    f"{' or '.join(states)}"), 410)
            key = active[-1]
        entry["version"] = key.version
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
                    rec = dict(entry, model_id=model.model_id, owner=model.owner,
                               versions=[k.version for k in active],
                               policy_digest=model.policy_digest, reasons=list(decision.reasons))
                    try:
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
        if failure is not None:
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
            if record.revoked_at is not None:
                raise AuthenticationError(f"admin token {record.token_id} was revoked")
        except AuthenticationError as exc:
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

    @staticmethod
    def _owned(tx: StoreTx, who: AdminTokenRecord, model_id: str,
               entry: dict[str, Any]) -> ModelRecord:
        """The model, if this token may manage it.  For an owner, another owner's model
        is indistinguishable from an unknown one (same 404, same text); the audit record of
        the attempt says what happened and is readable by admins and auditors only."""
        model = tx.get_model(model_id)
        if model is not None and (who.role != AdminRole.OWNER or model.owner == who.name):
            entry["owner"] = model.owner
            return model
        exc = KeyUnavailable(f"unknown model {str(model_id)[:128]!r}")
        if model is not None:
            exc.audit_reasons = [  # type: ignore[attr-defined]
                f"model {model_id!r} belongs to another owner; answered as unknown"]
        raise exc

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
                exc = ConflictError(
                    f"model id {model_id!r} is already registered (model ids are unique on "
                    f"a keyserver: if it is not yours, choose another)")
                if existing.owner == admin.name:
                    entry["owner"] = admin.name
                else:
                    exc.audit_reasons = [  # type: ignore[attr-defined]
                        f"model {model_id!r} belongs to another owner"]
                raise exc
            now = self.clock()
            owner = admin.name if admin.role == AdminRole.OWNER else None
            model = ModelRecord(model_id, policy.to_json(), policy.digest(), now, now, owner)
            tx.insert_model(model)
            tx.insert_key(self._wrapped(key, now))
            entry.update(version=key.version, policy_digest=model.policy_digest, owner=owner)
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
            tx.update_policy(model.model_id, policy.to_json(), policy.digest(), self.clock())
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
            tx.insert_key(self._wrapped(key, now))
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
                tx.set_key_state(model.model_id, key.version, state, now, req.reason,
                                 erase=state is KeyState.RETIRED)
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
                entry["owner"] = admin.name
                models = tx.list_models(owner=admin.name)
            else:
                models = tx.list_models()
            return [_model_info(m, tx.key_versions(m.model_id)) for m in models]

        result: list[protocol.ModelInfo] = self._admin_write(entry, body)
        return result

    # ------------------------------------------------------------------ tokens and audit

    def create_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.TokenCreateRequest) -> protocol.TokenCreateResponse:
        """A new admin/owner/auditor token (admins only).  The token is in the answer once;
        the store keeps its hash.  Owner tokens with the same name manage the same models
        (a second token for an owner is how its credentials are rotated)."""
        entry = self._admin_entry(admin, ctx, "token.create", token_role=str(req.role),
                                  token_name=str(req.name)[:64])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.TokenCreateResponse:
            self._require(admin, "create tokens", AdminRole.ADMIN)
            role = AdminRole(req.role)
            if not _TOKEN_NAME.match(req.name):
                raise RequestError("token name: 1-64 characters, letters, digits and ._@- "
                                   "(starting with a letter or digit)")
            clash = next((t for t in tx.list_admin_tokens()
                          if t.name == req.name and t.role != role), None)
            if clash is not None:
                raise ConflictError(f"the name {req.name!r} already belongs to a {clash.role} "
                                    f"token; one name, one role")
            token = new_admin_token()
            token_hash = admin_token_hash(token)
            record = AdminTokenRecord(admin_token_id(token_hash), req.name, role.value,
                                      self.clock())
            tx.insert_admin_token(record, token_hash)
            entry["token_id"] = record.token_id
            return protocol.TokenCreateResponse(token=token, **_token_info(record).model_dump())

        result: protocol.TokenCreateResponse = self._admin_write(entry, body)
        return result

    def list_tokens(self, admin: AdminTokenRecord,
                    ctx: RequestContext) -> list[protocol.TokenInfo]:
        entry = self._admin_entry(admin, ctx, "token.list")

        def body(tx: StoreTx, entry: dict[str, Any]) -> list[protocol.TokenInfo]:
            self._require(admin, "list tokens", AdminRole.ADMIN)
            return [_token_info(t) for t in tx.list_admin_tokens()]

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
            if target.role == AdminRole.ADMIN and not any(
                    t.role == AdminRole.ADMIN and t.revoked_at is None
                    and t.token_id != token_id for t in tx.list_admin_tokens()):
                raise ConflictError("refusing to revoke the last valid admin token")
            tx.revoke_admin_token(token_id, self.clock())
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
            owner = admin.name if admin.role == AdminRole.OWNER else None
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


def _token_info(t: AdminTokenRecord) -> protocol.TokenInfo:
    return protocol.TokenInfo(token_id=t.token_id, name=t.name, role=AdminRole(t.role),
                              created_at=audit.iso(t.created_at),
                              revoked_at=audit.iso(t.revoked_at)
                              if t.revoked_at is not None else None)


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
