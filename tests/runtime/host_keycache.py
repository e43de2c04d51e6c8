"""Keycaches a hostile host runs, as real processes on a real Unix socket (tests only).

    python host_keycache.py real   SOCKET PLATFORM_DIR LABEL KEYFILE RUNTIME_MEASUREMENT
                                   [RUNTIME_PLATFORM_DIR]
        a genuine sealedtorch keycache (real code) whose TEE measurement is
        measure.measurement(LABEL) on the sim platform in PLATFORM_DIR, holding the key in
        KEYFILE for runtimes of RUNTIME_MEASUREMENT (hex) attesting on PLATFORM_DIR's or
        RUNTIME_PLATFORM_DIR's platform
    python host_keycache.py plain  SOCKET KEYFILE
        a plain process that speaks the local protocol and hands out the host's own key,
        HPKE-sealed to the runtime's public key, with no evidence of its own
    python host_keycache.py relay  SOCKET KEYFILE GENUINE_SOCKET
        a man in the middle: forwards every request to the genuine keycache and answers with
        the genuine keycache's evidence and signature, but with the sealed key replaced by
        the host's own key sealed to the runtime

Each writes "ready" to stdout once it listens, then serves until killed.
"""

from __future__ import annotations

import base64
import json
import os
import socketserver
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any


def _host_key(path: str) -> Any:
    from sealedtorch.keys import read_key_file

    return read_key_file(path)


def _seal_host_key(key: Any, body: dict[str, Any]) -> str:
    from sealedtorch import crypto
    from sealedtorch.keycache import protocol

    public_key = base64.b64decode(body["public_key"])
    nonce = base64.b64decode(body["nonce"])
    info = protocol.release_info(key.model_id, key.version, nonce)
    return base64.b64encode(crypto.hpke_seal(public_key, key.secret, info=info)).decode()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def real(sock: str, platform_dir: str, label: str, key_file: str, runtime_m: str,
         runtime_platform_dir: str | None = None) -> None:
    from sealedtorch.attest import VerifierConfig, measure
    from sealedtorch.attest.attesters import SimAttester
    from sealedtorch.attest.policy import load_policy
    from sealedtorch.attest.sim import SimPlatform
    from sealedtorch.keycache.local import AnswerSigner, EvidenceAppraiser
    from sealedtorch.keycache.server import KeycacheServer
    from sealedtorch.keycache.service import Keycache

    platform = SimPlatform.load(platform_dir)
    key = _host_key(key_file)
    policy = load_policy({"allow": [{"tee": "sim", "measurement": runtime_m}]})

    class Fixed:
        def fetch_all(self) -> list[Any]:
            return [(key, policy)]

    trusted = [platform.public_key]
    if runtime_platform_dir is not None:  # runtimes attest on another (the genuine) platform
        trusted.append(SimPlatform.load(runtime_platform_dir).public_key)
    appraiser = EvidenceAppraiser(VerifierConfig(sim_platform_keys=tuple(trusted)),
                                  tees=["sim"])
    kc = Keycache(Fixed(), appraiser, refresh=3600, max_stale=3600)
    kc.refresh_once()
    signer = AnswerSigner(SimAttester(platform, measure.measurement(label.encode())))
    server = KeycacheServer(kc, sock, signer=signer)
    server._prepare()  # bind first, so "ready" means the socket accepts connections
    import asyncio

    _ready()
    asyncio.run(server._server.serve(sockets=[server._sock]))  # type: ignore[union-attr,list-item]


class _Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _serve(sock: str, answer_key: Any) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, doc: dict[str, Any]) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            status, doc = answer_key(self.path, raw)
            self._send(status, doc)

        def do_GET(self) -> None:
            self._send(200, {"ok": True, "serving": True, "keys": []})

    Path(sock).parent.mkdir(parents=True, exist_ok=True)
    server = _Unix(sock, Handler)
    _ready()
    server.serve_forever()


def plain(sock: str, key_file: str) -> None:
    key = _host_key(key_file)

    def answer(path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        if path.endswith("/challenge"):
            return 200, {"nonce": base64.b64encode(os.urandom(32)).decode(),
                         "expires_in": 30.0, "mode": "peer"}
        body = json.loads(raw)
        return 200, {"model_id": key.model_id, "version": key.version,
                     "sealed_key": _seal_host_key(key, body), "policy_digest": "0" * 64}

    _serve(sock, answer)


def relay(sock: str, key_file: str, genuine: str) -> None:
    import httpx

    key = _host_key(key_file)
    upstream = httpx.Client(transport=httpx.HTTPTransport(uds=genuine),
                            base_url="http://keycache", timeout=30)

    def answer(path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        response = upstream.post(path, content=raw,
                                 headers={"Content-Type": "application/json"})
        doc = response.json()
        if path.endswith("/key") and response.status_code == 200:
            doc["sealed_key"] = _seal_host_key(key, json.loads(raw))
        return response.status_code, doc

    _serve(sock, answer)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"real": real, "plain": plain, "relay": relay}[mode](*rest)
