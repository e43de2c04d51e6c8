"""Administration: models, policies, key rotation and state changes, admin tokens, and
reading the audit log and the transparency log.

Every operation authenticates an admin token (:meth:`AdminService.authenticate_admin`),
then runs in one transaction that also appends its audit record (:meth:`AdminService._write`),
so a change is never committed without its record; a refused one is audited on its own
after the rollback.  The role check runs inside that transaction, so a forbidden attempt is
audited under the operation's own event.

Admin tokens have a role (:class:`~.protocol.AdminRole`): ``admin`` may do everything,
``auditor`` only read the audit log, and ``owner`` manages only the models it registered.
To an owner, another owner's model does not exist: every operation on it answers
``404 key-unavailable`` exactly as for an unknown id, and the attempt is audited in a record
only admins and auditors can read.  Each audit record carries the ``owner`` of the model it
concerns, which decides which owner may read it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import crypto
from ..attest.policy import load_policy
from ..errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    KeyUnavailable,
    RequestError,
    SealedTorchError,
    StoreIntegrityError,
)
from ..keys import ModelKey, validate_model_id
from . import audit, protocol, tlog
from .audit import OK
from .audit_recorder import AuditRecorder, Clock, RequestContext
from .kek_base import KekProvider
from .protocol import AdminRole, b64decode
from .rowmac import META_KEY, RowIntegrity, seal_all
from .store import AdminTokenRecord, KeyRecord, KeyState, ModelRecord, Store, StoreTx
from .tokens import admin_token_hash, admin_token_id, new_admin_token

log = logging.getLogger("sealedtorch.keyserver")

#: Audit records one ``GET /v1/admin/audit`` answers at most.
AUDIT_PAGE_MAX = 10_000
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: Default lifetime of an admin, owner or auditor token (``tokens create --expires``).
TOKEN_LIFETIME = 90 * 86400.0
#: The longest lifetime a token may be given.
TOKEN_LIFETIME_MAX = 5 * 365 * 86400.0


@dataclass(kw_only=True, eq=False)
class AdminService:
    """The admin API's operations, each authorised by an admin token's record."""

    store: Store
    kek: KekProvider
    rows: RowIntegrity
    #: Signs checkpoints (:mod:`.tlog`).
    transparency: tlog.TransparencyLog
    recorder: AuditRecorder
    clock: Clock = time.time

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
                    self.recorder.integrity_failure("meta")
                    raise StoreIntegrityError("the store's row-MAC marker fails its MAC "
                                              "under the KEK (changed behind the "
                                              "keyserver's back, or another KEK)",
                                              table="meta")
                return 0
            if not allow_upgrade:
                self.recorder.integrity_failure("meta")
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

    # ------------------------------------------------------------------ authentication

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
            self.recorder.failure(self.recorder.entry(ctx, "admin.denied", action=action), exc)
            raise
        return record

    def _write(self, entry: dict[str, Any],
               body: Callable[[StoreTx, dict[str, Any]], Any]) -> Any:
        """Run ``body`` and append ``entry`` in one transaction (a change is never
        committed without its record); a refusal is audited on its own after the
        rollback."""
        try:
            with self.store.transaction() as tx:
                result = body(tx, entry)
                entry.setdefault("decision", OK)
                tx.append_audit(entry)
        except SealedTorchError as exc:
            self.recorder.failure(entry, exc)
            raise
        self.recorder.log(entry)
        return result

    def _entry(self, who: AdminTokenRecord, ctx: RequestContext, event: str,
               **fields: Any) -> dict[str, Any]:
        return self.recorder.entry(ctx, event, actor=who.token_id, actor_role=who.role, **fields)

    # ------------------------------------------------------------------ models

    def _owned(self, tx: StoreTx, who: AdminTokenRecord, model_id: str,
               entry: dict[str, Any]) -> ModelRecord:
        """The model, if this token may manage it.  For an owner, another owner's model
        is indistinguishable from an unknown one (same 404, same text); the audit record of
        the attempt says what happened and is readable by admins and auditors only."""
        model = tx.get_model(model_id)
        if model is not None and (who.role != AdminRole.OWNER
                                  or model.owner_id == principal_of(who)):
            entry["owner"] = model.owner_id
            return self.rows.check_model(model)
        raise KeyUnavailable(f"unknown model {str(model_id)[:128]!r}", audit_reasons=None
                             if model is None else [f"model {model_id!r} belongs to another "
                                                    f"owner; answered as unknown"])

    def register(self, admin: AdminTokenRecord, ctx: RequestContext,
                 req: protocol.RegisterRequest) -> protocol.ModelInfo:
        entry = self._entry(admin, ctx, "register", model_id=str(req.model_id)[:128])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.ModelInfo:
            require_role(admin, "register models", AdminRole.ADMIN, AdminRole.OWNER)
            model_id = _model_id(req.model_id)
            key = _model_key(model_id, req.key)
            policy = load_policy(req.policy)
            existing = tx.get_model(model_id)
            if existing is not None:
                if admin.role != AdminRole.OWNER:
                    raise ConflictError(f"model {model_id!r} is already registered; use "
                                        f"`keys rotate` for a new key or `keys policy set`")
                mine = existing.owner_id == principal_of(admin)
                if mine:
                    entry["owner"] = existing.owner_id
                raise ConflictError(
                    f"model id {model_id!r} is already registered (model ids are unique on "
                    f"a keyserver: if it is not yours, choose another)", audit_reasons=None
                    if mine else [f"model {model_id!r} belongs to another owner"])
            now = self.clock()
            owner = admin.name if admin.role == AdminRole.OWNER else None
            owner_id = principal_of(admin) if admin.role == AdminRole.OWNER else None
            model = self.rows.seal_model(ModelRecord(model_id, policy.to_json(),
                                                     policy.digest(), now, now, owner,
                                                     owner_id))
            tx.insert_model(model)
            tx.insert_key(self.rows.seal_key(self._wrapped(key, now)))
            entry.update(version=key.version, policy_digest=model.policy_digest,
                         owner=owner_id)
            return _model_info(model, tx.key_versions(model_id))

        result: protocol.ModelInfo = self._write(entry, body)
        return result

    def set_policy(self, admin: AdminTokenRecord, ctx: RequestContext,
                   req: protocol.PolicyRequest) -> protocol.ModelInfo:
        entry = self._entry(admin, ctx, "policy.set", model_id=str(req.model_id)[:128])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.ModelInfo:
            require_role(admin, "change policies", AdminRole.ADMIN, AdminRole.OWNER)
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

        result: protocol.ModelInfo = self._write(entry, body)
        return result

    def rotate(self, admin: AdminTokenRecord, ctx: RequestContext,
               req: protocol.RotateRequest) -> protocol.RotateResponse:
        """Add a key version: uploaded (``key``) or generated here and returned HPKE-sealed
        to ``recipient_public_key``.  Older versions stay active until revoked or retired."""
        entry = self._entry(admin, ctx, "rotate", model_id=str(req.model_id)[:128])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.RotateResponse:
            require_role(admin, "rotate keys", AdminRole.ADMIN, AdminRole.OWNER)
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

        result: protocol.RotateResponse = self._write(entry, body)
        return result

    def change_state(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.StateChangeRequest,
                     state: KeyState) -> protocol.StateChangeResponse:
        """Revoke (stop releasing) or retire (stop releasing and erase) one version or all."""
        event = "revoke" if state is KeyState.REVOKED else "retire"
        entry = self._entry(admin, ctx, event, model_id=str(req.model_id)[:128],
                                  version=req.version, reason=req.reason or None)

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.StateChangeResponse:
            require_role(admin, f"{event} keys", AdminRole.ADMIN, AdminRole.OWNER)
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

        result: protocol.StateChangeResponse = self._write(entry, body)
        return result

    def list_models(self, admin: AdminTokenRecord, ctx: RequestContext,
                    model_id: str | None = None) -> list[protocol.ModelInfo]:
        entry = self._entry(admin, ctx, "admin.list" if model_id is None else "admin.get",
                                  model_id=model_id)

        def body(tx: StoreTx, entry: dict[str, Any]) -> list[protocol.ModelInfo]:
            require_role(admin, "read models", AdminRole.ADMIN, AdminRole.OWNER)
            if model_id is not None:
                models = [self._owned(tx, admin, model_id, entry)]
            elif admin.role == AdminRole.OWNER:
                entry["owner"] = principal_of(admin)
                models = tx.list_models(owner_id=principal_of(admin))
            else:
                models = tx.list_models()
            for m in models:
                self.rows.check_model(m)
            return [_model_info(m, tx.key_versions(m.model_id)) for m in models]

        result: list[protocol.ModelInfo] = self._write(entry, body)
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
        entry = self._entry(admin, ctx, "token.create", token_role=str(req.role),
                                  token_name=str(req.name)[:64])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.TokenCreateResponse:
            require_role(admin, "create tokens", AdminRole.ADMIN)
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
                principal = principal_of(live)
            else:
                taken = {principal_of(t) for t in existing}
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

        result: protocol.TokenCreateResponse = self._write(entry, body)
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
        entry = self._entry(admin, ctx, "token.rotate", token_id=str(req.token_id)[:64])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.TokenCreateResponse:
            require_role(admin, "rotate tokens", AdminRole.ADMIN)
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
                principal_id=principal_of(old), expires_at=now + lifetime,
                token_hash=token_hash, rotated_from=old.token_id))
            tx.insert_admin_token(record, token_hash)
            revoked = self.rows.seal_token(dataclasses.replace(old, revoked_at=now))
            tx.revoke_admin_token(old.token_id, now, row_mac=revoked.row_mac,
                                  mac_kek=revoked.mac_kek)
            entry.update(new_token_id=record.token_id, token_name=old.name,
                         principal_id=principal_of(old), expires_at=record.expires_at)
            return protocol.TokenCreateResponse(token=token, **_token_info(record).model_dump())

        result: protocol.TokenCreateResponse = self._write(entry, body)
        return result

    def list_tokens(self, admin: AdminTokenRecord,
                    ctx: RequestContext) -> list[protocol.TokenInfo]:
        entry = self._entry(admin, ctx, "token.list")

        def body(tx: StoreTx, entry: dict[str, Any]) -> list[protocol.TokenInfo]:
            require_role(admin, "list tokens", AdminRole.ADMIN)
            return [_token_info(t, intact=self.rows.token_ok(t))
                    for t in tx.list_admin_tokens()]

        result: list[protocol.TokenInfo] = self._write(entry, body)
        return result

    def revoke_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     token_id: str) -> protocol.TokenInfo:
        """Revoke a token at once (admins only).  The last valid admin token cannot be
        revoked (that would lock everyone out)."""
        entry = self._entry(admin, ctx, "token.revoke", token_id=str(token_id)[:64])

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.TokenInfo:
            require_role(admin, "revoke tokens", AdminRole.ADMIN)
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

        result: protocol.TokenInfo = self._write(entry, body)
        return result

    def read_audit(self, admin: AdminTokenRecord, ctx: RequestContext, *,
                   model_id: str | None = None, since: float | None = None,
                   after_seq: int | None = None,
                   limit: int = 1000) -> protocol.AuditResponse:
        """Audit records in chain order.  Admins and auditors read everything (and get the
        chain head); an owner reads only the records of its own models and actions.
        The read itself is audited."""
        entry = self._entry(admin, ctx, "audit.read", model_id=model_id)

        def body(tx: StoreTx, entry: dict[str, Any]) -> protocol.AuditResponse:
            require_role(admin, "read the audit log", AdminRole.ADMIN, AdminRole.AUDITOR,
                          AdminRole.OWNER)
            owner = principal_of(admin) if admin.role == AdminRole.OWNER else None
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

        result: protocol.AuditResponse = self._write(entry, body)
        return result

    # ------------------------------------------------------------------ transparency log

    def _log_reader(self, admin: AdminTokenRecord) -> None:
        # hashes only, no record content: every admin-token role may witness the log
        require_role(admin, "read the transparency log", AdminRole.ADMIN, AdminRole.AUDITOR,
                      AdminRole.OWNER)

    def audit_checkpoint(self, admin: AdminTokenRecord) -> protocol.CheckpointResponse:
        """The current signed checkpoint.  Not audited (it decides nothing, and witnesses
        poll it: an audit record per poll would grow the log it watches)."""
        self._log_reader(admin)
        with self.store.snapshot() as tx:
            cp, note = self.transparency.checkpoint(tx)
        return protocol.CheckpointResponse(checkpoint=note, log_key=self.transparency.verifier.vkey,
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


def require_role(who: AdminTokenRecord, action: str, *roles: AdminRole) -> None:
    """Refuse (403) a token whose role is not one of ``roles``."""
    if who.role not in roles:
        raise ForbiddenError(f"a {who.role} token may not {action} (needs "
                             f"{' or '.join(r.value for r in roles)})")


def _token_info(t: AdminTokenRecord, *, intact: bool = True) -> protocol.TokenInfo:
    return protocol.TokenInfo(token_id=t.token_id, name=t.name, role=AdminRole(t.role),
                              created_at=audit.iso(t.created_at),
                              revoked_at=audit.iso(t.revoked_at)
                              if t.revoked_at is not None else None,
                              expires_at=audit.iso(t.expires_at)
                              if t.expires_at is not None else None,
                              principal_id=principal_of(t), rotated_from=t.rotated_from,
                              intact=intact)


def principal_of(t: AdminTokenRecord) -> str:
    """The token's immutable identity (rows from before migration 3 got their name)."""
    return t.principal_id if t.principal_id is not None else t.name


def _lifetime(expires_in: float | None) -> float:
    if expires_in is None:
        return TOKEN_LIFETIME
    if not 60 <= expires_in <= TOKEN_LIFETIME_MAX:
        raise RequestError(f"expires_in: a token lives between 60 s and "
                           f"{int(TOKEN_LIFETIME_MAX // 86400)} days")
    return float(expires_in)


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
