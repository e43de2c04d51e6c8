"""Assembling a runtime and running it: :func:`build_runtime` (everything but the network),
the uvicorn server it runs in, and :func:`serve` (``sealedtorch serve``).

Invariants:

- the listening socket is bound before models load or "listening" is logged (an address in
  use is one clear error, see :mod:`sealedtorch.listen`);
- the server listens (live) at once and loads models in a background thread after it
  listens; the announce file (``--announce``) is written only once it accepts connections;
- shutdown (a signal, or a model failing to load) stops accepting, finishes requests in
  flight, then drains the workers and zeroes the weights (:meth:`Runtime.close`); a second
  signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import uvicorn

from ..atomicfile import write_atomically
from ..errors import ConfigError
from ..hardening import harden_process
from ..keys import KeySource
from ..listen import bind_tcp, parse_listen
from ..logs import configure_logging
from .app import create_app
from .config import RuntimeConfig, load_config
from .loader import LoadedModel, resolve_device
from .state import Runtime, Source
from .tls import ServerTls

__all__ = ["RuntimeUvicorn", "build_runtime", "listening_url", "serve", "uvicorn_server",
           "write_certificate"]

log = logging.getLogger("sealedtorch.runtime")

#: A path given by a caller: a string or anything :func:`os.fspath` accepts.
PathArg = str | os.PathLike[str]


def build_runtime(models: Sequence[Source | LoadedModel], *, keys: KeySource | None = None,
                  config: RuntimeConfig | PathArg | None = None,
                  tls_cert: PathArg | None = None, tls_key: PathArg | None = None,
                  hosts: Sequence[str] = (), tee: str | None = "auto",
                  sim_platform: PathArg | None = None, attester: Any = None) -> Runtime:
    """Everything but the network: config, TLS identity, attester, model slots."""
    cfg = load_config(config)
    if not models:
        raise ConfigError("no models to serve: give at least one --model NAME=PATH.sealed")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = ServerTls.from_files(os.fspath(tls_cert), os.fspath(tls_key)) \
        if tls_cert is not None and tls_key is not None else ServerTls.generate(hosts)
    if attester is None and tee is not None:
        from ..attest.attesters import get_attester

        attester = get_attester(tee, sim_platform=None if sim_platform is None
                                else os.fspath(sim_platform),
                                runtime_config=cfg.canonical_bytes())
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    runtime = Runtime(cfg, tls, attester=attester, keys=keys, device=resolve_device(cfg))
    for m in models:
        runtime.add(m)
    return runtime


# --- the HTTP server --------------------------------------------------------------------

class RuntimeUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling (:func:`serve` and the thread runner stop it
    themselves, and must still drain the workers after it returns), with a hook that runs
    once it listens."""

    after_startup: Callable[[], None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit and self.after_startup is not None:
            self.after_startup()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Idle keep-alive connections are dropped at once: closing them politely waits for
        # the client's TLS close_notify, which an idle client never sends.  Connections with
        # a request in flight finish it first (uvicorn's graceful shutdown).
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if transport is not None and (cycle is None or cycle.response_complete):
                transport.abort()
        await super().shutdown(sockets=sockets)


def uvicorn_server(runtime: Runtime, graceful: float) -> RuntimeUvicorn:
    """The server for ``runtime``'s app over its TLS context (run it on a bound socket)."""
    config = uvicorn.Config(
        create_app(runtime), log_config=None, access_log=False, lifespan="off",
        ssl_context_factory=lambda _config, _default: runtime.tls.context,
        timeout_graceful_shutdown=max(1, int(graceful)), server_header=False,
        backlog=1024)
    return RuntimeUvicorn(config)


def listening_url(host: str, port: int) -> str:
    """The URL a local client reaches ``host:port`` at (all interfaces: the loopback)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    shown = "[::1]" if shown == "::" else (f"[{shown}]" if ":" in shown else shown)
    return f"https://{shown}:{port}"


# --- sealedtorch serve ------------------------------------------------------------------

def serve(models: Sequence[Source], *, keys: KeySource | None,
          config: RuntimeConfig | PathArg | None = None,
          listen: str = "127.0.0.1:8443", tls_cert: PathArg | None = None,
          tls_key: PathArg | None = None, tee: str = "auto",
          sim_platform: PathArg | None = None, announce: PathArg | None = None,
          exit_on_load_failure: bool = True, graceful_timeout: float = 10.0,
          log_format: str = "json", write_cert: PathArg | None = None) -> int:
    """``sealedtorch serve``: run until SIGTERM/SIGINT (then drain and stop), or until a
    model fails to load (exit status 2 with the reason) unless ``exit_on_load_failure`` is
    false, in which case the server stays up, live but unready."""
    configure_logging(log_format)
    hardening_problems = harden_process("runtime")
    host, port = parse_listen(listen)
    runtime = build_runtime(models, keys=keys, config=config, tls_cert=tls_cert,
                            tls_key=tls_key, hosts=(host,), tee=tee, sim_platform=sim_platform)
    sock = bind_tcp(host, port)
    if write_cert is not None:
        try:
            write_certificate(runtime.tls, write_cert)
        except BaseException:
            sock.close()
            raise
    server = uvicorn_server(runtime, graceful_timeout)
    url = listening_url(host, sock.getsockname()[1])
    failure: list[BaseException] = []

    def load() -> None:
        runtime.load_all()
        if runtime.failures and exit_on_load_failure and not runtime.stopping:
            err = runtime.failures[0].error
            failure.append(err if err is not None else ConfigError("model failed to load"))
            server.should_exit = True

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: draining requests in flight, then stopping", signum)
        server.force_exit = server.should_exit  # a second signal: stop now
        runtime.stopping = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    loader = threading.Thread(target=load, name="runtime-loader", daemon=True)

    def started() -> None:
        _log_listening(runtime, url, hardened=not hardening_problems)
        if announce is not None:
            _announce(Path(announce), {"url": url, "pid": os.getpid(),
                                       "tls_spki_sha256": runtime.tls.spki_sha256,
                                       "cert_pem": runtime.tls.cert_pem.decode()})
        loader.start()
        runtime.start_watching()

    server.after_startup = started

    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        runtime.stopping = True
        if loader.is_alive():
            loader.join(timeout=graceful_timeout)
        runtime.close(graceful_timeout)
        sock.close()
        log.info("runtime stopped")
    if failure:
        raise failure[0]
    return 0


def _log_listening(runtime: Runtime, url: str, *, hardened: bool) -> None:
    log.info("runtime listening on %s", url, extra={"fields": {
        "url": url, "tls_spki_sha256": runtime.tls.spki_sha256,
        "tls_generated": runtime.tls.generated, "models": list(runtime.slots),
        "device": str(runtime.device), "hardened": hardened,
        "config_sha256": hashlib.sha256(runtime.config.canonical_bytes()).hexdigest()}})


def write_certificate(tls: ServerTls, path: PathArg) -> Path:
    """Write the serving certificate (and its throwaway CA, if generated) to ``path``
    (``serve --write-cert``), atomically, world-readable: it is public.  A client may pin
    it only after checking that its key is the one ``/v1/attestation`` binds (see
    docs/runtime.md); the file itself proves nothing."""
    target = Path(path)
    try:
        write_atomically(target, tls.trust_pem, mode=0o644)
    except OSError as exc:
        raise ConfigError(f"--write-cert: cannot write {target}: {exc.strerror}") from None
    log.info("wrote the TLS certificate to %s", target,
             extra={"fields": {"path": str(target), "tls_spki_sha256": tls.spki_sha256}})
    return target


def _announce(path: Path, doc: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(doc).encode(), mode=0o644)
