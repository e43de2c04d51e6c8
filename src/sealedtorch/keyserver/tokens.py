"""Tokens: attestation-result JWTs (EdDSA) and opaque admin tokens.

*Attestation-result token* (RFC 9334 "attestation result", as a JWT, RFC 7519): issued by
``POST /v1/attest``, signed with the keyserver's Ed25519 key (``alg: EdDSA``, RFC 8037),
short-lived.  It carries the verified claims, the role, and the attested X25519 key both
as a JWK and as its RFC 7638 thumbprint (``cnf``, RFC 7800).  Keys are HPKE-sealed to that
key, so a stolen token is useless without the TEE's private key.  Written by hand on top of
:mod:`sealedtorch.crypto` (no JWT library): only ``EdDSA`` is accepted, the header is
checked exactly, and nothing in the token chooses how it is verified.

*Admin tokens* are 256-bit random bearer strings (``sta_…``); the store keeps only their
SHA-256, so a copy of the database cannot be used to administer the keyserver.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import crypto
from ..attest.evidence import Claims, SgxClaims, SimClaims, SnpClaims, TdxClaims, Tee
from ..errors import AuthenticationError, ConfigError
from . import protocol
from .protocol import Role, b64url, b64url_decode, thumbprint

AUDIENCE = "sealedtorch-keyserver/v1"
TOKEN_TYPE = "JWT"  # noqa: S105
ALG = "EdDSA"
ADMIN_TOKEN_PREFIX = "sta_"  # noqa: S105
_MAX_TOKEN = 64 * 1024

_CLAIM_CLASSES: dict[Tee, type[Claims]] = {
    Tee.SGX: SgxClaims, Tee.TDX: TdxClaims, Tee.SNP: SnpClaims, Tee.SIM: SimClaims}


@dataclass(frozen=True)
class AttestationToken:
    """A verified attestation-result token."""

    token_id: str
    issued_at: float
    expires_at: float
    role: Role
    public_key: bytes
    thumbprint: str
    evidence_digest: str
    claims: Claims


class TokenSigner:
    """Issues and verifies attestation-result tokens with one Ed25519 key."""

    def __init__(self, key: crypto.SigningKey, *, issuer: str = "sealedtorch-keyserver") -> None:
        self._key = key
        self._public = key.public_bytes
        self.key_id = crypto.sha256(self._public)[:8].hex()
        self.issuer = issuer
        self._header = b64url(protocol.canonical_json(
            {"alg": ALG, "kid": self.key_id, "typ": TOKEN_TYPE}))

    def __repr__(self) -> str:
        return f"TokenSigner(key_id={self.key_id!r})"

    @property
    def public_key(self) -> bytes:
        """The raw Ed25519 public key (32 bytes) that verifies tokens and key leases."""
        return self._public

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with the token key (key leases, see :mod:`.leases`; callers
        domain-separate by their own header and audience)."""
        return self._key.sign(message)

    @classmethod
    def load(cls, path: Path | str) -> TokenSigner:
        try:
            return cls(crypto.SigningKey.from_pem(Path(path).read_bytes()))
        except OSError as exc:
            raise ConfigError(f"cannot read token-signing key {path}: {exc.strerror}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not an Ed25519 private key: {exc}") from None

    def issue(self, *, claims: Claims, public_key: bytes, role: Role, evidence_digest: str,
              now: float, ttl: float) -> tuple[str, AttestationToken]:
        token_id = crypto.random_bytes(16).hex()
        thumb = thumbprint(public_key)
        payload = {
            "iss": self.issuer, "aud": AUDIENCE, "jti": token_id,
            "iat": int(now), "exp": int(now + ttl), "sub": f"{claims.tee.value}:{thumb}",
            "role": role.value, "evidence_digest": evidence_digest, "claims": claims.to_json(),
            "cnf": {"jkt": thumb, "jwk": protocol.x25519_jwk(public_key)},
        }
        signing_input = self._header + "." + b64url(protocol.canonical_json(payload))
        signature = self._key.sign(signing_input.encode("ascii"))
        token = signing_input + "." + b64url(signature)
        return token, AttestationToken(token_id, float(int(now)), float(int(now + ttl)), role,
                                       public_key, thumb, evidence_digest, claims)

    def verify(self, token: str, *, now: float) -> AttestationToken:
        """Check signature, header, audience, issuer and lifetime; raise
        :class:`AuthenticationError` naming what is wrong."""
        if not isinstance(token, str) or len(token) > _MAX_TOKEN or token.count(".") != 2:
            raise AuthenticationError("malformed attestation token (expected a JWT)")
        header_b64, payload_b64, signature_b64 = token.split(".")
        try:
            header = json.loads(b64url_decode(header_b64))
            signature = b64url_decode(signature_b64)
        except ValueError:
            raise AuthenticationError("malformed attestation token (bad encoding)") from None
        if not isinstance(header, dict) or header.get("alg") != ALG:
            raise AuthenticationError("attestation token must be signed with EdDSA")
        if header.get("kid") != self.key_id:
            raise AuthenticationError(
                "attestation token was not issued by this keyserver (unknown signing key)")
        signed = (header_b64 + "." + payload_b64).encode("ascii")
        if not crypto.ed25519_verify(self._public, signature, signed):
            raise AuthenticationError("attestation token signature does not verify (forged "
                                      "or modified token)")
        try:
            payload = json.loads(b64url_decode(payload_b64))
            return self._parse(payload, now)
        except AuthenticationError:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # signed by us: should not happen
            raise AuthenticationError(f"attestation token payload is invalid: {exc}") from None

    def _parse(self, payload: dict[str, Any], now: float) -> AttestationToken:
        if payload.get("aud") != AUDIENCE or payload.get("iss") != self.issuer:
            raise AuthenticationError("attestation token has the wrong audience or issuer")
        exp, iat = float(payload["exp"]), float(payload["iat"])
        if now >= exp:
            from .audit import iso

            raise AuthenticationError(f"attestation token expired at {iso(exp)}; attest again")
        if iat > now + 60:
            raise AuthenticationError("attestation token is not valid yet (clock skew?)")
        cnf = payload["cnf"]
        public_key = b64url_decode(cnf["jwk"]["x"])
        if len(public_key) != crypto.X25519_PUBLIC_KEY_SIZE or \
                thumbprint(public_key) != cnf["jkt"]:
            raise AuthenticationError("attestation token's confirmation key is inconsistent")
        return AttestationToken(str(payload["jti"]), iat, exp, Role(payload["role"]),
                                public_key, cnf["jkt"], str(payload["evidence_digest"]),
                                claims_from_json(payload["claims"]))


