"""The local wire protocol between a runtime and the keycache (HTTP over a Unix socket).

::

    POST /v1/challenge                     -> {"nonce", "expires_in", "mode"}
    POST /v1/key      {"model_id", "version"?, "nonce", "public_key", "evidence"?}
                                           -> {"model_id", "version", "sealed_key",
                                               "policy_digest"}
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
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

API_PREFIX = "/v1"
LOCAL_RELEASE_LABEL = b"sealedtorch/keycache-release/v1"
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


class ChallengeResponse(_Body):
    nonce: str
    expires_in: float
    mode: str


class KeyResponse(_Body):
    model_id: str
    version: int
    sealed_key: str
    policy_digest: str


def status_key(info: Any) -> dict[str, Any]:
    return {"model_id": info.model_id, "version": info.version, "latest": info.latest,
            "age_s": round(info.age_s, 3), "fetched_at": info.fetched_at,
            "policy_digest": info.policy_digest}
