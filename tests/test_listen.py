"""Service sockets: bound first, and accepted connections get TCP_NODELAY (no Nagle wait)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sealedtorch.errors import ConfigError
from sealedtorch.listen import bind_tcp, parse_listen


def test_accepted_connections_have_tcp_nodelay():
    async def main() -> int:
        flags: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = bind_tcp("127.0.0.1", 0, backlog=8)
        server = await asyncio.start_server(handle, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if flags:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()
        await server.wait_closed()
        return flags[0]

    assert asyncio.run(main()) == 1


def test_an_address_in_use_is_one_config_error():
    first = bind_tcp("127.0.0.1", 0, backlog=1)
    try:
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:.*in use"):
            bind_tcp("127.0.0.1", first.getsockname()[1], backlog=1)
    finally:
        first.close()


def test_the_listen_option_takes_ipv6_in_brackets_and_defaults_an_empty_host():
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    assert parse_listen(":0") == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen("localhost:65536")
