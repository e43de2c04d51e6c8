"""The one exception tree of sealedtorch.

Every failure a user can cause (a bad file, a wrong key, forged evidence, a policy miss)
raises a subclass of :class:`SealedTorchError`, so callers can catch the whole family or a
single reason.  Each class names *what* failed; the message says *why*.  Every class lives
in this module, and each one declares what services need to answer with it: a stable
``problem_type`` (the RFC 9457 problem ``type`` suffix, also used in audit records and
metrics) and a default ``http_status``.  Context that varies per raise (a more specific
status, a ``Retry-After``, reasons kept for the audit log only) is passed to the
constructor as keywords, never attached afterwards.  Code decides with ``isinstance``,
never by comparing ``problem_type`` strings.

The tree (default HTTP status in brackets)::

    SealedTorchError [400]
    ├── ConfigError [400]
    │   └── MeasurementError
    ├── FormatError
    │   └── UnsafeModelError
    ├── IntegrityError [500]
    │   ├── StoreIntegrityError
    │   ├── TransparencyError
    │   │   └── LogInconsistent
    │   ├── LeaseInvalid
    │   └── ModelMismatch
    ├── KeyFileError [422]
    ├── UnsupportedTensorError
    ├── AttestationError [403]
    │   ├── CollateralError
    │   ├── BindingError
    │   │   └── PinMismatch (also an ssl.SSLError: raised inside the TLS handshake)
    │   ├── NonceError
    │   └── KeycacheAttestationError
    ├── PolicyDenied [403]
    ├── PolicyError [422]
    ├── KeyUnavailable [404]
    │   ├── ServiceUnavailable [503]
    │   │   ├── RateLimited [429]
    │   │   ├── KekUnavailable
    │   │   │   ├── KekLoginError
    │   │   │   ├── KekTokenNotFound
    │   │   │   └── KekObjectNotFound
    │   │   └── StoreUnavailable
    │   ├── LeaseExpired [503, transient]
    │   ├── ModelUnloaded [503, transient]
    │   ├── KeycacheUnavailable [503, transient]
    │   ├── UpstreamUnavailable [503, transient]
    │   ├── KeysStale [503, transient]
    │   └── TlsVerificationError
    ├── AuthenticationError [401]
    │   └── ForbiddenError [403]
    ├── RequestError [400]
    │   ├── InvalidRequest
    │   ├── PayloadTooLarge [413]
    │   ├── InferenceFailed
    │   ├── ModelNotFound [404]
    │   └── InferenceError (client side: carries the runtime's HTTP status)
    ├── ConflictError [409]
    ├── QueueFull [503]
    ├── ShuttingDown [503]
    ├── BudgetTimeout [503]
    ├── ModelNotReady [503]
    └── InferenceTimeout [504]

The public classes are re-exported from :mod:`sealedtorch`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attest.evidence import Claims


__all__ = [
    "AttestationError",
    "AuthenticationError",
    "BindingError",
    "BudgetTimeout",
    "CollateralError",
    "ConfigError",
    "ConflictError",
    "ForbiddenError",
    "FormatError",
    "InferenceError",
    "InferenceFailed",
    "InferenceTimeout",
    "IntegrityError",
    "InvalidRequest",
    "KekLoginError",
    "KekObjectNotFound",
    "KekTokenNotFound",
    "KekUnavailable",
    "KeyFileError",
    "KeyUnavailable",
    "KeycacheAttestationError",
    "KeycacheUnavailable",
    "KeysStale",
    "LeaseExpired",
    "LeaseInvalid",
    "LogInconsistent",
    "MeasurementError",
    "ModelMismatch",
    "ModelNotFound",
    "ModelNotReady",
    "ModelUnloaded",
    "NonceError",
    "PayloadTooLarge",
    "PinMismatch",
    "PolicyDenied",
    "PolicyError",
    "QueueFull",
    "RateLimited",
    "RequestError",
    "SealedTorchError",
    "ServiceUnavailable",
    "ShuttingDown",
    "StoreIntegrityError",
    "StoreUnavailable",
    "TlsVerificationError",
    "TransparencyError",
    "UnsafeModelError",
    "UnsupportedTensorError",
    "UpstreamUnavailable",
]


class SealedTorchError(Exception):
    """Base class of every error sealedtorch raises on purpose.

    Keyword arguments carry the context a service needs to answer with this error; they
    are optional so that ``cls(message)`` always works (a client rebuilds errors that way
    from problem responses).
    """

    #: Short stable identifier, used as the RFC 9457 problem ``type`` suffix and in audit logs.
    problem_type: str = "error"
    #: The HTTP status a service answers with (a raiser may pass a more specific one).
    http_status: int = 400
    #: Worth retrying: the source is unreachable or stale, not an answer that says no.
    transient: bool = False

    def __init__(self, message: str = "", *, http_status: int | None = None,
                 retry_after: float | None = None,
                 audit_reasons: Sequence[str] | None = None,
                 problem: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        if http_status is not None:
            self.http_status = http_status
        #: seconds after which a retry may succeed (sent as ``Retry-After``)
        self.retry_after: float | None = retry_after
        #: why it was refused, for the audit log only (never shown to the client)
        self.audit_reasons: tuple[str, ...] | None = (
            None if audit_reasons is None else tuple(str(r) for r in audit_reasons))
        #: the problem document this error was rebuilt from (client side), if any
        self.problem: dict[str, Any] | None = problem


class ConfigError(SealedTorchError):
    """A setting, path or command-line option is missing or invalid."""

    problem_type = "config"
    http_status = 400


class MeasurementError(ConfigError):
    """The code that would run is not the code that is measured: a bytecode cache that
    Python would load instead of its source but that is not that source compiled (planted,
    or built from other code), or a sourceless ``.pyc`` module in a measured tree."""

    problem_type = "measurement"


class FormatError(SealedTorchError):
    """The input is not a sealed file this version understands (magic, version, layout)."""

    problem_type = "format"


class UnsafeModelError(FormatError):
    """A model file would need code to run to be loaded: a pickled entry, a ``torch.export``
    program (whose loader unpickles weights, constants, custom objects and sample inputs),
    or any other content that reaches an unpickler, ``eval`` or an importer.  Refused before
    any of it is read, whoever signed or sealed it."""

    problem_type = "unsafe-model"


class IntegrityError(SealedTorchError):
    """Authentication failed: the data was modified, truncated, reordered or the key is wrong.

    Raised instead of returning anything partially decrypted.
    """

    problem_type = "integrity"
    http_status = 500


class StoreIntegrityError(IntegrityError):
    """A keyserver store row (a model's policy or owner, a key version's state, an admin
    token) fails its MAC under the KEK: it was inserted or changed behind the keyserver's
    back (by someone who can write the database but does not hold the KEK).  The row is
    refused, never used; same problem type as its parent (HTTP 500)."""

    #: which table the refused row is in (``models``, ``key_versions``, ``admin_tokens``)
    table: str = ""

    def __init__(self, message: str = "", *, table: str = "", **context: Any) -> None:
        super().__init__(message, **context)
        self.table = table


class TransparencyError(IntegrityError):
    """A transparency-log receipt, checkpoint or proof does not verify: a bad signature, an
    inclusion proof that does not lead to the signed root, a record that is not the one the
    answer claims.  Nothing it came with is used."""

    problem_type = "transparency"


class LogInconsistent(TransparencyError):
    """A checkpoint is inconsistent with one seen before (the consistency proof fails, the
    log shrank, or the same size has another root): the log's history was rewritten,
    truncated or forked.  Whoever sees it stops trusting that log and says so."""

    problem_type = "log-inconsistent"


class KeyFileError(SealedTorchError):
    """A key file is missing, unreadable, malformed, or would be overwritten."""

    problem_type = "key-file"
    http_status = 422


class UnsupportedTensorError(SealedTorchError):
    """A state_dict holds something the format refuses to seal (e.g. an unknown dtype)."""

    problem_type = "unsupported-tensor"


class AttestationError(SealedTorchError):
    """Evidence did not verify: bad signature, broken chain, untrusted root, expired collateral,
    wrong size, or a report_data binding that does not match."""

    problem_type = "attestation"
    http_status = 403


class CollateralError(AttestationError):
    """Verification collateral (TCB info, CRLs, VCEK, ...) is missing, unreachable or expired."""

    problem_type = "collateral"


class BindingError(AttestationError):
    """Evidence verified, but its report_data does not bind the expected nonce and public key.

    ``claims`` are the verified claims when the evidence was appraised here (for the audit
    record: the evidence was genuine, it answered another challenge); None otherwise."""

    problem_type = "binding"

    def __init__(self, message: str = "", *, claims: Claims | None = None,
                 **context: Any) -> None:
        super().__init__(message, **context)
        self.claims = claims


class NonceError(AttestationError):
    """A nonce is unknown, expired, or was already used."""

    problem_type = "nonce"


class PolicyDenied(SealedTorchError):
    """Verified claims do not satisfy the policy; ``reasons`` lists every mismatch."""

    problem_type = "policy-denied"
    http_status = 403

    def __init__(self, message: str = "", reasons: Sequence[str] = (), **context: Any) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        detail = message if not self.reasons else f"{message}: " + "; ".join(self.reasons)
        super().__init__(detail, **context)


class PolicyError(SealedTorchError):
    """A policy document is malformed (this is the author's mistake, not a denial)."""

    problem_type = "policy-invalid"
    http_status = 422


class KeyUnavailable(SealedTorchError):
    """No key can be had for this model/version: unknown, revoked, retired, or source down."""

    problem_type = "key-unavailable"
    http_status = 404


class AuthenticationError(SealedTorchError):
    """A bearer token (admin or attestation result) is missing, forged, expired or revoked."""

    problem_type = "unauthorized"
    http_status = 401


class RequestError(SealedTorchError):
    """A service request is malformed: invalid JSON, a missing or ill-typed field, a body
    that is too large.  The caller's (or client library's) mistake, never a denial."""

    problem_type = "bad-request"
    http_status = 400


class ConflictError(SealedTorchError):
    """The request contradicts stored state: a model id or key version that already exists,
    or a key version that is already revoked or retired."""

    problem_type = "conflict"
    http_status = 409


class ForbiddenError(AuthenticationError):
    """A valid admin token whose role does not allow this operation (an auditor trying to
    register a model, an owner managing tokens)."""

    problem_type = "forbidden"
    http_status = 403


class ServiceUnavailable(KeyUnavailable):
    """A service cannot answer right now (its database is unreachable, it is overloaded):
    nothing was decided; retry later."""

    problem_type = "unavailable"
    http_status = 503


class RateLimited(ServiceUnavailable):
    """Too many requests from this client; retry after the time the service names."""

    problem_type = "rate-limited"
    http_status = 429


class LeaseInvalid(IntegrityError):
    """A key lease from the keyserver does not verify: bad signature, another signing key
    than the one this keycache pinned, or a lease for another model, version, policy or
    holder than the key it came with.  The key is not taken into service."""

    problem_type = "lease-invalid"


class LeaseExpired(KeyUnavailable):
    """The keycache holds no current lease for this key: its keyserver-signed lease ended
    (measured on the keycache's monotonic clock) before a refresh renewed it.  Transient:
    the next successful refresh from the keyserver restores service."""

    problem_type = "lease-expired"
    http_status = 503
    transient = True


class ModelUnloaded(KeyUnavailable):
    """The runtime unloaded a model it was serving because the keycache no longer holds its
    key (revoked, lease ended, keycache refused or unreachable past the grace period)."""

    problem_type = "model-unloaded"
    http_status = 503
    transient = True


class TlsVerificationError(KeyUnavailable):
    """The service's TLS certificate did not verify against the CA we were given (or the
    system store, when none was): usually a missing or wrong ``--ca`` file, possibly someone
    in between.  Nothing was sent."""

    problem_type = "tls-verification"


class KeycacheAttestationError(AttestationError):
    """The runtime could not authenticate the keycache that answered its key request: the
    answer carries no keycache evidence, the evidence does not verify or is not bound to the
    runtime's nonce and the answer's signing key, the signature over the answer does not
    verify, or the keycache's claims match no ``keycache`` rule of the runtime's measured
    configuration (``reasons`` lists every mismatch).  The key is not used."""

    problem_type = "keycache-attestation"

    def __init__(self, message: str = "", reasons: Sequence[str] = (), **context: Any) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        detail = message if not self.reasons else f"{message}: " + "; ".join(self.reasons)
        super().__init__(detail, **context)


class ModelMismatch(IntegrityError):
    """A sealed file (or an attested runtime) is not the model the measured configuration
    (or the client) pins for that served name: another model id, a key version below the
    minimum, or another file digest.  Raised before any key is requested or data decrypted."""

    problem_type = "model-mismatch"


class PinMismatch(BindingError, ssl.SSLError):
    """The server presented a TLS key other than the pinned (attested) one.  Also an
    :class:`ssl.SSLError`, because it is raised inside the TLS handshake, where HTTP
    clients expect one; nothing is sent on such a connection."""

    problem_type = "tls-pin-mismatch"
    __str__ = BaseException.__str__  # the message, not OSError's (errno, strerror) tuple


# --- the keyserver's KEK and store --------------------------------------------------------

class KekUnavailable(ServiceUnavailable):
    """A KEK cannot be used: its provider is misconfigured, unreachable or refuses us.
    Nothing is released or stored when this is raised (HTTP 503: retry once the operator
    has fixed it)."""


class KekLoginError(KekUnavailable):
    """The token refused the PIN (wrong, locked or expired)."""


class KekTokenNotFound(KekUnavailable):
    """No token (or PKCS#11 module) matches the KEK's URI."""


class KekObjectNotFound(KekUnavailable):
    """The token holds no key object matching the KEK's URI, or more than one."""


class StoreUnavailable(ServiceUnavailable):
    """The database did not answer (same problem type as its parent, HTTP 503): nothing
    was decided, and there is no point trying to audit the refusal in it."""


# --- the keycache -------------------------------------------------------------------------

class KeycacheUnavailable(KeyUnavailable):
    """The keycache cannot be reached on its socket, or answered outside the protocol."""

    problem_type = "keycache-unavailable"
    http_status = 503
    transient = True


class UpstreamUnavailable(KeyUnavailable):
    """The keyserver could not be reached, or answered something that is not the protocol."""

    problem_type = "keyserver-unavailable"
    http_status = 503
    transient = True


class KeysStale(KeyUnavailable):
    """The keycache refuses to serve: it has not refreshed from the keyserver for longer than
    its max-stale limit (or has never managed to fetch anything)."""

    problem_type = "keycache-stale"
    http_status = 503
    transient = True


# --- the runtime --------------------------------------------------------------------------

class InvalidRequest(RequestError):
    """A malformed inference request (HTTP 400)."""


class PayloadTooLarge(RequestError):
    """A request over the configured size limits (HTTP 413)."""

    problem_type = "payload-too-large"
    http_status = 413


class InferenceFailed(RequestError):
    """The model raised on this input (shapes the signature allows but the model does not,
    token ids out of range, ...).  HTTP 400."""

    problem_type = "inference-failed"


class QueueFull(SealedTorchError):
    """Too many requests are waiting for this model (HTTP 503, retry later)."""

    problem_type = "queue-full"
    http_status = 503


class ShuttingDown(SealedTorchError):
    """The runtime is draining for shutdown (HTTP 503)."""

    problem_type = "shutting-down"
    http_status = 503


class BudgetTimeout(SealedTorchError):
    """No room in the request-body byte budget within the wait; the request gets 503 and
    ``Retry-After``."""

    problem_type = "busy"
    http_status = 503


class ModelNotFound(RequestError):
    """The runtime serves no model of that name, or not that version (HTTP 404)."""

    problem_type = "model-not-found"
    http_status = 404


class ModelNotReady(SealedTorchError):
    """The model is served here but cannot answer now: still loading, failed to load, or
    unloaded by the key watcher (HTTP 503; the message says which and why)."""

    problem_type = "model-not-ready"
    http_status = 503


class InferenceTimeout(SealedTorchError):
    """Inference did not finish within ``request_timeout_s`` (HTTP 504)."""

    problem_type = "inference-timeout"
    http_status = 504


class InferenceError(RequestError):
    """The runtime refused or failed a request (client side); ``http_status`` is the HTTP
    status it answered with (0 when no answer came)."""

    def __init__(self, status: int, message: str, **context: Any) -> None:
        super().__init__(f"HTTP {status}: {message}", http_status=status, **context)
