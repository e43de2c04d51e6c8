"""The local wire protocol between a runtime and the keycache (HTTP over a Unix socket).

::

    POST /v1/challenge                     -> {"nonce", "expires_in", "mode"}
    POST /v1/key      {"model_id", "version"?, "nonce", "public_key", "evidence"?,
                       "runtime_nonce"?}
                                           -> {"model_id", "version", "sealed_key",
                                               "policy_digest", "keycache_evidence"?,
                                               "keycache_key"?, "signature"?}
    GET  /v1/status                        -> what the keycache holds (never key bytes)

Each answer to ``POST /v1/key`` (success or error) also carries a fresh nonce in the
``Keycache-Nonce`` header (with ``Keycache-Nonce-Expires-In`` and ``Keycache-Proof``), which
the client may use for its next request instead of asking for a challenge, like ACME's
Replay-Nonce.  That nonce is exactly as single-use and short-lived as a challenge's.

``mode`` is ``"evidence"`` (send evidence whose report_data binds nonce and public key) or
``"peer"`` (send none: one confidential VM, identified by peer credentials).  Binary fields
are standard base64.  Errors are RFC 7807 problem documents with the same problem types as
the keyserver (see :mod:`sealedtorch.keyserver.problems`); the client turns them back into
the same exception classes.  The key comes back HPKE-sealed to ``public_key`` with
:func:`release_info` as HPKE ``info``, so it opens only for this model, version and nonce.

Mutual attestation (the runtime authenticates the keycache): the runtime adds a
``runtime_nonce`` of its own choosing (32 random bytes).  The keycache answers with
``keycache_evidence`` from its own TEE whose report_data is :func:`answer_report_data`
(``runtime_nonce``, ``keycache_key``) — ``keycache_key`` being the keycache's Ed25519 answer
key, generated in memory at start — and ``signature``, that key's Ed25519 signature over
:func:`answer_transcript_parts`: the runtime's public key, both nonces, model id, version, sealed
key and policy digest.  The runtime verifies the evidence with the attestation front door,
the binding, the signature, and the claims against the ``keycache`` rules of its own measured
configuration before it opens the sealed key (:mod:`sealedtorch.keycache.client`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .. import crypto

API_PREFIX = "/v1"
LOCAL_RELEASE_LABEL = b"sealedtorch/keycache-release/v1"
#: Domain of the keycache's answer evidence (distinct from key-release and TLS evidence, so
#: evidence produced for one purpose is never accepted for another).
ANSWER_EVIDENCE_DOMAIN = b"sealedtorch/keycache-answer-evidence/v1"
#: Label of the transcript the keycache's answer key signs.
ANSWER_SIGNATURE_LABEL = b"sealedtorch/keycache-answer/v1"
#: Largest request body the keycache reads (SGX quotes with collateral are the big ones).
MAX_BODY = 1 << 20
#: Every answer to POST /v1/key (success or problem) carries a fresh nonce for the next
#: request in these headers, so a runtime fetching again needs one round trip, not two.
NONCE_HEADER = "Keycache-Nonce"
NONCE_TTL_HEADER = "Keycache-Nonce-Expires-In"
MODE_HEADER = "Keycache-Proof"
#: Default socket path (see docs/keycache.md for permissions).
DEFAULT_SOCKET = "/run/sealedtorch/keycache.sock"


def release_info(model_id: str, version: int, nonce: bytes) -> bytes:
    """HPKE ``info``: label ‖ 0 ‖ model id ‖ 0 ‖ u32be(version) ‖ nonce."""
    return (LOCAL_RELEASE_LABEL + b"\x00" + model_id.encode() + b"\x00"
            + version.to_bytes(4, "big") + bytes(nonce))


def answer_report_data(runtime_nonce: bytes, answer_key: bytes) -> bytes:
    """report_data of the keycache's evidence: SHA-512(domain ‖ runtime nonce ‖ answer key)
    (the nonce is always 32 bytes, so the concatenation is unambiguous)."""
    if len(runtime_nonce) != 32:
        raise ValueError("runtime nonce must be 32 bytes")
    if len(answer_key) != crypto.ED25519_PUBLIC_KEY_SIZE:
        raise ValueError("answer key must be a 32-byte Ed25519 public key")
    return crypto.sha512(ANSWER_EVIDENCE_DOMAIN, runtime_nonce, answer_key)


def answer_transcript_parts(*, public_key: bytes, nonce: bytes, runtime_nonce: bytes,
                            model_id: str, version: int, sealed_key: bytes,
                            policy_digest: str) -> tuple[bytes, ...]:
    """The fields the keycache's answer key signs, in order (see
    :func:`sealedtorch.crypto.transcript`)."""
    return (bytes(public_key), bytes(nonce), bytes(runtime_nonce), model_id.encode(),
            version.to_bytes(4, "big"), bytes(sealed_key), policy_digest.encode())


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvidenceModel(_Body):
    tee: StrictStr
    evidence: StrictStr = Field(description="raw evidence, base64")
    collateral: StrictStr | None = None
    certificates: StrictStr | None = None


class KeyRequest(_Body):
    model_id: StrictStr = Field(max_length=128)
    version: StrictInt | None = Field(None, ge=1, le=2**32 - 1)
    nonce: StrictStr
    public_key: StrictStr
    evidence: EvidenceModel | None = None
    #: The runtime's own nonce (base64 of 32 bytes), bound into the keycache's evidence.
    runtime_nonce: StrictStr | None = None


class ChallengeResponse(_Body):
    nonce: str
    expires_in: float
    mode: str


class KeyResponse(_Body):
    model_id: str
    version: int
    sealed_key: str
    policy_digest: str
    keycache_evidence: EvidenceModel | None = None
    keycache_key: str | None = None
    signature: str | None = None


def status_key(info: Any) -> dict[str, Any]:
    return {"model_id": info.model_id, "version": info.version, "latest": info.latest,
            "age_s": round(info.age_s, 3), "fetched_at": info.fetched_at,
            "policy_digest": info.policy_digest}
