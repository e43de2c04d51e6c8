"""A runtime serving in a background thread of this process (tests, demos, benchmarks)::

    with RuntimeServer.start([ModelSource("resnet50", path)], keys=keycache_client,
                             sim_platform=platform_dir) as srv:
        srv.wait_ready()
        srv.url, srv.spki          # https://127.0.0.1:PORT, the attested TLS key

It listens before :meth:`RuntimeServer.start` returns and loads models afterwards, in
another thread, as ``sealedtorch serve`` does; :meth:`RuntimeServer.stop` drains the same
way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..keys import KeySource
from ..listen import bind_tcp
from .config import RuntimeConfig
from .loader import LoadedModel
from .serving import PathArg, RuntimeUvicorn, build_runtime, listening_url, uvicorn_server
from .state import Runtime, Source

__all__ = ["RuntimeServer"]


@dataclass
class RuntimeServer:
    """A runtime serving in a background thread of this process."""

    runtime: Runtime
    server: RuntimeUvicorn
    thread: threading.Thread
    loader: threading.Thread
    url: str
    sock: socket.socket = field(repr=False)

    @classmethod
    def start(cls, models: Sequence[Source | LoadedModel], *, keys: KeySource | None = None,
              config: RuntimeConfig | PathArg | None = None,
              host: str = "127.0.0.1", port: int = 0,
              tls_cert: PathArg | None = None, tls_key: PathArg | None = None,
              tee: str | None = "auto", sim_platform: PathArg | None = None,
              attester: Any = None, graceful_timeout: float = 5.0,
              timeout: float = 10.0) -> RuntimeServer:
        """Listen on ``host:port`` (0: any free port), then load ``models`` in the
        background.  Returns as soon as the server accepts connections (live)."""
        runtime = build_runtime(models, keys=keys, config=config, tls_cert=tls_cert,
                                tls_key=tls_key, hosts=(host,), tee=tee,
                                sim_platform=sim_platform, attester=attester)
        sock = bind_tcp(host, port)
        server = uvicorn_server(runtime, graceful_timeout)
        bound = sock.getsockname()[1]
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                  name=f"runtime-{bound}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise ConfigError("the runtime's HTTP server did not start")
            time.sleep(0.005)
        loader = threading.Thread(target=runtime.load_all, name="runtime-loader", daemon=True)
        loader.start()
        runtime.start_watching()
        return cls(runtime, server, thread, loader, listening_url(host, bound), sock)

    @property
    def spki(self) -> bytes:
        return self.runtime.tls.spki

    @property
    def cert_pem(self) -> bytes:
        return self.runtime.tls.cert_pem

    def wait_ready(self, timeout: float = 120.0) -> RuntimeServer:
        """Block until every model is loaded; raise the first load failure."""
        if not self.runtime.wait_loaded(timeout):
            raise TimeoutError(f"models not loaded within {timeout} s")
        failures = self.runtime.failures
        if failures and failures[0].error is not None:
            raise failures[0].error
        return self

    def stop(self) -> None:
        """Stop accepting, finish requests in flight, drain workers, zero weights."""
        self.runtime.stopping = True
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.loader.join(timeout=30)
        self.runtime.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RuntimeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
