"""Attestation for the runtime's users: the evidence document, both sides.

``GET /v1/attestation?nonce=N`` (N: 32 bytes, base64url or hex, chosen by the client)
answers::

    {"version": 1,
     "tee": "sim",
     "evidence": {"tee": "sim", "evidence": "<base64>", ...},   # Evidence.to_json()
     "nonce": "<base64url of N>",
     "tls_spki": "<base64 of the server certificate's DER SubjectPublicKeyInfo>",
     "models": [{"name": "resnet50", "model_id": "resnet50", "key_version": 1,
                 "arch": "torchvision.models:resnet50", "ready": true,
                 "file_sha256": "<hex SHA-256 of the sealed file served>",
                 "pin": {"model_id": "resnet50", "min_key_version": 1,
                         "sha256": null, "manifest_keys": null} | null}, ...],
                                                    # pin: RuntimeConfig.models
     "runtime": {"version": "0.1.0", "config": {...}, "config_sha256": "..."}}

plus ``"tls_key_origin": "ephemeral" | "file"``, where the evidence's report_data is
``binding.report_data(N, tls_spki, domain=attestation_domain(origin))``: a label of its own
(``sealedtorch/runtime-tls/v1/<origin>``), so this evidence can never serve as key-release
evidence (and the other way round), and the origin of the TLS key is part of what the TEE
signed.  The document itself is not signed: it is trustworthy because the client fetched it
over a TLS connection whose key the evidence binds.  That holds only while the private key
never leaves the attested process: true for the default ``ephemeral`` key (generated in
memory at start), not for a ``file`` key (``--tls-key``), which the host may have read and
used to terminate TLS itself.  :func:`verify_document` therefore refuses ``file`` keys
unless the caller allows them (``client infer --allow-file-tls-key``).  A host cannot
present a file key as ephemeral: the origin is inside the report_data.

``/v1/attestation`` is rate limited per client address (:class:`RateLimiter`: a token
bucket, :data:`ATTESTATION_BURST` requests then :data:`ATTESTATION_RATE` per second; 429
with ``Retry-After`` beyond), because every answer costs the TEE a fresh quote.

:func:`verify_document` is the client's check: evidence verified through the
front door, bound to *this* nonce and to the key of *the connection it came on*, and the
claims allowed by the client's policy (``decide_use``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..attest import Claims, Evidence, Tee, VerifierConfig, appraise, binding
from ..attest.policy import Decision, Policy
from ..errors import AttestationError, BindingError, PolicyDenied
from .config import RuntimeConfig
from .kserve import InvalidRequest

__all__ = ["ATTESTATION_BURST", "ATTESTATION_RATE", "TLS_KEY_ORIGINS", "AttestationResult",
           "RateLimiter", "attestation_domain", "evidence_document", "parse_nonce",
           "verify_document"]

#: 2: report_data under the runtime's own domain label, with the TLS key's origin.
DOC_VERSION = 2
TLS_KEY_ORIGINS = ("ephemeral", "file")
#: Per client address: this many evidence requests at once, then this many per second.
ATTESTATION_BURST = 10
ATTESTATION_RATE = 2.0


def attestation_domain(tls_key_origin: str) -> bytes:
    """The report_data domain label of the runtime's TLS-key evidence for this origin."""
    if tls_key_origin not in TLS_KEY_ORIGINS:
        raise ValueError(f"unknown TLS key origin {tls_key_origin!r}")
    return b"sealedtorch/runtime-tls/v1/" + tls_key_origin.encode()


class RateLimiter:
    """Token buckets per client key (address), at most ``max_clients`` remembered (the
    least recently seen are forgotten first).  Thread-safe enough for one event loop."""

    def __init__(self, rate: float = ATTESTATION_RATE, burst: int = ATTESTATION_BURST, *,
                 max_clients: int = 4096, clock: Any = None) -> None:
        import time as _time

        self.rate, self.burst, self.max_clients = float(rate), float(burst), max_clients
        self._clock = clock or _time.monotonic
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> float:
        """0.0 if ``client`` may go ahead now (one token taken), else the seconds until it
        may (what ``Retry-After`` says)."""
        now = self._clock()
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)  # re-inserted: most recent last
        while len(self._buckets) > self.max_clients:
            del self._buckets[next(iter(self._buckets))]
        return wait


def parse_nonce(value: str | None) -> bytes:
    """A 32-byte nonce from hex, base64 or base64url text."""
    if not value:
        raise InvalidRequest("missing query parameter 'nonce' (32 random bytes, base64url "
                             "or hex)")
    text = value.strip()
    candidates = []
    if len(text) == 2 * binding.NONCE_SIZE:
        try:
            candidates.append(bytes.fromhex(text))
        except ValueError:
            pass
    padded = text + "=" * (-len(text) % 4)
    for decode in (base64.urlsafe_b64decode, base64.b64decode):
        try:
            candidates.append(decode(padded))
        except (binascii.Error, ValueError):
            pass
    for raw in candidates:
        if len(raw) == binding.NONCE_SIZE:
            return raw
    raise InvalidRequest(f"'nonce' must be exactly {binding.NONCE_SIZE} bytes, base64url or "
                         f"hex encoded")


