"""Intel DCAP collateral: what it is, where it comes from, and how long it may be used.

A DCAP quote is only as good as the *collateral* it is appraised with: the TCB info for the
platform's FMSPC, the quoting enclave's identity, the PCK and root-CA revocation lists, and
the issuer chains that sign them.  Collateral is signed by Intel, but it is also *dated*:
every item carries an issue date and a ``nextUpdate`` after which it must not be used.

This package holds the collateral data model (:class:`Collateral`, in dcap-qvl's JSON form),
the validity window check that names the item that expired, a small client for the PCCS v4
API (Intel PCS-compatible), and an on-disk cache keyed by (TEE, FMSPC, CA) so that a
keyserver appraises quotes without a network round trip.

Collateral sources, in order (see :func:`obtain`):

1. the evidence itself (``Evidence.collateral``; handled by :mod:`.dcap`);
2. a fresh cache entry in ``VerifierConfig.cache_dir`` (``<cache_dir>/dcap/<key>.json``);
3. ``VerifierConfig.pccs_url``: an ``http(s)://`` PCCS or Intel PCS base URL, or a
   ``file://`` path to one collateral JSON file or to a directory of ``<key>.json`` files;
4. a stale cache entry that is still valid at the verification time, when the source above
   cannot be reached.

Every time decision uses the verification time ``at`` (the wall clock in production), so a
verifier can be tested at any instant.  Every failure raises
:class:`~sealedtorch.errors.CollateralError`, whose message names what is missing, which
source failed, or which item expired and when.

Modules: :mod:`.key` (what collateral is for), :mod:`.model` (the data model, parsing and
the validity window), :mod:`.pccs` (the PCCS client), :mod:`.cache` (the on-disk cache) and
:mod:`.sources` (:func:`obtain`: which of them answers).
"""

from __future__ import annotations

from .cache import CACHE_FORMAT, CacheEntry, CollateralCache
from .key import CollateralKey
from .model import (
    FIELDS,
    INTEL_SGX_ROOT_CA_DER,
    INTEL_SGX_ROOT_CA_SHA256,
    Collateral,
    ValidityItem,
    load_file,
    parse,
)
from .pccs import PccsClient
from .sources import DEFAULT_REFRESH_INTERVAL, obtain

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_REFRESH_INTERVAL",
    "FIELDS",
    "INTEL_SGX_ROOT_CA_DER",
    "INTEL_SGX_ROOT_CA_SHA256",
    "CacheEntry",
    "Collateral",
    "CollateralCache",
    "CollateralKey",
    "PccsClient",
    "ValidityItem",
    "load_file",
    "obtain",
    "parse",
]
