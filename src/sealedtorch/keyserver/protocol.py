"""The keyserver's wire protocol, shared by the server (:mod:`.app`) and the clients
(:mod:`.client`), so both sides build the same bytes from one definition.

Everything here is pure data: request/response models (pydantic, which also yields the
OpenAPI schema), base64 helpers, the HPKE ``info`` strings and the public-key thumbprint.
See ``docs/protocol.md`` for the prose version.
"""

from __future__ import annotations

import base64
import binascii
import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .. import crypto
from ..errors import RequestError

API_PREFIX = "/v1"
#: Media type of every error response (RFC 7807 / RFC 9457).
PROBLEM_MEDIA_TYPE = "application/problem+json"

#: HPKE ``info`` prefixes.  Distinct labels keep a key released to a TEE and a key handed
#: back to the owner after a server-side rotation from ever being confused.
RELEASE_INFO_LABEL = b"sealedtorch/key-release/v1"
ROTATE_INFO_LABEL = b"sealedtorch/key-rotate/v1"
HPKE_SUITE_NAME = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"


class Role(StrEnum):
    """Which identity an attester claims when it attests (recorded in its token).

    ``runtime``: it will use keys itself, so each model's ``allow`` rules decide.
    ``holder``: a key cache holding keys for local runtimes, so ``holders`` rules decide.
    """

    RUNTIME = "runtime"
    HOLDER = "holder"


class AdminRole(StrEnum):
    """What an admin token may do.

    ``admin``: everything.  ``owner``: register models and manage only the models it
    registered (owners sharing a keyserver never see each other's models, keys, policies or
    audit records).  ``auditor``: read the audit log.
    """

    ADMIN = "admin"
    OWNER = "owner"
    AUDITOR = "auditor"


# --- encodings ---------------------------------------------------------------------------

