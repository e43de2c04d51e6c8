"""AMD Key Distribution Service (KDS) client for SEV-SNP VCEK certificates.

A VCEK is derived per chip and per TCB version, so AMD publishes one certificate for every
(chip id, reported TCB) pair::

    GET {kds}/vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..

``hwid`` is the report's 64-byte chip id in hex (Turin: its first 8 bytes, and the query
also carries ``fmcSPL``).  The answer is the DER certificate.  Fetched certificates are
cached on disk, one file per (product, hwid, TCB), written atomically; the SNP verifier
stores a certificate only after it verified the whole chain and the report with it, so a
bad answer from the network never poisons the cache.

This module only fetches and caches bytes: it trusts nothing it fetches.  The caller
(:mod:`sealedtorch.attest.snp`) verifies every certificate up to a pinned AMD root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import httpx

from ..atomicfile import write_atomically
from ..errors import CollateralError

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
#: Product names as the KDS spells them in its paths.
PRODUCTS = ("Milan", "Genoa", "Turin")
CHIP_ID_SIZE = 64
CACHE_SUBDIR = "amd-kds"
#: A VCEK is ~1.4 KB; anything far larger is not a certificate.
MAX_CERT_SIZE = 64 * 1024

# TCB component name (as in SnpClaims.reported_tcb) -> KDS query parameter, in query order.
_SPL_PARAMS: tuple[tuple[str, str], ...] = (
    ("fmc", "fmcSPL"),
    ("bootloader", "blSPL"),
    ("tee", "teeSPL"),
    ("snp", "snpSPL"),
    ("microcode", "ucodeSPL"),
)


def hwid(product: str, chip_id: bytes) -> str:
    """The hardware id the KDS expects in the path: hex chip id (Turin: first 8 bytes)."""
    _check(product, chip_id)
    return (chip_id[:8] if product == "Turin" else chip_id).hex()


def vcek_path(product: str, chip_id: bytes, tcb: Mapping[str, int]) -> str:
    """The KDS path and query for one VCEK, e.g. ``/vcek/v1/Milan/d495…?blSPL=3&…``."""
    params = []
    for name, param in _SPL_PARAMS:
        if name == "fmc" and product != "Turin":
            continue
        value = tcb.get(name)
        if value is None or not 0 <= int(value) <= 255:
            raise CollateralError(f"cannot ask AMD KDS for a VCEK: TCB component {name!r} "
                                  f"is missing or out of range ({value!r})")
        params.append(f"{param}={int(value)}")
    return f"/vcek/v1/{product}/{hwid(product, chip_id)}?" + "&".join(params)


def cache_file(cache_dir: Path, product: str, chip_id: bytes, tcb: Mapping[str, int]) -> Path:
    """Where the VCEK for this (product, chip, TCB) is cached under ``cache_dir``."""
    query = vcek_path(product, chip_id, tcb).split("?", 1)[1]
    tcb_part = "-".join(p.replace("=", "") for p in query.split("&"))
    name = f"vcek-{product}-{hwid(product, chip_id)}-{tcb_part}.der"
    return Path(cache_dir) / CACHE_SUBDIR / name


def cached_vcek(cache_dir: Path | None, product: str, chip_id: bytes,
                tcb: Mapping[str, int]) -> bytes | None:
    """The cached DER VCEK, or None.  An unreadable or malformed entry is removed."""
    if cache_dir is None:
        return None
    path = cache_file(cache_dir, product, chip_id, tcb)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not looks_like_der_certificate(data):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return data


def store_vcek(cache_dir: Path | None, product: str, chip_id: bytes, tcb: Mapping[str, int],
               der: bytes) -> Path | None:
    """Cache ``der`` atomically (temp file in the same directory, fsync, rename).

    Caching is an optimisation: a failure to write is not an error and returns None.
    """
    if cache_dir is None:
        return None
    path = cache_file(cache_dir, product, chip_id, tcb)
    return _write_cached(path, der)


def _write_cached(path: Path, der: bytes) -> Path | None:
    """Write ``der`` to ``path`` atomically; caching is an optimisation, so a failure
    returns None instead of raising."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, der)
    except OSError:
        return None


def fetch_vcek(product: str, chip_id: bytes, tcb: Mapping[str, int], *,
               base_url: str | None = None, timeout: float = 10.0) -> bytes:
    """Download the DER VCEK from the KDS (no cache).  Raises CollateralError on failure."""
    url = (base_url or DEFAULT_KDS_URL).rstrip("/") + vcek_path(product, chip_id, tcb)
    return _fetch_der(url, f"{product} VCEK", accept="application/octet-stream",
                      max_size=MAX_CERT_SIZE, timeout=timeout, shape="a DER certificate",
                      hint="retry later or supply the VCEK with the evidence")


