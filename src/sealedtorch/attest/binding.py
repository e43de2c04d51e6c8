"""Binding evidence to one challenge and one key.

    report_data = SHA-512("sealedtorch/attest/v1" ‖ nonce ‖ public_key)      (64-byte fields)
    report_data = SHA-256("sealedtorch/attest/v1" ‖ nonce ‖ public_key) ‖ 0³² (32-byte fields)

The nonce is always exactly 32 bytes, so the concatenation is unambiguous even though the
public key's length varies (32-byte X25519 keys for key release, DER SubjectPublicKeyInfo
for a server's TLS key).  Every key release builds and checks report_data through this
module and nowhere else.

Evidence for another purpose passes its own ``domain`` label, hashed NUL-terminated in
place of ``"sealedtorch/attest/v1"`` (the runtime's ``/v1/attestation`` uses
``sealedtorch/runtime-tls/v1/<key origin>``), so evidence a runtime hands to its users can
never be replayed as key-release evidence, or the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import crypto
from ..errors import BindingError

if TYPE_CHECKING:
    from .evidence import Claims

DOMAIN = b"sealedtorch/attest/v1"
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64


def report_data(nonce: bytes, public_key: bytes, *, field_size: int = REPORT_DATA_SIZE,
                domain: bytes = DOMAIN) -> bytes:
    """The report_data an attester must put in its evidence (always 64 bytes long).

    ``domain`` separates uses: key release uses :data:`DOMAIN`; other evidence (the
    runtime's ``/v1/attestation`` for its TLS key) passes its own label, so evidence made
    for one purpose never verifies for another."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if not public_key:
        raise ValueError("public key must not be empty")
    if not domain or b"\0" in domain:
        raise ValueError("domain label must be non-empty and contain no NUL byte")
    if domain != DOMAIN:  # a NUL ends a label: no label is a prefix of another's input
        domain = domain + b"\0"
    if field_size == 64:
        return crypto.sha512(domain, nonce, public_key)
    if field_size == 32:
        return crypto.sha256(domain, nonce, public_key) + bytes(32)
    raise ValueError("report_data field size must be 32 or 64")


def check(actual: bytes, nonce: bytes, public_key: bytes, *,
          field_size: int = REPORT_DATA_SIZE, domain: bytes = DOMAIN) -> None:
    """Raise :class:`BindingError` unless ``actual`` binds exactly this nonce and key
    (under ``domain``)."""
    if not _binds(actual, nonce, public_key, field_size=field_size, domain=domain):
        raise BindingError(_NOT_BOUND)


def check_claims(claims: Claims, nonce: bytes, public_key: bytes, *,
                 domain: bytes = DOMAIN) -> None:
    """Raise :class:`BindingError` unless verified ``claims`` bind this nonce and key (under
    ``domain``).  The error carries ``claims``: they verified, and an audit record says so."""
    if not _binds(claims.report_data, nonce, public_key, field_size=REPORT_DATA_SIZE,
                  domain=domain):
        raise BindingError(_NOT_BOUND, claims=claims)


_NOT_BOUND = ("evidence is not bound to this challenge: report_data does not match "
              "SHA-512(domain ‖ nonce ‖ public key) (wrong nonce, wrong public key, or "
              "evidence produced for another request)")


def _binds(actual: bytes, nonce: bytes, public_key: bytes, *, field_size: int,
           domain: bytes) -> bool:
    expected = report_data(nonce, public_key, field_size=field_size, domain=domain)
    return len(actual) == REPORT_DATA_SIZE and crypto.constant_time_equal(actual, expected)
