"""The runtime's side of the local channel: :class:`KeycacheClient`.

::

    from sealedtorch.keycache import KeycacheClient
    client = KeycacheClient("/run/sealedtorch/keycache.sock")
    state = sealedtorch.load_state_dict("model.sealed", key=client)   # id + version from file

Each :meth:`KeycacheClient.get_key` is one fresh exchange: ask for a nonce, make an ephemeral
X25519 key pair, produce evidence binding both (unless the keycache runs in peer mode), send
it, and open the HPKE-sealed answer.  The client keeps no keys.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from collections import deque
from typing import Any

import httpx

from .. import crypto
from ..attest import binding
from ..errors import IntegrityError, KeyUnavailable, NonceError, SealedTorchError
from ..keys import ModelKey, validate_model_id
from ..keyserver import problems
from . import protocol
from .store import KeysStale  # noqa: F401  (so problem types map back to this class)
from .upstream import UpstreamUnavailable  # noqa: F401  (idem)

__all__ = ["ENV_RUNTIME_CONFIG", "ENV_SOCKET", "KeycacheClient", "KeycacheUnavailable",
           "default_runtime_config"]


_NONCE_POOL = 64


#: The keycache socket a :class:`KeycacheClient` uses when none is given.
ENV_SOCKET = "SEALEDTORCH_KEYCACHE_SOCKET"
#: The runtime configuration file a process in the sim TEE is measured with by default.
ENV_RUNTIME_CONFIG = "SEALEDTORCH_RUNTIME_CONFIG"


def default_runtime_config() -> bytes:
    """The canonical runtime configuration this process is measured with when none is
    given: the file ``$SEALEDTORCH_RUNTIME_CONFIG`` names, else the defaults.  The same
    bytes `sealedtorch serve --config FILE --print-config` prints, so a script and the
    runtime under one configuration have one measurement."""
    from ..runtime.config import load_config  # the runtime's schema (it is what's measured)

    return load_config(os.environ.get(ENV_RUNTIME_CONFIG) or None).canonical_bytes()


class KeycacheUnavailable(KeyUnavailable):
    """The keycache cannot be reached on its socket, or answered outside the protocol."""

    problem_type = "keycache-unavailable"
    http_status = 503


class KeycacheClient:
    """A :class:`~sealedtorch.keys.KeySource` backed by the local keycache.

    ``attester``: what produces this runtime's evidence; by default the TEE this process
    runs in (:func:`sealedtorch.attest.attesters.get_attester` with ``tee``, ``sim_platform``
    and ``runtime_config``), created on first use and only if the keycache asks for evidence.
    Thread-safe: concurrent :meth:`get_key` calls share one connection pool.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 attester: Any = None, tee: str = "auto",
                 sim_platform: str | os.PathLike[str] | None = None,
                 runtime_config: bytes | None = None, timeout: float = 10.0) -> None:
        # socket_path None: $SEALEDTORCH_KEYCACHE_SOCKET, else the default socket (the same
        # rule as `keycache run`).  runtime_config None: the configuration a script in the
        # TEE is measured with (sim TEE): $SEALEDTORCH_RUNTIME_CONFIG, else the runtime's
        # defaults, i.e. the measurement of `sealedtorch serve` with the same --config, so
        # one policy entry covers the runtime and a script using the Python API.
        if socket_path is None:
            socket_path = os.environ.get(ENV_SOCKET) or protocol.DEFAULT_SOCKET
        self.socket_path = os.fspath(socket_path)
        self._attester = attester
        self._attester_args = {"tee": tee, "sim_platform": sim_platform,
                               "runtime_config": runtime_config}
        self._attester_lock = threading.Lock()
        # nonces the keycache handed out with earlier answers: (nonce, mode, use-before)
        self._nonces: deque[tuple[bytes, str, float]] = deque(maxlen=_NONCE_POOL)
        # Keep-alive expiry well above httpx's 5 s default (and below the server's 30 s):
        # under CPU starvation httpcore can close a connection that has just been handed to
        # a waiting request once its idle time crosses the expiry, and that request then
        # reads a closed socket (EBADF).  Enough connections that 200+ concurrent runtimes
        # in one process never queue for one.
        transport = httpx.HTTPTransport(
            uds=self.socket_path, retries=0,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64,
                                keepalive_expiry=20.0))
        self._http = httpx.Client(transport=transport, base_url="http://keycache",
                                  timeout=timeout)

    def __repr__(self) -> str:
        return f"KeycacheClient({self.socket_path!r})"

    def __enter__(self) -> KeycacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- the key source -----------------------------------------------------------------

    def get_key(self, model_id: str, version: int | None = None) -> ModelKey:
        """The key for ``model_id`` (``version=None``: the latest the keycache holds)."""
        validate_model_id(model_id)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or version < 1):
            raise ValueError("key version must be a positive integer")
        cached = self._take_nonce()
        if cached is not None:
            try:
                return self._exchange(model_id, version, *cached)
            except NonceError:
                pass  # the keycache restarted or forgot it: one retry with a fresh challenge
        challenge = self._call("POST", "/challenge")
        nonce = _b64(challenge.get("nonce"), "nonce", binding.NONCE_SIZE)
        return self._exchange(model_id, version, nonce, str(challenge.get("mode")))

    def _exchange(self, model_id: str, version: int | None, nonce: bytes,
                  mode: str) -> ModelKey:
        ephemeral = crypto.EphemeralKeyPair.generate()
        public_key = ephemeral.public_bytes
        body: dict[str, Any] = {"model_id": model_id, "nonce": _enc(nonce),
                                "public_key": _enc(public_key)}
        if version is not None:
            body["version"] = version
        if mode == "evidence":
            evidence = self.attester.evidence(binding.report_data(nonce, public_key))
            body["evidence"] = evidence.to_json()
        elif mode != "peer":
            raise KeycacheUnavailable(f"keycache asked for an unknown proof mode {mode!r}")
        answer = self._call("POST", "/key", body)
        got_id, got_version = answer.get("model_id"), answer.get("version")
        if got_id != model_id or not isinstance(got_version, int) or \
                (version is not None and got_version != version):
            raise IntegrityError(
                f"keycache answered with a key for {got_id!r} version {got_version!r}, "
                f"not the requested {model_id!r} version {version or 'latest'}")
        sealed = _b64(answer.get("sealed_key"), "sealed_key")
        secret = ephemeral.open(sealed, info=protocol.release_info(model_id, got_version,
                                                                   nonce))
        return ModelKey(model_id, got_version, secret)

    def _take_nonce(self) -> tuple[bytes, str] | None:
        now = time.monotonic()
        while True:
            try:
                nonce, mode, use_before = self._nonces.popleft()  # atomic: thread-safe
            except IndexError:
                return None
            if now < use_before:
                return nonce, mode

    def _keep_nonce(self, headers: httpx.Headers) -> None:
        raw, ttl, mode = (headers.get(protocol.NONCE_HEADER),
                          headers.get(protocol.NONCE_TTL_HEADER),
                          headers.get(protocol.MODE_HEADER))
        if not raw or not ttl or not mode:
            return
        try:
            nonce = base64.b64decode(raw, validate=True)
            lifetime = float(ttl)
        except (binascii.Error, ValueError):
            return
        if len(nonce) == binding.NONCE_SIZE and lifetime > 0:
            # use it well before the keycache's deadline: no request races the expiry
            self._nonces.append((nonce, mode, time.monotonic() + lifetime * 0.5))

    @property
    def attester(self) -> Any:
        with self._attester_lock:
            if self._attester is None:
                from ..attest.attesters import get_attester

                args: dict[str, Any] = dict(self._attester_args)
                if args["runtime_config"] is None:
                    args["runtime_config"] = default_runtime_config()
                self._attester = get_attester(**args)
            return self._attester

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What the keycache holds and how fresh it is (never key bytes)."""
        return self._call("GET", "/status")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    # --- transport ----------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        url = protocol.API_PREFIX + path
        if not os.path.exists(self.socket_path):
            raise KeycacheUnavailable(
                f"cannot reach the keycache: no socket at {self.socket_path} (is `sealedtorch "
                f"keycache run` running?)")
        try:
            response = self._http.request(method, url, json=body)
        except httpx.TimeoutException:
            raise KeycacheUnavailable(
                f"keycache at {self.socket_path} did not answer in time") from None
        except (httpx.TransportError, OSError) as exc:
            raise KeycacheUnavailable(
                f"cannot reach the keycache at {self.socket_path}: {exc} (is `sealedtorch "
                f"keycache run` running, and may this user open the socket?)") from None
        if path == "/key":
            self._keep_nonce(response.headers)
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.is_success:
            if not isinstance(data, dict):
                raise KeycacheUnavailable(
                    f"keycache at {self.socket_path} answered {method} {url} with something "
                    f"that is not a JSON object")
            return data
        exc = problems.error_from_problem(data, response.status_code)
        if type(exc) is SealedTorchError:  # not a problem we know: say where it came from
            raise KeycacheUnavailable(f"keycache error (HTTP {response.status_code}): "
                                      f"{exc}") from None
        raise exc


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64(value: Any, field: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise KeycacheUnavailable(f"keycache answer lacks {field}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeycacheUnavailable(f"keycache answer: {field} is not base64") from None
    if size is not None and len(raw) != size:
        raise KeycacheUnavailable(f"keycache answer: {field} has {len(raw)} bytes, "
                                  f"expected {size}")
    return raw
