"""TLS material for the keyserver: a private CA, the server certificate, client contexts.

``keyserver init`` makes a per-deployment CA and a server certificate for 127.0.0.1,
localhost and any ``--hostname``; clients pin the CA with ``--ca`` rather than trusting the
web PKI.  Operators may bring their own certificate instead (``--tls-cert/--tls-key``).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from .. import crypto
from ..errors import ConfigError

DEFAULT_NAMES = ("localhost",)
DEFAULT_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None


def split_hostnames(hostnames: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) for the server certificate: the defaults plus ``hostnames``."""
    dns, ips = list(DEFAULT_NAMES), list(DEFAULT_IPS)
    for name in hostnames:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() for c in name):
                raise ConfigError(f"invalid --hostname {name!r}") from None
            dns.append(name)
    return tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips))


def make_ca_and_server(hostnames: tuple[str, ...]) -> tuple[bytes, bytes, bytes, bytes]:
    """(CA cert, CA key, server cert, server key), all PEM."""
    dns, ips = split_hostnames(hostnames)
    ca_cert, ca_key = crypto.generate_tls_ca("sealedtorch keyserver CA")
    cert, key = crypto.issue_tls_server_cert(ca_cert, ca_key, common_name="sealedtorch keyserver",
                                             dns_names=dns, ip_addresses=ips)
    return ca_cert, ca_key, cert, key


def client_context(ca: Path | str | ssl.SSLContext | None) -> ssl.SSLContext:
    """An SSL context that trusts exactly ``ca`` (a PEM file), or the system store if None."""
    if isinstance(ca, ssl.SSLContext):
        return ca
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA certificate {ca}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def check_server_files(cert: Path, key: Path) -> None:
    """Fail early (at startup) with a clear message if the certificate and key do not load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} with key {key}: {exc}") from None
