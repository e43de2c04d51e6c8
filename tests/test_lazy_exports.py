"""Lazy package exports (sealedtorch/_lazy.py), as runtime/ and keycache/ use them."""

from __future__ import annotations

import pytest

from sealedtorch._lazy import lazy_attribute


def test_a_lazy_export_is_the_object_its_submodule_defines():
    from sealedtorch.runtime.config import RuntimeConfig

    assert lazy_attribute("sealedtorch.runtime", {"RuntimeConfig": "config"},
                          "RuntimeConfig") is RuntimeConfig


def test_a_name_the_package_does_not_map_is_an_attribute_error():
    with pytest.raises(AttributeError, match=r"module 'sealedtorch\.keycache' has no attribute"):
        lazy_attribute("sealedtorch.keycache", {"KeyStore": "store"}, "config")


def test_the_runtime_and_keycache_packages_export_through_it():
    import sealedtorch.keycache
    import sealedtorch.runtime
    from sealedtorch.keycache.store import KeyStore
    from sealedtorch.runtime.loader import load_sealed

    assert sealedtorch.runtime.load_sealed is load_sealed
    assert sealedtorch.keycache.KeyStore is KeyStore
