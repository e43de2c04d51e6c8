"""TLS for the runtime: its certificate (generated in memory by default) and pinned clients.

Server side: without ``--tls-cert/--tls-key`` the runtime makes a fresh ECDSA P-256 key and
certificate at start.  The private key never touches a file system: Python's ``ssl`` module
loads keys only from paths, so the PEM is written to an anonymous in-memory file
(``memfd_create``) and loaded through ``/proc/self/fd``, then the descriptor is closed.  The
attestation endpoint binds this certificate's public key (DER SubjectPublicKeyInfo), so a
client that verified the evidence knows the key lives in the attested process.

Client side: :func:`pinned_context` returns an SSL context whose sockets check the server's
SubjectPublicKeyInfo *during the handshake*, before the connection is handed back to the
HTTP client, so no request byte is ever written to a server that does not hold the pinned
key.  Certificate chains and host names are not checked: the trust comes from attestation.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import crypto
from ..errors import (
    BindingError,
    ConfigError,
    PinMismatch,
)

__all__ = [
    "PinMismatch", "ServerTls", "capture_context", "peer_spki", "pin_spki", "pinned_context",
]


@dataclass(frozen=True)
class ServerTls:
    """The runtime's certificate and an SSL context serving it."""

    cert_pem: bytes
    context: ssl.SSLContext = field(repr=False)
    generated: bool
    #: the generated certificate's throwaway CA (its key is gone once it signed), so that
    #: clients that insist on a CA file (tritonclient's ssl_options, curl --cacert) can use
    #: :attr:`trust_pem`; empty for --tls-cert files
    ca_pem: bytes = b""

    @property
    def trust_pem(self) -> bytes:
        """What ``serve --write-cert`` writes: the leaf certificate, then its CA if
        generated.  A client that trusts this file (as a CA bundle) accepts exactly this
        server: the CA's private key was deleted after it signed the leaf."""
        if not self.ca_pem:
            return self.cert_pem
        return self.cert_pem.rstrip(b"\n") + b"\n" + self.ca_pem

    @property
    def spki(self) -> bytes:
        """DER SubjectPublicKeyInfo of the certificate: what the evidence binds."""
        return crypto.tls_certificate_spki(self.cert_pem)

    @property
    def spki_sha256(self) -> str:
        return crypto.sha256(self.spki).hex()

    @classmethod
    def from_files(cls, cert: Path | str, key: Path | str) -> ServerTls:
        ctx = _server_context()
        try:
            ctx.load_cert_chain(str(cert), str(key))
            cert_pem = Path(cert).read_bytes()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {cert} with key {key}: {exc}") \
                from None
        return cls(cert_pem, ctx, generated=False)

    @classmethod
    def generate(cls, hosts: Sequence[str] = ()) -> ServerTls:
        """A fresh key and certificate for localhost, 127.0.0.1, ::1 and ``hosts``; the key
        stays in memory."""
        dns, ips = ["localhost"], ["127.0.0.1", "::1"]
        for host in hosts:
            if not host or host in ("0.0.0.0", "::"):  # noqa: S104
                continue
            try:
                ips.append(str(ipaddress.ip_address(host)))
            except ValueError:
                dns.append(host)
        ca_cert, ca_key = crypto.generate_tls_ca("sealedtorch runtime (ephemeral)", days=30)
        cert, key = crypto.issue_tls_server_cert(
            ca_cert, ca_key, common_name="sealedtorch runtime",
            dns_names=tuple(dict.fromkeys(dns)), ip_addresses=tuple(dict.fromkeys(ips)),
            days=30)
        del ca_key  # the throwaway CA signs once; nothing ever trusts it
        ctx = _server_context()
        _load_from_memory(ctx, cert, key)
        return cls(cert, ctx, generated=True, ca_pem=ca_cert)


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _load_from_memory(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    if not hasattr(os, "memfd_create"):  # pragma: no cover (non-Linux)
        raise ConfigError("generating an in-memory TLS key needs Linux memfd_create; pass "
                          "--tls-cert and --tls-key instead")
    fds = []
    try:
        paths = []
        for label, data in (("cert", cert_pem), ("key", key_pem)):
            fd = os.memfd_create(f"sealedtorch-tls-{label}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
            paths.append(f"/proc/self/fd/{fd}")
        ctx.load_cert_chain(paths[0], paths[1])
    finally:
        for fd in fds:
            os.close(fd)


# --- client side ----------------------------------------------------------------------

def peer_spki(ssl_object: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of the certificate the peer presented."""
    der = ssl_object.getpeercert(True) if ssl_object is not None else None
    if not der:
        raise BindingError("the TLS connection presented no server certificate")
    return crypto.tls_certificate_spki(der)


#: Pinned context -> the one server key (DER SubjectPublicKeyInfo) its handshakes accept.
#: Beside the context rather than on it (``ssl.SSLContext`` declares no such attribute);
#: weak, so a pin goes when its context does.
_PINS: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = weakref.WeakKeyDictionary()


def _check_pin(ssl_object: Any, context: ssl.SSLContext) -> None:
    pinned = _PINS.get(context)
    if pinned is None:
        return
    got = peer_spki(ssl_object)
    if not crypto.constant_time_equal(got, pinned):
        raise PinMismatch(
            f"sealedtorch: TLS key pinning failed: the server presented key "
            f"sha256:{crypto.sha256(got).hex()[:16]}..., the attested key is "
            f"sha256:{crypto.sha256(pinned).hex()[:16]}...")


class _PinnedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        try:
            _check_pin(self, self.context)
        except PinMismatch:
            self.close()
            raise


class _PinnedObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantRead/Write until the handshake is complete
        _check_pin(self, self.context)


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust comes from the attestation, not from a CA
    return ctx


def capture_context() -> ssl.SSLContext:
    """For fetching evidence: accepts any certificate; the caller reads the key it saw from
    the connection (:func:`peer_spki`) and checks that the evidence binds it."""
    return _unverified_context()


def pinned_context(spki_der: bytes) -> ssl.SSLContext:
    """Accepts exactly one server key: every handshake checks the peer's
    SubjectPublicKeyInfo and fails with :class:`PinMismatch` before any data is sent."""
    ctx = _unverified_context()
    pin_spki(ctx, spki_der)
    return ctx


def pin_spki(context: ssl.SSLContext, spki_der: bytes) -> None:
    """Make every handshake of ``context`` (a standard :class:`ssl.SSLContext`) check that
    the peer's SubjectPublicKeyInfo is ``spki_der``, failing with :class:`PinMismatch`
    before any data is sent."""
    _PINS[context] = bytes(spki_der)
    context.sslsocket_class = _PinnedSocket
    context.sslobject_class = _PinnedObject