def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, field: str, size: int | None = None) -> bytes:
    """Strict standard base64; a wrong length is a :class:`RequestError` naming ``field``."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise RequestError(f"{field}: not valid base64") from None
    if size is not None and len(raw) != size:
        raise RequestError(f"{field}: expected {size} bytes, got {len(raw)}")
    return raw


def b64url(data: bytes) -> str:
    """Unpadded base64url (JWT/JWK encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the bytes that digests and signatures cover."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- keys in transit -----------------------------------------------------------------------

def x25519_jwk(public_key: bytes) -> dict[str, str]:
    """The public key as an RFC 8037 OKP JWK."""
    return {"kty": "OKP", "crv": "X25519", "x": b64url(public_key)}


def thumbprint(public_key: bytes) -> str:
    """RFC 7638 JWK SHA-256 thumbprint (base64url) of a raw X25519 public key."""
    return b64url(crypto.sha256(canonical_json(x25519_jwk(public_key))))


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def release_info(model_id: str, version: int, policy_digest: str) -> bytes:
    """HPKE ``info`` for a released key: label ‖ 0 ‖ model id ‖ 0 ‖ u32be(version) ‖
    SHA-256(policy).  Binding the policy digest means a policy swapped in transit (it
    travels beside the sealed key, and key caches enforce it) makes the HPKE open fail."""
    digest = bytes.fromhex(policy_digest)
    if len(digest) != 32:
        raise ValueError("policy digest must be 32 bytes (SHA-256 hex)")
    return (RELEASE_INFO_LABEL + b"\x00" + model_id.encode() + b"\x00" + _u32(version)
            + digest)


def rotate_info(model_id: str, version: int) -> bytes:
    """HPKE ``info`` for a server-generated key returned to the owner after a rotation."""
    return ROTATE_INFO_LABEL + b"\x00" + model_id.encode() + b"\x00" + _u32(version)


# --- request and response bodies -------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChallengeRequest(_Body):
    tee: str = Field(description="TEE type the evidence will come from: sgx, tdx, snp or sim")


class ChallengeResponse(_Body):
    nonce: str = Field(description="32 random bytes, base64; single use")
    expires_at: str = Field(description="RFC 3339 UTC time after which the nonce is refused")


class AttestRequest(_Body):
    nonce: str = Field(description="the nonce from /v1/attest/challenge, base64")
    tee: str
    evidence: str = Field(description="raw evidence (quote, report or sim statement), base64")
    collateral: str | None = Field(None, description="DCAP collateral JSON, base64")
    certificates: str | None = Field(None, description="SEV-SNP VCEK/VLEK (+chain), base64")
    public_key: str = Field(description="the attester's ephemeral X25519 public key, base64 "
                                        "(32 bytes), bound into report_data with the nonce")
    role: Role = Role.RUNTIME


class AttestResponse(_Body):
    token: str = Field(description="attestation-result token (JWT, EdDSA)")
    token_type: str = "Bearer"  # noqa: S105
    expires_at: str
    role: Role
    tee: str
    insecure: bool
    claims: dict[str, Any]


class SealedKeyModel(_Body):
    model_id: str
    version: int
    sealed_key: str = Field(description="HPKE enc ‖ ciphertext, base64")
    hpke_suite: str = HPKE_SUITE_NAME
    policy: dict[str, Any]
    policy_digest: str
    lease: str | None = Field(
        None, description="keyserver-signed lease (compact JWS, EdDSA): model id, version, "
                          "policy digest, holder key thumbprint and lease_seconds; a keycache "
                          "serves the key at most that long without renewing (docs/protocol.md)")


class ReceiptEntry(_Body):
    leaf_index: int = Field(description="the audit record's leaf index (its seq - 1)")
    record: str = Field(description="the audit record: its canonical JSON, the leaf's data")
    inclusion_proof: list[str] = Field(description="RFC 9162 inclusion proof to the "
                                                   "checkpoint's root, base64 hashes")


class ConsistencyModel(_Body):
    from_size: int
    proof: list[str] = Field(description="RFC 9162 consistency proof, base64 hashes")


class Receipt(_Body):
    """Proof that a release is on the keyserver's transparency log (see docs/protocol.md)."""

    log_key: str = Field(description="the log's signed-note verifier key "
                                     "(name+keyid+base64(0x01 ‖ Ed25519 public key))")
    checkpoint: str = Field(description="C2SP tlog-checkpoint in a C2SP signed note")
    entries: list[ReceiptEntry] = Field(description="the allow record of every released key")
    consistency: ConsistencyModel | None = Field(
        None, description="from the tree size the caller named in ?tlog_since=")


class KeysResponse(_Body):
    keys: list[SealedKeyModel]
    receipt: Receipt | None = Field(
        None, description="transparency-log receipt of this release (always sent by this "
                          "version; optional for older keyservers' answers)")


class CheckpointResponse(_Body):
    checkpoint: str = Field(description="C2SP tlog-checkpoint in a C2SP signed note")
    log_key: str = Field(description="the log's signed-note verifier key")
    size: int
    root: str = Field(description="root hash, base64")


class InclusionProofResponse(_Body):
    leaf_index: int
    tree_size: int
    proof: list[str]


class ConsistencyProofResponse(_Body):
    first: int
    second: int
    proof: list[str]


class KeyMaterial(_Body):
    """A model key uploaded by its owner (register, rotate with an uploaded key)."""

    version: StrictInt = Field(ge=1, le=2**32 - 1)
    key: str = Field(description="the 32-byte model key, base64")


class RegisterRequest(_Body):
    model_id: str
    key: KeyMaterial
    policy: dict[str, Any]


class PolicyRequest(_Body):
    model_id: str
    policy: dict[str, Any]


class RotateRequest(_Body):
    model_id: str
    key: KeyMaterial | None = Field(
        None, description="upload this key as the new version (version > every existing one)")
    recipient_public_key: str | None = Field(
        None, description="generate the key server-side and return it HPKE-sealed to this "
                          "X25519 public key (base64)")


class RotateResponse(_Body):
    model_id: str
    version: int
    sealed_key: str | None = None


class StateChangeRequest(_Body):
    model_id: str
    version: StrictInt | None = Field(None, ge=1, le=2**32 - 1,
                                      description="one version; omitted: every version")
    reason: str = Field("", max_length=1000)


class KeyVersionInfo(_Body):
    version: int
    state: str
    created_at: str
    changed_at: str | None = None
    reason: str | None = None


class ModelInfo(_Body):
    model_id: str
    policy: dict[str, Any]
    policy_digest: str
    created_at: str
    updated_at: str
    versions: list[KeyVersionInfo]
    owner: str | None = Field(None, description="the owner that registered it (null: an admin)")


class ModelsResponse(_Body):
    models: list[ModelInfo]


class StateChangeResponse(_Body):
    model_id: str
    changed: list[int]
    state: str


class TokenCreateRequest(_Body):
    role: AdminRole
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$",
                      description="who holds it (a label); while a valid token with this "
                                  "name and role exists the new one joins its identity, "
                                  "otherwise it is a new identity")
    expires_in: StrictInt | None = Field(
        None, ge=60, le=5 * 365 * 86400,
        description="lifetime in seconds (default 90 days)")


class TokenRotateRequest(_Body):
    token_id: str = Field(max_length=64)
    expires_in: StrictInt | None = Field(None, ge=60, le=5 * 365 * 86400,
                                         description="the successor's lifetime in seconds "
                                                     "(default 90 days)")


class TokenInfo(_Body):
    token_id: str
    name: str
    role: AdminRole
    created_at: str
    revoked_at: str | None = None
    expires_at: str | None = Field(None, description="after this the token is refused")
    principal_id: str | None = Field(None, description="the immutable identity the token "
                                                       "belongs to (kept by rotation)")
    rotated_from: str | None = Field(None, description="the token this one replaced")
    intact: bool = Field(True, description="false: the stored row fails its MAC under the "
                                           "KEK (changed behind the keyserver's back)")


class TokenCreateResponse(TokenInfo):
    token: str = Field(description="the bearer token itself; shown once, only its hash is "
                                   "stored")


class TokensResponse(_Body):
    tokens: list[TokenInfo]


class TokenRevokeRequest(_Body):
    token_id: str = Field(max_length=64)


class AuditRecordModel(BaseModel):
    """One audit record as stored (its canonical JSON body) plus its chain ``hash``."""

    model_config = ConfigDict(extra="allow")
    seq: int
    time: float
    event: str
    decision: str
    prev_hash: str
    hash: str


class AuditResponse(_Body):
    records: list[AuditRecordModel]
    head: dict[str, Any] | None = Field(
        None, description="{seq, hash} of the whole chain's newest record (admins and "
                          "auditors only)")


class Problem(BaseModel):
    """RFC 7807 problem details, plus ``problem`` (the short type), ``request_id`` and, for
    policy denials, ``reasons``."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    problem: str
    request_id: str | None = None
    reasons: list[str] | None = None
