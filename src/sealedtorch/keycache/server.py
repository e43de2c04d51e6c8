"""The keycache's local server: HTTP over a Unix domain socket, peers identified by SO_PEERCRED.

Access control starts at the file system: the socket is created mode 0660 inside a directory
of mode 0750, so only the keycache's user and group can connect at all.  The socket is bound
inside a private (0700) temporary directory, given its mode there, and only then renamed into
place, so there is no moment at which it is reachable with wider permissions.  (uvicorn's own
``uds=`` option chmods a new socket to 0666, which is why the socket is pre-bound here and
handed to uvicorn with ``sockets=``.)

Every connection's peer credentials (pid, uid, gid, as the kernel recorded them at connect
time) are read once, logged, and made available to the request handlers, which tie nonces to
the uid and apply the optional uid/gid allow-lists.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from uvicorn import Config, Server
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import crypto
from ..attest import Evidence, Tee, binding
from ..errors import ConfigError, RequestError, SealedTorchError
from ..hardening import harden_process as _harden
from ..keys import validate_model_id
from ..keyserver import problems
from . import protocol
from .local import AnswerSigner, LocalRequest, PeerCred, peer_credentials
from .service import Keycache

__all__ = ["KeycacheServer", "bind_unix_socket", "create_app", "harden_process"]

log = logging.getLogger("sealedtorch.keycache.server")

_PEER = "sealedtorch.peer"
_JSON = "application/json"


# --- peer credentials -------------------------------------------------------------------

class PeerCredProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus SO_PEERCRED read once per connection.

    uvicorn copies ``app_state`` into every request's ``scope["state"]``; the credentials
    ride along there, so handlers see the peer of the connection the request came on.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = peer_credentials(transport.get_extra_info("socket"))
        self.app_state = {**self.app_state, _PEER: peer}
        log.debug("keycache: connection from %s", peer or "a peer without credentials")


def _peer(request: Request) -> PeerCred | None:
    state = request.scope.get("state") or {}
    peer = state.get(_PEER)
    return peer if isinstance(peer, PeerCred) else None


# --- the app ----------------------------------------------------------------------------

def _problem(exc: SealedTorchError, headers: dict[str, str] | None = None) -> Response:
    body = problems.problem_for(exc, request_id=None)
    return Response(json.dumps(body), status_code=body["status"], headers=headers,
                    media_type="application/problem+json")


async def _read_json(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > protocol.MAX_BODY):
        raise RequestError(
            f"request body too large (limit {protocol.MAX_BODY} bytes)", http_status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > protocol.MAX_BODY:
            raise RequestError(
                f"request body too large (limit {protocol.MAX_BODY} bytes)", http_status=413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise RequestError("request body is not valid JSON") from None


def _b64(text: str, field: str, size: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: not valid base64") from None
    if size is not None and len(raw) != size:
        raise RequestError(f"{field}: expected {size} bytes, got {len(raw)}")
    return raw


def decode_key_request(data: Any) -> LocalRequest:
    """Validate a key request body; any problem is a :class:`RequestError` naming the field."""
    try:
        body = protocol.KeyRequest.model_validate(data)
    except ValidationError as exc:
        problems_found = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in exc.errors())
        raise RequestError(f"malformed key request: {problems_found}") from None
    try:
        validate_model_id(body.model_id)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    evidence = None
    if body.evidence is not None:
        try:
            tee = Tee(body.evidence.tee)
        except ValueError:
            raise RequestError(f"evidence.tee: unknown TEE {body.evidence.tee!r} "
                               f"(sgx, tdx, snp or sim)") from None
        evidence = Evidence(
            tee, _b64(body.evidence.evidence, "evidence.evidence"),
            collateral=None if body.evidence.collateral is None
            else _b64(body.evidence.collateral, "evidence.collateral"),
            certificates=None if body.evidence.certificates is None
            else _b64(body.evidence.certificates, "evidence.certificates"))
    return LocalRequest(
        model_id=body.model_id, version=body.version,
        nonce=_b64(body.nonce, "nonce", binding.NONCE_SIZE),
        public_key=_b64(body.public_key, "public_key", crypto.X25519_PUBLIC_KEY_SIZE),
        evidence=evidence,
        runtime_nonce=None if body.runtime_nonce is None
        else _b64(body.runtime_nonce, "runtime_nonce", binding.NONCE_SIZE))


def create_app(keycache: Keycache, signer: AnswerSigner | None = None) -> FastAPI:
    """The keycache's local API.  With ``signer``, every key answer carries the keycache's
    own evidence and signature (mutual attestation); without one, runtimes refuse its
    answers."""
    app = FastAPI(title="sealedtorch keycache", docs_url=None, redoc_url=None,
                  openapi_url=None)

    def next_nonce(request: Request) -> dict[str, str]:
        """A fresh nonce for the requester's next key request (like ACME's Replay-Nonce),
        so a runtime that asks again needs one round trip, not two."""
        out = keycache.challenge(_peer(request))
        return {protocol.NONCE_HEADER: base64.b64encode(out["nonce"]).decode(),
                protocol.NONCE_TTL_HEADER: f"{out['expires_in']:g}",
                protocol.MODE_HEADER: out["mode"]}

    @app.exception_handler(SealedTorchError)
    async def _typed(request: Request, exc: SealedTorchError) -> Response:
        headers = next_nonce(request) if request.url.path.endswith("/key") else None
        return _problem(exc, headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("keycache: internal error on %s", request.url.path)
        body = problems.internal_problem(request_id=None)
        return Response(json.dumps(body), status_code=500,
                        media_type="application/problem+json")

    @app.post(f"{protocol.API_PREFIX}/challenge")
    async def challenge(request: Request) -> Response:
        out = keycache.challenge(_peer(request))
        out["nonce"] = base64.b64encode(out["nonce"]).decode()
        return JSONResponse(out)

    @app.post(f"{protocol.API_PREFIX}/key")
    async def key(request: Request) -> Response:
        local = decode_key_request(await _read_json(request))
        peer = _peer(request)
        if keycache.appraiser.may_block:
            out = await run_in_threadpool(keycache.release, local, peer)
        else:
            out = keycache.release(local, peer)
        if signer is not None:
            proof = await run_in_threadpool(signer.answer, local, out) if signer.may_block \
                else signer.answer(local, out)
            out.update(proof)
        out["sealed_key"] = base64.b64encode(out["sealed_key"]).decode()
        return JSONResponse(out, headers=next_nonce(request))

    @app.get(f"{protocol.API_PREFIX}/status")
    async def status() -> Response:
        return JSONResponse(keycache.status())

    @app.get(f"{protocol.API_PREFIX}/health")
    async def health() -> Response:
        return JSONResponse({"ok": True, "serving": not keycache.store.is_stale()})

    return app


# --- the process ------------------------------------------------------------------------

def harden_process() -> list[str]:
    """No core dumps, not dumpable (see :mod:`sealedtorch.hardening`, shared with the
    runtime).  Returns what could not be done."""
    return _harden("keycache")


# --- the socket -------------------------------------------------------------------------

def _prepare_directory(directory: Path, dir_mode: int) -> None:
    if not directory.exists():
        try:
            directory.mkdir(mode=dir_mode, parents=True)
            os.chmod(directory, dir_mode)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise ConfigError(f"cannot create socket directory {directory}: {exc}") from None
        return
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory} is not a directory")
    if stat.S_IMODE(st.st_mode) != dir_mode and st.st_uid == os.geteuid():
        os.chmod(directory, dir_mode)
    elif stat.S_IMODE(st.st_mode) & 0o002 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"socket directory {directory} is world-writable and not ours: "
                          f"anyone could replace the socket; use a directory of our own")


def _clear_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: a leftover from a crash
        log.info("keycache: removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise ConfigError(f"cannot listen on {path}: Address already in use (another process "
                      f"is already serving on it)")


def bind_unix_socket(path: str | os.PathLike[str], *, mode: int = 0o660,
                     dir_mode: int = 0o750, group: int | None = None,
                     backlog: int = 1024) -> socket.socket:
    """Create a listening Unix socket at ``path`` with ``mode`` (and ``group``), in a
    directory of ``dir_mode``, without ever exposing it with wider permissions."""
    path = Path(path).absolute()
    if len(os.fsencode(path)) > 107:
        raise ConfigError(f"socket path too long for a Unix socket (max 107 bytes): {path}")
    _prepare_directory(path.parent, dir_mode)
    _clear_stale(path)
    private = Path(tempfile.mkdtemp(prefix=".keycache-", dir=path.parent))  # mode 0700
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staged = private / "s"
        sock.bind(str(staged))
        os.chmod(staged, mode)
        if group is not None:
            os.chown(staged, -1, group)
        sock.listen(backlog)  # before it appears: nobody who finds it is refused
        os.rename(staged, path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create socket {path}: {exc}") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)
    sock.setblocking(False)
    return sock


class _Server(Server):
    """uvicorn without its own signal capture: it re-raises SIGTERM after draining, which
    would kill the process before the keys are wiped.  :meth:`KeycacheServer.serve` installs
    its own handlers instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class KeycacheServer:
    """Serve a :class:`Keycache` on a Unix socket (blocking :meth:`serve`, or a thread)."""

    def __init__(self, keycache: Keycache, socket_path: str | os.PathLike[str], *,
                 mode: int = 0o660, dir_mode: int = 0o750, group: int | None = None,
                 sock: socket.socket | None = None,
                 signer: AnswerSigner | None = None) -> None:
        """``sock``: a socket already made by :func:`bind_unix_socket` for ``socket_path``
        (``keycache run`` binds first, so that a socket in use fails before any key is
        fetched).  ``signer``: proves every answer (the keycache's evidence and signature)."""
        self.keycache = keycache
        self.signer = signer
        self.socket_path = Path(socket_path).absolute()
        self._mode, self._dir_mode, self._group = mode, dir_mode, group
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = sock
        self._inode: tuple[int, int] | None = None

    def _prepare(self) -> Server:
        if self._sock is None:
            self._sock = bind_unix_socket(self.socket_path, mode=self._mode,
                                          dir_mode=self._dir_mode, group=self._group)
        st = self.socket_path.stat()
        self._inode = (st.st_dev, st.st_ino)
        if self.signer is None:
            log.warning("keycache: serving WITHOUT an answer signer: runtimes that "
                        "authenticate their keycache (every sealedtorch runtime) refuse its "
                        "answers")
        config = Config(create_app(self.keycache, self.signer), http=PeerCredProtocol,
                        lifespan="off",
                        log_config=None, access_log=False, server_header=False,
                        timeout_keep_alive=30, backlog=1024)
        self._server = _Server(config)
        log.info("keycache: serving on %s (mode %04o)", self.socket_path, self._mode)
        return self._server

    def serve(self) -> None:
        """Serve until SIGINT/SIGTERM (in the main thread) or :meth:`stop`; SIGHUP asks the
        keycache to refresh now."""
        server = self._prepare()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def stop(signum: int, _frame: object) -> None:
                log.info("keycache: signal %d, stopping", signum)
                server.force_exit = server.should_exit  # a second signal: stop now
                server.should_exit = True

            def refresh(_signum: int, _frame: object) -> None:
                self.keycache.refresh_soon()

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM,
                                                                  signal.SIGINT)}
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, refresh)
        try:
            asyncio.run(server.serve(sockets=[self._sock]))  # type: ignore[list-item]
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._cleanup()

    def start(self) -> KeycacheServer:
        """Serve in a background thread; returns once the socket accepts connections."""
        server = self._prepare()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[self._sock])),  # type: ignore[list-item]
            name="keycache-server", daemon=True)
        self._thread.start()
        for _ in range(500):
            if server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not server.started:
            raise ConfigError(f"keycache server did not start on {self.socket_path}")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        try:
            st = self.socket_path.lstat()
        except FileNotFoundError:
            return
        if self._inode == (st.st_dev, st.st_ino):  # still ours: remove it
            self.socket_path.unlink(missing_ok=True)
