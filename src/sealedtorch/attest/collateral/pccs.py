"""A minimal client of the PCCS v4 API (Intel PCS-compatible) for DCAP collateral.

Invariant: what it returns is exactly what Intel signed: ``tcbInfo`` and
``enclaveIdentity`` are kept as the bytes served, never re-serialised.
"""

from __future__ import annotations

import binascii
import json
import urllib.parse

import httpx
from cryptography import x509

from ... import crypto
from ...errors import CollateralError
from .key import CollateralKey
from .model import _INTEL_SGX_ROOT_CA, Collateral, parse


def _top_level_raw(body: str, what: str) -> dict[str, str]:
    """The exact text of each top-level value of a JSON object.

    Intel signs the bytes of ``tcbInfo`` / ``enclaveIdentity`` exactly as served, so they
    must be cut out of the response, never re-serialised.
    """
    dec = json.JSONDecoder()
    out: dict[str, str] = {}
    n = len(body)

    def skip(i: int) -> int:
        while i < n and body[i] in " \t\r\n":
            i += 1
        return i

    try:
        i = skip(0)
        if i >= n or body[i] != "{":
            raise ValueError("expected '{'")
        i = skip(i + 1)
        if i < n and body[i] == "}":
            return out
        while True:
            key, i = dec.raw_decode(body, i)
            if not isinstance(key, str):
                raise ValueError("object key is not a string")
            i = skip(i)
            if i >= n or body[i] != ":":
                raise ValueError("expected ':'")
            start = skip(i + 1)
            _, end = dec.raw_decode(body, start)
            out[key] = body[start:end]
            i = skip(end)
            if i < n and body[i] == ",":
                i = skip(i + 1)
                continue
            if i < n and body[i] == "}":
                break
            raise ValueError("expected ',' or '}'")
        if skip(i + 1) != n:
            raise ValueError("trailing data after the object")
    except ValueError as exc:
        raise CollateralError(f"PCCS returned malformed {what}: {exc}") from None
    return out


def _crl_der(body: bytes, what: str) -> bytes:
    """Accept a CRL as DER, PEM or hex text (PCCS serves the root CA CRL as hex)."""
    data = body.strip()
    if data[:1] == b"\x30":
        return body
    if data.startswith(b"-----BEGIN X509 CRL-----"):
        try:
            return crypto.crl_der(x509.load_pem_x509_crl(data))
        except ValueError as exc:
            raise CollateralError(f"PCCS returned a malformed {what}: {exc}") from None
    try:
        return binascii.unhexlify(data)
    except (binascii.Error, ValueError):
        raise CollateralError(f"PCCS returned a {what} that is neither DER, PEM nor hex") \
            from None