def encode_nonce(nonce: bytes) -> str:
    return base64.urlsafe_b64encode(nonce).decode().rstrip("=")


def evidence_document(evidence: Evidence, *, nonce: bytes, spki: bytes,
                      models: Sequence[dict[str, Any]], config: RuntimeConfig,
                      tls_key_origin: str = "ephemeral") -> dict[str, Any]:
    """The answer of ``/v1/attestation``; ``evidence`` must bind ``report_data(nonce, spki,
    domain=attestation_domain(tls_key_origin))``."""
    canonical = config.canonical_bytes()
    return {
        "version": DOC_VERSION,
        "tee": evidence.tee.value,
        "evidence": evidence.to_json(),
        "nonce": encode_nonce(nonce),
        "tls_spki": base64.b64encode(spki).decode(),
        "tls_key_origin": tls_key_origin,
        "models": list(models),
        "runtime": {"version": __version__, "config": json.loads(canonical),
                    "config_sha256": hashlib.sha256(canonical).hexdigest()},
    }


@dataclass(frozen=True)
class AttestationResult:
    """What a client established: the verified claims, the policy decision, the TLS key to
    pin, and the models the attested runtime serves."""

    claims: Claims
    decision: Decision
    spki: bytes
    models: tuple[dict[str, Any], ...]
    runtime: dict[str, Any]

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.models if m.get("name") == name), None)


def _b64field(doc: dict[str, Any], key: str) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise AttestationError(f"attestation document lacks '{key}'")
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise AttestationError(f"attestation document: '{key}' is not base64") from None


def _evidence_from_json(data: Any) -> Evidence:
    if not isinstance(data, dict):
        raise AttestationError("attestation document: 'evidence' is not an object")
    name = data.get("tee")
    try:
        tee = Tee(name if isinstance(name, str) else repr(name))
    except ValueError:
        raise AttestationError(f"attestation document: unknown TEE {name!r}") from None
    blobs = {}
    for key in ("evidence", "collateral", "certificates"):
        if data.get(key) is not None:
            blobs[key] = _b64field(data, key)
    if "evidence" not in blobs:
        raise AttestationError("attestation document: evidence has no data")
    return Evidence(tee, blobs["evidence"], blobs.get("collateral"), blobs.get("certificates"))


def verify_document(doc: Any, *, nonce: bytes, connection_spki: bytes, policy: Policy,
                    verifier: VerifierConfig, at: float | None = None,
                    allow_file_tls_key: bool = False) -> AttestationResult:
    """The client's appraisal.  Raises :class:`AttestationError` (bad evidence),
    :class:`BindingError` (not bound to this nonce, this connection's key and the claimed
    key origin under the runtime's domain label) or
    :class:`~sealedtorch.errors.PolicyDenied` (the policy, or a TLS key loaded from a file
    while ``allow_file_tls_key`` is false)."""
    if not isinstance(doc, dict) or doc.get("version") != DOC_VERSION:
        raise AttestationError("not a sealedtorch runtime attestation document (version "
                               f"{doc.get('version') if isinstance(doc, dict) else None!r})")
    claimed_spki = _b64field(doc, "tls_spki")
    if claimed_spki != connection_spki:
        raise BindingError(
            "the attestation document names a TLS key other than the one this connection "
            "presented (a TLS-terminating proxy or an impostor is in the path)")
    origin = doc.get("tls_key_origin")
    if origin not in TLS_KEY_ORIGINS:
        raise AttestationError(f"attestation document: 'tls_key_origin' is {origin!r}, not "
                               f"one of {', '.join(TLS_KEY_ORIGINS)}")
    evidence = _evidence_from_json(doc.get("evidence"))
    claims = appraise(evidence, nonce=nonce, public_key=connection_spki, at=at,
                      config=verifier, domain=attestation_domain(origin))
    decision = policy.decide_use(claims)
    decision.raise_if_denied()
    if origin == "file" and not allow_file_tls_key:
        raise PolicyDenied(
            "the runtime's TLS key was loaded from a file (--tls-key), which the host may "
            "have read: a TLS-terminating host would pass this check; refusing (allow it "
            "with --allow-file-tls-key / allow_file_tls_key=True only if you trust how that "
            "key was provisioned)")
    models = doc.get("models")
    runtime = doc.get("runtime")
    return AttestationResult(
        claims, decision, connection_spki,
        tuple(m for m in models if isinstance(m, dict)) if isinstance(models, list) else (),
        runtime if isinstance(runtime, dict) else {})
