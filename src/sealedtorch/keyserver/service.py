"""The keyserver's logic, independent of HTTP: a thin front over its three services.

:class:`Keyserver` takes its collaborators (store, KEK provider, token signer, verifier
configuration, clock) explicitly, so tests inject a clock and the HTTP layer (:mod:`.app`)
stays a thin translation of JSON to calls.  It builds, and delegates to:

- :class:`~.attestation_service.AttestationService`: challenges, evidence, the deployment's
  attestation policy, attestation-result tokens;
- :class:`~.release_service.ReleaseService`: key release, grants, HPKE sealing, leases and
  transparency-log receipts;
- :class:`~.admin_service.AdminService`: models, policies, rotation, state changes, admin
  tokens, reading the audit and transparency logs, sealing the store's rows;

all sharing one :class:`~.audit_recorder.AuditRecorder` (so one failure budget, one set of
counters) and one :class:`~.rowmac.RowIntegrity`.  Every operation that decides something
writes an audit record; a release or state change writes it *in the same transaction* as
the data it depends on, so a key is never released without its record and a committed
revocation is seen by every later release.  Failures are audited in a separate transaction
after the failed one rolled back, so a refused request changes nothing but the audit log.
The services can be built on their own (tests do, without TLS or HTTP).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import attest
from ..attest.policy import DeploymentPolicy
from ..errors import SealedTorchError
from . import protocol, tlog
from .admin_service import AdminService
from .attestation_service import AttestationService, Challenge, IssuedToken
from .audit_recorder import AuditRecorder, Clock, FailureSampler, RequestContext
from .kek_base import KekProvider
from .metrics import KeyserverMetrics
from .release_service import KeyRelease, ReleaseService
from .rowmac import RowIntegrity
from .store import AdminTokenRecord, KeyState, Store
from .tokens import TokenSigner

log = logging.getLogger("sealedtorch.keyserver")


class Keyserver:
    """Attestation, release and administration of one keyserver, over one store."""

    def __init__(self, *, store: Store, kek: KekProvider, signer: TokenSigner,
                 verifier: attest.VerifierConfig, clock: Clock = time.time,
                 nonce_ttl: float = 60.0, token_ttl: float = 300.0,
                 metrics: KeyserverMetrics | None = None,
                 attestation_policy: DeploymentPolicy | None = None,
                 transparency: tlog.TransparencyLog | None = None) -> None:
        if transparency is None:
            # no data directory (an embedded keyserver): a log key for this process only
            transparency = tlog.TransparencyLog(tlog.Signer.generate())
            log.warning("transparency log: no signing key given; checkpoints are signed "
                        "with a key that lives only in this process (%s)",
                        transparency.verifier.vkey)
        self.store = store
        self.kek = kek
        self.signer = signer
        self.verifier = verifier
        self.clock = clock
        #: Signs checkpoints and builds receipts (:mod:`.tlog`).
        self.tlog = transparency
        self.metrics = metrics or KeyserverMetrics()
        self.recorder = AuditRecorder(store=store, clock=clock, metrics=self.metrics)
        self.rows = RowIntegrity(kek, on_failure=self.recorder.integrity_failure)
        self.attestation = AttestationService(
            store=store, signer=signer, verifier=verifier, recorder=self.recorder,
            metrics=self.metrics, clock=clock, nonce_ttl=nonce_ttl, token_ttl=token_ttl,
            attestation_policy=attestation_policy or DeploymentPolicy())
        self.releases = ReleaseService(
            store=store, kek=kek, signer=signer, rows=self.rows, transparency=transparency,
            recorder=self.recorder, metrics=self.metrics, clock=clock)
        self.admin = AdminService(store=store, kek=kek, rows=self.rows,
                                  transparency=transparency, recorder=self.recorder,
                                  clock=clock)

    # ------------------------------------------------------------------ settings

    @property
    def failures(self) -> FailureSampler:
        """The shared sampler of unauthenticated failures (replaceable, e.g. by tests)."""
        return self.recorder.failures

    @failures.setter
    def failures(self, sampler: FailureSampler) -> None:
        self.recorder.failures = sampler

    @property
    def token_ttl(self) -> float:
        """Lifetime of an attestation-result token, in seconds."""
        return self.attestation.token_ttl

    @property
    def nonce_ttl(self) -> float:
        """Lifetime of a challenge nonce, in seconds."""
        return self.attestation.nonce_ttl

    @property
    def attestation_policy(self) -> DeploymentPolicy:
        """The deployment's own attestation policy, checked before any token is issued."""
        return self.attestation.attestation_policy

    # ------------------------------------------------------------------ audit

    def prepare_store(self, *, allow_upgrade: bool) -> int:
        return self.admin.prepare_store(allow_upgrade=allow_upgrade)

    def record_request_error(self, ctx: RequestContext, event: str,
                             exc: SealedTorchError) -> None:
        self.recorder.record_request_error(ctx, event, exc)

    def flush_failures(self) -> None:
        self.recorder.flush_failures()

    # ------------------------------------------------------------------ attestation

    def challenge(self, tee: str, ctx: RequestContext) -> Challenge:
        return self.attestation.challenge(tee, ctx)

    def attest(self, req: protocol.AttestRequest, ctx: RequestContext) -> IssuedToken:
        return self.attestation.attest(req, ctx)

    # ------------------------------------------------------------------ key release

    def release(self, token: str | None, ctx: RequestContext, *, model_id: str | None = None,
                version: int | None = None) -> list[KeyRelease]:
        return self.releases.release(token, ctx, model_id=model_id, version=version)

    def release_with_receipt(self, token: str | None, ctx: RequestContext, *,
                             model_id: str | None = None, version: int | None = None,
                             since: int | None = None
                             ) -> tuple[list[KeyRelease], dict[str, Any]]:
        return self.releases.release_with_receipt(token, ctx, model_id=model_id,
                                                  version=version, since=since)

    # ------------------------------------------------------------------ administration

    def authenticate_admin(self, token: str | None, ctx: RequestContext,
                           action: str) -> AdminTokenRecord:
        return self.admin.authenticate_admin(token, ctx, action)

    def register(self, admin: AdminTokenRecord, ctx: RequestContext,
                 req: protocol.RegisterRequest) -> protocol.ModelInfo:
        return self.admin.register(admin, ctx, req)

    def set_policy(self, admin: AdminTokenRecord, ctx: RequestContext,
                   req: protocol.PolicyRequest) -> protocol.ModelInfo:
        return self.admin.set_policy(admin, ctx, req)

    def rotate(self, admin: AdminTokenRecord, ctx: RequestContext,
               req: protocol.RotateRequest) -> protocol.RotateResponse:
        return self.admin.rotate(admin, ctx, req)

    def change_state(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.StateChangeRequest,
                     state: KeyState) -> protocol.StateChangeResponse:
        return self.admin.change_state(admin, ctx, req, state)

    def list_models(self, admin: AdminTokenRecord, ctx: RequestContext,
                    model_id: str | None = None) -> list[protocol.ModelInfo]:
        return self.admin.list_models(admin, ctx, model_id)

    def create_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.TokenCreateRequest) -> protocol.TokenCreateResponse:
        return self.admin.create_token(admin, ctx, req)

    def rotate_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     req: protocol.TokenRotateRequest) -> protocol.TokenCreateResponse:
        return self.admin.rotate_token(admin, ctx, req)

    def list_tokens(self, admin: AdminTokenRecord,
                    ctx: RequestContext) -> list[protocol.TokenInfo]:
        return self.admin.list_tokens(admin, ctx)

    def revoke_token(self, admin: AdminTokenRecord, ctx: RequestContext,
                     token_id: str) -> protocol.TokenInfo:
        return self.admin.revoke_token(admin, ctx, token_id)

    def read_audit(self, admin: AdminTokenRecord, ctx: RequestContext, *,
                   model_id: str | None = None, since: float | None = None,
                   after_seq: int | None = None,
                   limit: int = 1000) -> protocol.AuditResponse:
        return self.admin.read_audit(admin, ctx, model_id=model_id, since=since,
                                     after_seq=after_seq, limit=limit)

    def audit_checkpoint(self, admin: AdminTokenRecord) -> protocol.CheckpointResponse:
        return self.admin.audit_checkpoint(admin)

    def audit_inclusion(self, admin: AdminTokenRecord, index: int,
                        size: int | None) -> protocol.InclusionProofResponse:
        return self.admin.audit_inclusion(admin, index, size)

    def audit_consistency(self, admin: AdminTokenRecord, first: int,
                          second: int | None) -> protocol.ConsistencyProofResponse:
        return self.admin.audit_consistency(admin, first, second)

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
