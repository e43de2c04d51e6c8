"""The one exception tree of sealedtorch.

Every failure a user can cause (a bad file, a wrong key, forged evidence, a policy miss)
raises a subclass of :class:`SealedTorchError`, so callers can catch the whole family or a
single reason.  Each class names *what* failed; the message says *why*.  Services map these
classes to stable problem types (``problem_type``) so HTTP clients see the same taxonomy.
"""

from __future__ import annotations

from collections.abc import Sequence


class SealedTorchError(Exception):
    """Base class of every error sealedtorch raises on purpose."""

    #: Short stable identifier, used as the RFC 7807 problem ``type`` suffix and in audit logs.
    problem_type: str = "error"


class ConfigError(SealedTorchError):
    """A setting, path or command-line option is missing or invalid."""

    problem_type = "config"


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


class StoreIntegrityError(IntegrityError):
    """A keyserver store row (a model's policy or owner, a key version's state, an admin
    token) fails its MAC under the KEK: it was inserted or changed behind the keyserver's
    back (by someone who can write the database but does not hold the KEK).  The row is
    refused, never used; same problem type as its parent (HTTP 500)."""

    #: which table the refused row is in (``models``, ``key_versions``, ``admin_tokens``)
    table: str = ""

    def __init__(self, message: str, *, table: str = "") -> None:
        super().__init__(message)
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


class UnsupportedTensorError(SealedTorchError):
    """A state_dict holds something the format refuses to seal (e.g. an unknown dtype)."""

    problem_type = "unsupported-tensor"


class AttestationError(SealedTorchError):
    """Evidence did not verify: bad signature, broken chain, untrusted root, expired collateral,
    wrong size, or a report_data binding that does not match."""

    problem_type = "attestation"


class CollateralError(AttestationError):
    """Verification collateral (TCB info, CRLs, VCEK, ...) is missing, unreachable or expired."""

    problem_type = "collateral"


class BindingError(AttestationError):
    """Evidence verified, but its report_data does not bind the expected nonce and public key."""

    problem_type = "binding"


class NonceError(AttestationError):
    """A nonce is unknown, expired, or was already used."""

    problem_type = "nonce"


class PolicyDenied(SealedTorchError):
    """Verified claims do not satisfy the policy; ``reasons`` lists every mismatch."""

    problem_type = "policy-denied"

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        detail = message if not self.reasons else f"{message}: " + "; ".join(self.reasons)
        super().__init__(detail)


class PolicyError(SealedTorchError):
    """A policy document is malformed (this is the author's mistake, not a denial)."""

    problem_type = "policy-invalid"


class KeyUnavailable(SealedTorchError):
    """No key can be had for this model/version: unknown, revoked, retired, or source down."""

    problem_type = "key-unavailable"


class AuthenticationError(SealedTorchError):
    """A bearer token (admin or attestation result) is missing, forged, expired or revoked."""

    problem_type = "unauthorized"


class RequestError(SealedTorchError):
    """A service request is malformed: invalid JSON, a missing or ill-typed field, a body
    that is too large.  The caller's (or client library's) mistake, never a denial."""

    problem_type = "bad-request"


class ConflictError(SealedTorchError):
    """The request contradicts stored state: a model id or key version that already exists,
    or a key version that is already revoked or retired."""

    problem_type = "conflict"


class ForbiddenError(AuthenticationError):
    """A valid admin token whose role does not allow this operation (an auditor trying to
    register a model, an owner managing tokens)."""

    problem_type = "forbidden"


class ServiceUnavailable(KeyUnavailable):
    """A service cannot answer right now (its database is unreachable, it is overloaded):
    nothing was decided; retry later."""

    problem_type = "unavailable"


class RateLimited(ServiceUnavailable):
    """Too many requests from this client; retry after the time the service names."""

    problem_type = "rate-limited"


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


class ModelUnloaded(KeyUnavailable):
    """The runtime unloaded a model it was serving because the keycache no longer holds its
    key (revoked, lease ended, keycache refused or unreachable past the grace period)."""

    problem_type = "model-unloaded"
    http_status = 503


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

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        detail = message if not self.reasons else f"{message}: " + "; ".join(self.reasons)
        super().__init__(detail)


class ModelMismatch(IntegrityError):
    """A sealed file (or an attested runtime) is not the model the measured configuration
    (or the client) pins for that served name: another model id, a key version below the
    minimum, or another file digest.  Raised before any key is requested or data decrypted."""

    problem_type = "model-mismatch"
