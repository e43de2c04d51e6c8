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

where the evidence's report_data is ``binding.report_data(N, tls_spki)``.  The document
itself is not signed: it is trustworthy because the client fetched it over a TLS
connection whose key the evidence binds (the private key never leaves the attested
process).  :func:`verify_document` is the client's check: evidence verified through the
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
from ..attest import Claims, Evidence, Tee, VerifierConfig, binding, verify
from ..attest.policy import Decision, Policy
from ..errors import AttestationError, BindingError
from .config import RuntimeConfig
from .kserve import InvalidRequest

__all__ = ["AttestationResult", "evidence_document", "parse_nonce", "verify_document"]

DOC_VERSION = 1


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
                      models: Sequence[dict[str, Any]], config: RuntimeConfig) -> dict[str, Any]:
    canonical = config.canonical_bytes()
    return {
        "version": DOC_VERSION,
        "tee": evidence.tee.value,
        "evidence": evidence.to_json(),
        "nonce": encode_nonce(nonce),
        "tls_spki": base64.b64encode(spki).decode(),
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
    try:
        tee = Tee(data.get("tee"))
    except ValueError:
        raise AttestationError(f"attestation document: unknown TEE {data.get('tee')!r}") \
            from None
    blobs = {}
    for key in ("evidence", "collateral", "certificates"):
        if data.get(key) is not None:
            blobs[key] = _b64field(data, key)
    if "evidence" not in blobs:
        raise AttestationError("attestation document: evidence has no data")
    return Evidence(tee, blobs["evidence"], blobs.get("collateral"), blobs.get("certificates"))


def verify_document(doc: Any, *, nonce: bytes, connection_spki: bytes, policy: Policy,
                    verifier: VerifierConfig, at: float | None = None) -> AttestationResult:
    """The client's appraisal.  Raises :class:`AttestationError` (bad evidence),
    :class:`BindingError` (not bound to this nonce and this connection's key) or
    :class:`~sealedtorch.errors.PolicyDenied`."""
    if not isinstance(doc, dict) or doc.get("version") != DOC_VERSION:
        raise AttestationError("not a sealedtorch runtime attestation document (version "
                               f"{doc.get('version') if isinstance(doc, dict) else None!r})")
    claimed_spki = _b64field(doc, "tls_spki")
    if claimed_spki != connection_spki:
        raise BindingError(
            "the attestation document names a TLS key other than the one this connection "
            "presented (a TLS-terminating proxy or an impostor is in the path)")
    evidence = _evidence_from_json(doc.get("evidence"))
    claims = verify(evidence, at=at, config=verifier)
    binding.check(claims.report_data, nonce, connection_spki)
    decision = policy.decide_use(claims)
    decision.raise_if_denied()
    models = doc.get("models")
    runtime = doc.get("runtime")
    return AttestationResult(
        claims, decision, connection_spki,
        tuple(m for m in models if isinstance(m, dict)) if isinstance(models, list) else (),
        runtime if isinstance(runtime, dict) else {})
