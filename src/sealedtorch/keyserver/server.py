"""Running the keyserver: assembling it from a data directory, serving it over TLS with
uvicorn, structured (JSON) logs, graceful shutdown, and a background server for tests.

``uvicorn`` stops accepting connections on SIGTERM/SIGINT and waits (up to
``graceful_timeout`` seconds) for requests in flight before the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from .. import attest
from ..attest import sim
from ..listen import bind_tcp, parse_listen
from ..logs import configure_logging
from . import tlog, tls
from .app import RateLimit, create_app
from .audit_recorder import Clock
from .config import (
    ROW_MACS_SETTING,
    KeyserverConfig,
    load_config,
    open_kek,
    open_store,
    set_setting,
    with_database,
)
from .service import Keyserver
from .tokens import TokenSigner

log = logging.getLogger("sealedtorch.keyserver")


def build_keyserver(cfg: KeyserverConfig, *, trust_sim_roots: Sequence[Path | str] = (),
                    clock: Clock = time.time) -> Keyserver:
    roots = sim.load_platform_keys(trust_sim_roots)
    if roots:
        log.warning("trusting %d INSECURE sim platform key(s): every release to sim evidence "
                    "is development-only and is audited as insecure", len(roots),
                    extra={"fields": {"sim_platform_keys": [k.hex() for k in roots]}})
    collateral = cfg.attestation_policy.collateral
    verifier = attest.VerifierConfig(
        sim_platform_keys=roots, pccs_url=cfg.pccs_url, kds_url=cfg.kds_url,
        cache_dir=cfg.data_dir / "cache",
        prefer_verifier_collateral=collateral.prefer == "verifier",
        min_tcb_evaluation_data_number=collateral.min_tcb_evaluation_data_number,
        fetch_amd_crl=True)
    store = open_store(cfg)
    try:
        transparency = tlog.open_log(store, cfg.data_dir)
    except BaseException:
        store.close()
        raise
    service = Keyserver(store=store, kek=open_kek(cfg),
                        signer=TokenSigner.load(cfg.path(cfg.token_signing_key)),
                        verifier=verifier, clock=clock, nonce_ttl=cfg.nonce_ttl,
                        token_ttl=cfg.token_ttl, attestation_policy=cfg.attestation_policy,
                        transparency=transparency)
    try:
        # rows written before row MACs are sealed once (trust on upgrade); afterwards this
        # data directory requires a sealed store
        service.prepare_store(allow_upgrade=cfg.extra.get(ROW_MACS_SETTING) != "required")
        if cfg.extra.get(ROW_MACS_SETTING) != "required":
            set_setting(cfg, ROW_MACS_SETTING, "required")
    except BaseException:
        service.store.close()
        service.kek.close()
        raise
    return service


def uvicorn_config(cfg: KeyserverConfig, service: Keyserver, host: str, port: int, *,
                   graceful_timeout: float = 10.0) -> uvicorn.Config:
    cert, key = cfg.path(cfg.tls_cert), cfg.path(cfg.tls_key)
    tls.check_server_files(cert, key)
    limit = RateLimit(*cfg.rate_limit) if cfg.rate_limit is not None else None
    return uvicorn.Config(
        create_app(service, max_body=cfg.max_body, rate_limit=limit), host=host, port=port,
        ssl_certfile=str(cert), ssl_keyfile=str(key), log_config=None, access_log=False,
        lifespan="off", timeout_graceful_shutdown=int(graceful_timeout), server_header=False,
        backlog=1024)


def run(data_dir: Path | str, listen: str, *, trust_sim_roots: Sequence[Path | str] = (),
        log_format: str = "json", database: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and close the store.  ``database``: a
    PostgreSQL URL replacing the store named in the data directory."""
    configure_logging(log_format)
    cfg = with_database(load_config(data_dir), database)
    host, port = parse_listen(listen)
    sock = bind_listen_socket(host, port)  # before anything is opened or logged
    try:
        service = build_keyserver(cfg, trust_sim_roots=trust_sim_roots)
        server = _QuietServer(uvicorn_config(cfg, service, host, port))
    except BaseException:
        sock.close()
        raise

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: draining requests in flight, then stopping", signum)
        server.force_exit = server.should_exit  # a second signal: stop now
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("keyserver listening on https://%s:%d", host, port,
             extra={"fields": {"data_dir": str(cfg.data_dir), "store": repr(service.store),
                               "kek": service.kek.kek_id,
                               "token_key": service.signer.key_id}})
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.store.close()
        log.info("keyserver stopped")


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` now (see :mod:`sealedtorch.listen`)."""
    return bind_tcp(host, port, backlog=1024)


def _busy(connection: Any) -> bool:
    """A connection with a request in flight (its response not yet complete)."""
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and not getattr(cycle, "response_complete", True)


class _QuietServer(uvicorn.Server):
    """uvicorn's server without its own signal capture (which re-raises the signal after
    draining and so would skip closing the store); :func:`run` installs handlers instead.

    Shutdown drains the requests in flight but does not wait for idle keep-alive
    connections to finish closing: uvicorn closes them with a TLS close_notify and asyncio
    then waits for the peer's answer, which a client that is not reading (a keycache
    between refreshes) never sends, so shutdown took the whole graceful timeout (7-10 s).
    Those connections end with the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def _wait_tasks_to_complete(self) -> None:
        state = self.server_state
        while not self.force_exit and any(_busy(c) for c in list(state.connections)):
            await asyncio.sleep(0.05)
        while not self.force_exit and state.tasks:
            await asyncio.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class BackgroundServer:
    """A keyserver on 127.0.0.1 in a background thread (tests, benchmarks, demos).

    >>> with BackgroundServer.start(cfg, trust_sim_roots=[pub]) as srv:
    ...     srv.url   # https://127.0.0.1:PORT
    """

    service: Keyserver
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    @classmethod
    def start(cls, cfg: KeyserverConfig, *, trust_sim_roots: Sequence[Path | str] = (),
              clock: Clock = time.time, service: Keyserver | None = None,
              timeout: float = 10.0) -> BackgroundServer:
        service = service or build_keyserver(cfg, trust_sim_roots=trust_sim_roots,
                                             clock=clock)
        port = free_port()
        server = _QuietServer(uvicorn_config(cfg, service, "127.0.0.1", port,
                                             graceful_timeout=2))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()),
                                  name=f"keyserver-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("keyserver did not start")
            time.sleep(0.01)
        return cls(service, server, thread, f"https://127.0.0.1:{port}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.store.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

