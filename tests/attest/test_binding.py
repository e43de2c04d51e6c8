"""Binding: report_data = SHA-512(domain ‖ nonce ‖ public key); one builder, one checker."""

from __future__ import annotations

import hashlib
import os

import pytest

from sealedtorch.attest import binding
from sealedtorch.errors import AttestationError, BindingError


def test_report_data_is_sha512_of_domain_nonce_and_key():
    nonce, pk = os.urandom(32), os.urandom(32)
    assert binding.report_data(nonce, pk) == hashlib.sha512(
        b"sealedtorch/attest/v1" + nonce + pk).digest()


def test_32_byte_variant_is_sha256_padded_to_64_bytes():
    nonce, pk = os.urandom(32), os.urandom(32)
    rd = binding.report_data(nonce, pk, field_size=32)
    assert rd == hashlib.sha256(b"sealedtorch/attest/v1" + nonce + pk).digest() + bytes(32)


def test_matching_report_data_passes():
    nonce, pk = os.urandom(32), os.urandom(32)
    binding.check(binding.report_data(nonce, pk), nonce, pk)


def test_wrong_nonce_is_a_binding_error():
    nonce, pk = os.urandom(32), os.urandom(32)
    with pytest.raises(BindingError, match="not bound to this challenge"):
        binding.check(binding.report_data(nonce, pk), os.urandom(32), pk)


def test_wrong_public_key_is_a_binding_error():
    nonce, pk = os.urandom(32), os.urandom(32)
    with pytest.raises(BindingError):
        binding.check(binding.report_data(nonce, pk), nonce, os.urandom(32))


def test_binding_error_is_an_attestation_error():
    assert issubclass(BindingError, AttestationError)


def test_truncated_report_data_is_a_binding_error():
    nonce, pk = os.urandom(32), os.urandom(32)
    with pytest.raises(BindingError):
        binding.check(binding.report_data(nonce, pk)[:32], nonce, pk)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_nonce_must_be_exactly_32_bytes(size):
    with pytest.raises(ValueError, match="32 bytes"):
        binding.report_data(bytes(size), os.urandom(32))


def test_public_key_must_not_be_empty():
    with pytest.raises(ValueError):
        binding.report_data(os.urandom(32), b"")