class PccsClient:
    """A minimal client of the PCCS v4 API (also Intel PCS, ``api.trustedservices.intel.com``).

    ``base_url`` is the service root; a trailing ``/sgx/certification/v4`` or
    ``/tdx/certification/v4`` is accepted and removed.  Intel PCS has no ``rootcacrl``
    endpoint; the root CA CRL is then fetched from ``root_ca_crl_url`` (default: the CRL
    distribution point of the pinned Intel SGX Root CA).
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0,
                 root_ca_crl_url: str | None = None,
                 client: httpx.Client | None = None) -> None:
        base = base_url.strip().rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            base = base.removesuffix(suffix)
        self.base_url = base
        self.timeout = timeout
        self.root_ca_crl_url = root_ca_crl_url or _root_crl_distribution_point()
        self._client = client

    def _url(self, tee: str, path: str) -> str:
        return f"{self.base_url}/{tee}/certification/v4/{path}"

    def _get(self, client: httpx.Client, url: str, what: str) -> httpx.Response:
        try:
            resp = client.get(url)
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise CollateralError(f"cannot fetch {what} from {url}: "
                                  f"{type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            hint = " (not known to this PCCS)" if resp.status_code == 404 else ""
            raise CollateralError(f"cannot fetch {what} from {url}: HTTP "
                                  f"{resp.status_code}{hint}")
        return resp

    @staticmethod
    def _chain(resp: httpx.Response, names: tuple[str, ...], what: str) -> str:
        for name in names:
            value = resp.headers.get(name)
            if value:
                return urllib.parse.unquote(value)
        raise CollateralError(f"PCCS response for {what} lacks the issuer chain header "
                              f"({' or '.join(names)})")

    def _signed_json(self, resp: httpx.Response, member: str, what: str) -> tuple[str, str]:
        parts = _top_level_raw(resp.text, what)
        if member not in parts or "signature" not in parts:
            raise CollateralError(f"PCCS returned malformed {what}: needs '{member}' and "
                                  "'signature'")
        try:
            signature = json.loads(parts["signature"])
            bytes.fromhex(signature)
        except (ValueError, TypeError):
            raise CollateralError(f"PCCS returned malformed {what}: signature is not a hex "
                                  "string") from None
        return parts[member], signature

    def fetch(self, key: CollateralKey) -> Collateral:
        """Fetch TCB info, QE identity, PCK CRL and root CA CRL for ``key``."""
        if self._client is not None:
            return self._fetch(self._client, key)
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            return self._fetch(client, key)

    def _fetch(self, client: httpx.Client, key: CollateralKey) -> Collateral:
        tee = key.tee.value
        resp = self._get(client, self._url("sgx", f"pckcrl?ca={key.ca}&encoding=der"),
                         "PCK CRL")
        pck_crl = _crl_der(resp.content, "PCK CRL")
        pck_chain = self._chain(resp, ("SGX-PCK-CRL-Issuer-Chain",), "PCK CRL")

        resp = self._get(client, self._url(tee, f"tcb?fmspc={key.fmspc}"), "TCB info")
        tcb_chain = self._chain(resp, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"),
                                "TCB info")
        tcb_info, tcb_sig = self._signed_json(resp, "tcbInfo", "TCB info")

        resp = self._get(client, self._url(tee, "qe/identity"), "QE identity")
        qe_chain = self._chain(resp, ("SGX-Enclave-Identity-Issuer-Chain",
                                      "Enclave-Identity-Issuer-Chain"), "QE identity")
        qe_identity, qe_sig = self._signed_json(resp, "enclaveIdentity", "QE identity")

        root_crl = self._root_ca_crl(client)
        collateral = parse({
            "pck_crl_issuer_chain": pck_chain, "root_ca_crl": root_crl.hex(),
            "pck_crl": pck_crl.hex(), "tcb_info_issuer_chain": tcb_chain,
            "tcb_info": tcb_info, "tcb_info_signature": tcb_sig,
            "qe_identity_issuer_chain": qe_chain, "qe_identity": qe_identity,
            "qe_identity_signature": qe_sig,
        })
        collateral.check_for(key)
        return collateral

    def _root_ca_crl(self, client: httpx.Client) -> bytes:
        url = self._url("sgx", "rootcacrl")
        try:
            resp = client.get(url)
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise CollateralError(f"cannot fetch root CA CRL from {url}: "
                                  f"{type(exc).__name__}: {exc}") from None
        if resp.status_code == 200:
            return _crl_der(resp.content, "root CA CRL")
        if resp.status_code != 404:
            raise CollateralError(f"cannot fetch root CA CRL from {url}: HTTP "
                                  f"{resp.status_code}")
        # Intel PCS has no rootcacrl endpoint: use the root's CRL distribution point.
        resp = self._get(client, self.root_ca_crl_url, "root CA CRL")
        return _crl_der(resp.content, "root CA CRL")


def _root_crl_distribution_point() -> str:
    ext = _INTEL_SGX_ROOT_CA.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    for point in ext.value:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    raise CollateralError("Intel SGX Root CA has no CRL distribution point")  # pragma: no cover
