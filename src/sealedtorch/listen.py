"""Listening TCP sockets for the services, bound before any other work, and the
``--listen HOST:PORT`` option they share.

Binding first makes an address in use one clear :class:`~sealedtorch.errors.ConfigError`
("cannot listen on ...: Address already in use", exit 2) before a store is opened, a key
fetched or "listening" logged.  The socket is created with ``IPPROTO_TCP`` so that asyncio
sets ``TCP_NODELAY`` on every accepted connection (it checks the protocol number): without
it, small responses wait for Nagle's algorithm and the peer's delayed ACK (~40 ms each).
"""

from __future__ import annotations

import socket

from .errors import ConfigError

__all__ = ["bind_tcp", "parse_listen"]


def bind_tcp(host: str, port: int, *, backlog: int | None = None) -> socket.socket:
    """A bound (and, with ``backlog``, listening) inheritable TCP socket on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        if backlog is not None:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def parse_listen(listen: str) -> tuple[str, int]:
    """``--listen HOST:PORT`` as (host, port); ``[::1]:8443`` for IPv6, an empty host is
    127.0.0.1 (never all interfaces by accident)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen expects HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
