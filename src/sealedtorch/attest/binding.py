"""Binding evidence to one challenge and one key.

    report_data = SHA-512("sealedtorch/attest/v1" ‖ nonce ‖ public_key)      (64-byte fields)
    report_data = SHA-256("sealedtorch/attest/v1" ‖ nonce ‖ public_key) ‖ 0³² (32-byte fields)

The nonce is always exactly 32 bytes, so the concatenation is unambiguous even though the
public key's length varies (32-byte X25519 keys for key release, DER SubjectPublicKeyInfo
for a server's TLS key).  Every key release builds and checks report_data through this
module and nowhere else.
"""

from __future__ import annotations

from .. import crypto
from ..errors import BindingError

DOMAIN = b"sealedtorch/attest/v1"
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64


def report_data(nonce: bytes, public_key: bytes, *, field_size: int = REPORT_DATA_SIZE) -> bytes:
    """The report_data an attester must put in its evidence (always 64 bytes long)."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    if not public_key:
        raise ValueError("public key must not be empty")
    if field_size == 64:
        return crypto.sha512(DOMAIN, nonce, public_key)
    if field_size == 32:
        return crypto.sha256(DOMAIN, nonce, public_key) + bytes(32)
    raise ValueError("report_data field size must be 32 or 64")


def check(actual: bytes, nonce: bytes, public_key: bytes, *,
          field_size: int = REPORT_DATA_SIZE) -> None:
    """Raise :class:`BindingError` unless ``actual`` binds exactly this nonce and key."""
    expected = report_data(nonce, public_key, field_size=field_size)
    if len(actual) != REPORT_DATA_SIZE or not crypto.constant_time_equal(actual, expected):
        raise BindingError(
            "evidence is not bound to this challenge: report_data does not match "
            "SHA-512(domain ‖ nonce ‖ public key) (wrong nonce, wrong public key, or "
            "evidence produced for another request)")