#: Resolved field types of each claims class, computed on first use (resolving them at
#: import could meet annotations that are not importable yet).
_HINTS: dict[type[Claims], dict[str, Any]] = {}


def _hints(cls: type[Claims]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def claims_from_json(data: dict[str, Any]) -> Claims:
    """Rebuild the :class:`Claims` subclass that :meth:`Claims.to_json` produced (bytes were
    hex, tuples lists), so a token's claims can be appraised against current policies."""
    cls = _CLAIM_CLASSES[Tee(data["tee"])]
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        raw, hint = data[f.name], hints[f.name]
        if hint is bytes:
            values[f.name] = bytes.fromhex(raw)
        elif hint is Tee:
            values[f.name] = Tee(raw)
        elif typing.get_origin(hint) is tuple:
            values[f.name] = tuple(raw)
        else:
            values[f.name] = raw
    return cls(**values)


# --- admin tokens ------------------------------------------------------------------------

def new_admin_token() -> str:
    return ADMIN_TOKEN_PREFIX + b64url(crypto.random_bytes(32))


def admin_token_hash(token: str) -> bytes:
    return crypto.sha256(b"sealedtorch/admin-token/v1\x00", token.encode("utf-8", "replace"))


def admin_token_id(token_hash: bytes) -> str:
    """A short, non-secret name for a token (appears in audit records)."""
    return "adm_" + token_hash[:6].hex()
