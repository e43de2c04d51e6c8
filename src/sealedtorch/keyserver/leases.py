"""Key leases: a keyserver-signed bound on how long a keycache may serve a released key.

Every key the keyserver releases carries a *lease*, a compact JWS (RFC 7515) signed with the
keyserver's Ed25519 token key (``alg: EdDSA``)::

    header  {"alg": "EdDSA", "kid": <token key id>, "typ": "sealedtorch-lease+jwt",
             "jwk": {"kty": "OKP", "crv": "Ed25519", "x": <public key>}}
    payload {"iss", "aud": "sealedtorch-keycache/lease/v1", "lid": <random id>,
             "model_id", "version", "policy_digest",
             "sub": "<tee>:<thumbprint>", "role", "cnf": {"jkt": <thumbprint>},
             "token_id", "iat", "exp", "lease_seconds"}

It names the key (model id, version, policy digest), the holder (the attested X25519 key
the key was HPKE-sealed to, by RFC 7638 thumbprint, and the token subject) and how long the
holder may serve it (``lease_seconds`` = ``exp - iat``, from the model's policy).  Why a
signed statement and not just a number beside the key: the keycache can show it (status,
audits) as the keyserver's own word, and nothing in transit can lengthen it without the
keyserver's key.  The audience differs from attestation tokens', so neither verifies as
the other.

The keycache enforces the lease on its *monotonic* clock: it serves the key for at most
``lease_seconds`` counted from the moment it sent the request that brought the lease, so
neither a host that moves the wall clock nor one that cuts the network extends it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import crypto
from ..attest.policy import MAX_LEASE_SECONDS, MIN_LEASE_SECONDS
from ..errors import LeaseInvalid
from . import protocol
from .protocol import b64url, b64url_decode

__all__ = ["LEASE_AUDIENCE", "LEASE_TYPE", "Lease", "check_lease", "issue_lease",
           "verify_lease"]

LEASE_AUDIENCE = "sealedtorch-keycache/lease/v1"
LEASE_TYPE = "sealedtorch-lease+jwt"
_MAX_LEASE_TEXT = 8 * 1024


@dataclass(frozen=True)
class Lease:
    """A verified lease (see the module docstring for the fields' meaning)."""

    lease_id: str
    model_id: str
    version: int
    policy_digest: str
    subject: str
    holder_thumbprint: str
    token_id: str
    issued_at: float  # keyserver wall clock, for humans and audits
    not_after: float  # keyserver wall clock
    seconds: int  # what the keycache enforces, on its own monotonic clock
    signing_key: bytes
    text: str


def _key_id(public_key: bytes) -> str:
    return crypto.sha256(public_key)[:8].hex()


def issue_lease(signer: Any, *, model_id: str, version: int, policy_digest: str,
                subject: str, role: str, holder_thumbprint: str, token_id: str, now: float,
                seconds: int) -> str:
    """Sign a lease for one released key with ``signer`` (the keyserver's
    :class:`~.tokens.TokenSigner`)."""
    if not MIN_LEASE_SECONDS <= int(seconds) <= MAX_LEASE_SECONDS:
        raise ValueError(f"lease of {seconds} s is outside {MIN_LEASE_SECONDS}.."
                         f"{MAX_LEASE_SECONDS} s")
    public = signer.public_key
    header = {"alg": "EdDSA", "kid": _key_id(public), "typ": LEASE_TYPE,
              "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(public)}}
    iat = int(now)
    payload = {"iss": signer.issuer, "aud": LEASE_AUDIENCE,
               "lid": crypto.random_bytes(12).hex(), "model_id": model_id,
               "version": int(version), "policy_digest": policy_digest, "sub": subject,
               "role": role, "cnf": {"jkt": holder_thumbprint}, "token_id": token_id,
               "iat": iat, "exp": iat + int(seconds), "lease_seconds": int(seconds)}
    signing_input = (b64url(protocol.canonical_json(header)) + "."
                     + b64url(protocol.canonical_json(payload)))
    signature = signer.sign(signing_input.encode("ascii"))
    return signing_input + "." + b64url(signature)


def verify_lease(text: Any, *, pinned_key: bytes | None = None) -> Lease:
    """Check a lease's form and signature; raise :class:`LeaseInvalid` naming what is wrong.

    ``pinned_key``: the keyserver's Ed25519 public key the caller trusts; a lease signed by
    any other key is refused.  Without it the key in the lease header is used, which only
    proves the lease is intact (the caller must pin the key it learnt over its TLS channel,
    as the keycache does).  What the lease must *match* (model, version, holder) is the
    caller's check: see :func:`check_lease`.
    """
    if not isinstance(text, str) or len(text) > _MAX_LEASE_TEXT or text.count(".") != 2:
        raise LeaseInvalid("malformed key lease (expected a compact JWS)")
    header_b64, payload_b64, signature_b64 = text.split(".")
    try:
        header = json.loads(b64url_decode(header_b64))
        payload = json.loads(b64url_decode(payload_b64))
        signature = b64url_decode(signature_b64)
        jwk = header["jwk"]
        public = b64url_decode(jwk["x"])
    except (ValueError, KeyError, TypeError):
        raise LeaseInvalid("malformed key lease (bad encoding or no signing key)") from None
    if header.get("alg") != "EdDSA" or header.get("typ") != LEASE_TYPE or \
            jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or len(public) != 32:
        raise LeaseInvalid("key lease header is not an EdDSA sealedtorch lease")
    if header.get("kid") != _key_id(public):
        raise LeaseInvalid("key lease header names a key id that is not its key's")
    if pinned_key is not None and not crypto.constant_time_equal(public, pinned_key):
        raise LeaseInvalid(f"key lease is signed by key {_key_id(public)}, not by the "
                           f"keyserver key {_key_id(pinned_key)} this keycache trusts")
    signed = (header_b64 + "." + payload_b64).encode("ascii")
    if not crypto.ed25519_verify(public, signature, signed):
        raise LeaseInvalid("key lease signature does not verify (forged or modified lease)")
    try:
        if payload["aud"] != LEASE_AUDIENCE:
            raise LeaseInvalid(f"key lease has audience {payload['aud']!r}, not "
                               f"{LEASE_AUDIENCE!r}")
        iat, exp, seconds = payload["iat"], payload["exp"], payload["lease_seconds"]
        if not all(type(v) is int for v in (iat, exp, seconds, payload["version"])):
            raise LeaseInvalid("key lease times and version must be integers")
        if exp - iat != seconds or not MIN_LEASE_SECONDS <= seconds <= MAX_LEASE_SECONDS:
            raise LeaseInvalid(f"key lease length {seconds} s is inconsistent or outside "
                               f"{MIN_LEASE_SECONDS}..{MAX_LEASE_SECONDS} s")
        return Lease(str(payload["lid"]), str(payload["model_id"]), payload["version"],
                     str(payload["policy_digest"]), str(payload["sub"]),
                     str(payload["cnf"]["jkt"]), str(payload["token_id"]), float(iat),
                     float(exp), seconds, public, text)
    except (KeyError, TypeError) as exc:
        raise LeaseInvalid(f"key lease lacks a field: {exc}") from None


def check_lease(lease: Lease, *, model_id: str, version: int, policy_digest: str,
                holder_public_key: bytes) -> None:
    """Refuse a lease that is not for this key, policy and holder (a lease moved from
    another key or another keycache's answer)."""
    got = (lease.model_id, lease.version, lease.policy_digest)
    want = (model_id, version, policy_digest)
    if got != want:
        raise LeaseInvalid(f"key lease is for {got[0]!r} version {got[1]} (policy "
                           f"{got[2][:12]}), not for {model_id!r} version {version} (policy "
                           f"{policy_digest[:12]})")
    if lease.holder_thumbprint != protocol.thumbprint(holder_public_key):
        raise LeaseInvalid(f"key lease for {model_id!r} version {version} names another "
                           f"holder than this keycache's attested key")