def _fetch_der(url: str, what: str, *, accept: str, max_size: int, timeout: float = 10.0,
               shape: str = "DER", hint: str | None = None) -> bytes:
    """GET one DER object from the KDS; every failure is a CollateralError naming ``what``."""
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=False,
                             headers={"Accept": accept})
    except httpx.HTTPError as exc:
        raise CollateralError(f"AMD KDS unreachable fetching the {what} ({url}): "
                              f"{type(exc).__name__}: {exc}") from None
    if response.status_code == 429 and hint is not None:
        raise CollateralError(f"AMD KDS rate-limited the {what} request ({url}); {hint}")
    if response.status_code != 200:
        raise CollateralError(f"AMD KDS answered HTTP {response.status_code} for the "
                              f"{what} ({url})")
    der = response.content
    if len(der) > max_size or not looks_like_der_certificate(der):
        raise CollateralError(f"AMD KDS answer for the {what} is not {shape} "
                              f"({len(der)} bytes from {url})")
    return der


def looks_like_der_certificate(data: bytes) -> bool:
    """Cheap structural check: one complete DER SEQUENCE and nothing after it."""
    size = der_element_size(data, 0)
    return size is not None and size == len(data) and data[0] == 0x30


def der_element_size(data: bytes, offset: int) -> int | None:
    """Total size (header + content) of the DER element at ``offset``, or None if malformed."""
    if offset + 2 > len(data):
        return None
    first = data[offset + 1]
    if first < 0x80:
        header, length = 2, first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or offset + 2 + n > len(data):
            return None
        header, length = 2 + n, int.from_bytes(data[offset + 2:offset + 2 + n], "big")
    if offset + header + length > len(data):
        return None
    return header + length


def _check(product: str, chip_id: bytes) -> None:
    if product not in PRODUCTS:
        raise CollateralError(f"unknown SEV-SNP product {product!r} (KDS knows {PRODUCTS})")
    if len(chip_id) != CHIP_ID_SIZE:
        raise CollateralError(f"chip id must be {CHIP_ID_SIZE} bytes, got {len(chip_id)}")
    if not any(chip_id):
        raise CollateralError("the report's chip id is masked (all zeros), so its VCEK cannot "
                              "be fetched from AMD KDS: supply the VCEK with the evidence")



# --- AMD's certificate revocation lists --------------------------------------------------
#
# AMD publishes one CRL per product, signed by that product's ARK, listing revoked ASKs/ASVKs
# (and, should it ever happen, VCEKs):  GET {kds}/vcek/v1/{product}/crl  (DER).  It is cached
# beside the VCEKs; the SNP verifier checks its signature and dates before it uses or caches
# it, exactly as for VCEKs.

#: A CRL listing every revoked AMD key is a few KB; anything far larger is not one.
MAX_CRL_SIZE = 1024 * 1024


def crl_path(product: str) -> str:
    """The KDS path of ``product``'s CRL, e.g. ``/vcek/v1/Milan/crl``."""
    if product not in PRODUCTS:
        raise CollateralError(f"unknown SEV-SNP product {product!r} (KDS knows {PRODUCTS})")
    return f"/vcek/v1/{product}/crl"


def crl_cache_file(cache_dir: Path, product: str) -> Path:
    """Where ``product``'s CRL is cached under ``cache_dir``."""
    crl_path(product)  # validates the product
    return Path(cache_dir) / CACHE_SUBDIR / f"crl-{product}.der"


def cached_crl(cache_dir: Path | None, product: str) -> bytes | None:
    """The cached DER CRL of ``product``, or None (nothing cached, unreadable, malformed)."""
    if cache_dir is None:
        return None
    try:
        data = crl_cache_file(cache_dir, product).read_bytes()
    except OSError:
        return None
    return data if looks_like_der_certificate(data) else None


def store_crl(cache_dir: Path | None, product: str, der: bytes) -> Path | None:
    """Cache a CRL atomically (the caller verified it); None when it cannot be written."""
    if cache_dir is None:
        return None
    path = crl_cache_file(cache_dir, product)
    return _write_cached(path, der)


def fetch_crl(product: str, *, base_url: str | None = None, timeout: float = 10.0) -> bytes:
    """Download ``product``'s DER CRL from the KDS (no cache).  Raises CollateralError."""
    url = (base_url or DEFAULT_KDS_URL).rstrip("/") + crl_path(product)
    return _fetch_der(url, f"{product} CRL", accept="application/pkix-crl",
                      max_size=MAX_CRL_SIZE, timeout=timeout)
