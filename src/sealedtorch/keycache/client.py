"""The runtime's side of the local channel: :class:`KeycacheClient`.

::

    from sealedtorch.keycache import KeycacheClient
    client = KeycacheClient("/run/sealedtorch/keycache.sock")
    state = sealedtorch.load_state_dict("model.sealed", key=client)   # id + version from file

Each :meth:`KeycacheClient.get_key` is one fresh exchange: ask for a nonce, make an ephemeral
X25519 key pair, produce evidence binding both (unless the keycache runs in peer mode), send
it with a nonce of the runtime's own, *authenticate the keycache that answered*, and only
then open the HPKE-sealed answer.  The client keeps no keys.

Authenticating the keycache (mutual attestation): the answer must carry the keycache's own
evidence, bound to the runtime's nonce and the keycache's Ed25519 answer key, and that key's
signature over the whole answer (see :mod:`.protocol`).  The evidence is verified through the
attestation front door and its claims must match one of ``keycache_rules`` — the ``keycache``
rules of the runtime's measured configuration (:class:`sealedtorch.runtime.config.
RuntimeConfig`), so the runtime's measurement pins which keycache it trusts.  No rules: every
key request is refused with :class:`~sealedtorch.errors.ConfigError`.  Sim evidence is
trusted only from the platform keys that the sim rules themselves name.  In ``peer`` mode
(one confidential VM) the keycache's claims must in addition report the same TEE identity as
the runtime's own evidence (see docs/keycache.md for what that does and does not prove).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import httpx

from .. import crypto
from ..attest import Claims, Evidence, Tee, VerifierConfig, binding, verify
from ..attest.policy import Rule, decide
from ..errors import (
    AttestationError,
    ConfigError,
    IntegrityError,
    KeycacheAttestationError,
    KeycacheUnavailable,
    NonceError,
    SealedTorchError,
)
from ..keys import ModelKey, validate_model_id
from ..keyserver import problems
from . import protocol
from .local import same_tee_instance
from .store import KeysStale  # noqa: F401  (so problem types map back to this class)
from .upstream import UpstreamUnavailable  # noqa: F401  (idem)

__all__ = ["ENV_RUNTIME_CONFIG", "ENV_SOCKET", "KeycacheClient", "KeycacheUnavailable",
           "default_keycache_rules", "default_runtime_config"]


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


def default_keycache_rules() -> tuple[Rule, ...] | None:
    """The ``keycache`` rules of the runtime configuration ``$SEALEDTORCH_RUNTIME_CONFIG``
    names (None when unset or without rules): whom a process measured with that
    configuration accepts keys from."""
    from ..runtime.config import load_config

    path = os.environ.get(ENV_RUNTIME_CONFIG)
    return load_config(path).keycache if path else None


class KeycacheClient:
    """A :class:`~sealedtorch.keys.KeySource` backed by the local keycache.

    ``attester``: what produces this runtime's evidence; by default the TEE this process
    runs in (:func:`sealedtorch.attest.attesters.get_attester` with ``tee``, ``sim_platform``
    and ``runtime_config``), created on first use and only if the keycache asks for evidence.
    ``keycache_rules``: the policy rules (same shape as a model policy's ``allow`` entries)
    the answering keycache must match — pass ``RuntimeConfig.keycache``; without them
    :meth:`get_key` refuses.  ``verifier``: collateral sources for hardware keycache
    evidence (its sim platform keys are replaced by those the sim rules name).
    Thread-safe: concurrent :meth:`get_key` calls share one connection pool.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *,
                 attester: Any = None, tee: str = "auto",
                 sim_platform: str | os.PathLike[str] | None = None,
                 runtime_config: bytes | None = None, timeout: float = 10.0,
                 keycache_rules: Sequence[Rule] | None = None,
                 verifier: VerifierConfig | None = None) -> None:
        # socket_path None: $SEALEDTORCH_KEYCACHE_SOCKET, else the default socket (the same
        # rule as `keycache run`).  runtime_config None: the configuration a script in the
        # TEE is measured with (sim TEE): $SEALEDTORCH_RUNTIME_CONFIG, else the runtime's
        # defaults, i.e. the measurement of `sealedtorch serve` with the same --config, so
        # one policy entry covers the runtime and a script using the Python API.
        # keycache_rules None with runtime_config None: the `keycache` rules of that same
        # measured configuration (so `KeycacheClient()` trusts what `serve` would trust).
        if socket_path is None:
            socket_path = os.environ.get(ENV_SOCKET) or protocol.DEFAULT_SOCKET
        if keycache_rules is None and runtime_config is None:
            keycache_rules = default_keycache_rules()
        self.socket_path = os.fspath(socket_path)
        self.keycache_rules = tuple(keycache_rules) if keycache_rules is not None else None
        self._verifier = keycache_verifier(self.keycache_rules or (), verifier)
        self._own_claims: Claims | None = None
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
        if not self.keycache_rules:
            raise ConfigError(
                "no keycache rule configured: the runtime accepts keys only from a keycache "
                "whose evidence matches a `keycache` rule of its measured configuration "
                "(RuntimeConfig.keycache; for sim: tee sim, the keycache's measurement from "
                "`sealedtorch attest measure`, and its platform_key)")
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
        runtime_nonce = crypto.random_bytes(binding.NONCE_SIZE)
        body: dict[str, Any] = {"model_id": model_id, "nonce": _enc(nonce),
                                "public_key": _enc(public_key),
                                "runtime_nonce": _enc(runtime_nonce)}
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
        policy_digest = answer.get("policy_digest")
        if not isinstance(policy_digest, str):
            raise KeycacheUnavailable("keycache answer lacks policy_digest")
        self._authenticate(answer, mode, protocol.answer_transcript_parts(
            public_key=public_key, nonce=nonce, runtime_nonce=runtime_nonce,
            model_id=got_id, version=got_version, sealed_key=sealed,
            policy_digest=policy_digest), runtime_nonce)
        secret = ephemeral.open(sealed, info=protocol.release_info(model_id, got_version,
                                                                   nonce))
        return ModelKey(model_id, got_version, secret)

    def _authenticate(self, answer: dict[str, Any], mode: str, parts: tuple[bytes, ...],
                      runtime_nonce: bytes) -> Claims:
        """Who answered?  Raise :class:`KeycacheAttestationError` unless the answer carries
        evidence bound to our nonce and its signing key, that key signed exactly this
        answer, and the claims match a keycache rule (and, in peer mode, our own TEE)."""
        raw_evidence, raw_key, raw_sig = (answer.get("keycache_evidence"),
                                          answer.get("keycache_key"), answer.get("signature"))
        if raw_evidence is None or raw_key is None or raw_sig is None:
            raise KeycacheAttestationError(
                f"the keycache at {self.socket_path} answered without evidence of its own "
                f"(no keycache_evidence/keycache_key/signature): an impostor, or a keycache "
                f"too old to be authenticated; the key is not used")
        evidence = _evidence(raw_evidence)
        answer_key = _proof_b64(raw_key, "keycache_key", crypto.ED25519_PUBLIC_KEY_SIZE)
        signature = _proof_b64(raw_sig, "signature", 64)
        try:
            claims = verify(evidence, config=self._verifier)
        except AttestationError as exc:
            raise KeycacheAttestationError(
                f"the keycache's evidence does not verify ({type(exc).__name__}: {exc})"
            ) from None
        expected = protocol.answer_report_data(runtime_nonce, answer_key)
        if not crypto.constant_time_equal(claims.report_data, expected):
            raise KeycacheAttestationError(
                "the keycache's evidence is not bound to this request (report_data does not "
                "bind the runtime's nonce and the answer key: replayed or borrowed evidence)")
        if not crypto.verify_transcript(answer_key, signature,
                                        protocol.ANSWER_SIGNATURE_LABEL, *parts):
            raise KeycacheAttestationError(
                "the signature over the keycache's answer does not verify under the attested "
                "answer key (the answer was modified, or assembled by someone else)")
        decision = decide(claims, self.keycache_rules or (), role="keycache")
        if not decision.allowed:
            raise KeycacheAttestationError(
                f"the keycache at {self.socket_path} matches no keycache rule of this "
                f"runtime's configuration", decision.reasons)
        if mode == "peer":
            differences = same_tee_instance(self._self_claims(), claims)
            if differences:
                raise KeycacheAttestationError(
                    "peer mode: the keycache does not report this runtime's own TEE identity "
                    "(one confidential VM must report one identity)", differences)
        return claims

    def _self_claims(self) -> Claims:
        """This runtime's own verified claims (peer mode compares them with the keycache's)."""
        if self._own_claims is None:
            nonce = crypto.random_bytes(binding.NONCE_SIZE)
            key = crypto.SigningKey.generate().public_bytes
            evidence = self.attester.evidence(protocol.answer_report_data(nonce, key))
            try:
                self._own_claims = verify(evidence, config=self._verifier)
            except AttestationError as exc:
                raise KeycacheAttestationError(
                    f"peer mode: this runtime's own evidence does not verify against the "
                    f"keycache rules' trust anchors ({exc})") from None
        return self._own_claims

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
        error = problems.error_from_problem(data, response.status_code)
        if type(error) is SealedTorchError:  # not a problem we know: say where it came from
            raise KeycacheUnavailable(f"keycache error (HTTP {response.status_code}): "
                                      f"{error}") from None
        raise error


def keycache_verifier(rules: Sequence[Rule], base: VerifierConfig | None = None
                      ) -> VerifierConfig:
    """The verifier configuration for keycache evidence: ``base`` (collateral sources) with
    exactly the sim platform keys that the sim ``rules`` name (so trust in a sim keycache
    comes from the measured configuration only).  A sim rule without ``platform_key`` is a
    :class:`ConfigError`."""
    keys: list[bytes] = []
    for rule in rules:
        if rule.tee == "sim":
            if not rule.platform_key:
                raise ConfigError("a sim keycache rule must name platform_key (the keycache's "
                                  "sim platform.pub, hex): the runtime trusts sim evidence "
                                  "only from platforms its measured configuration names")
            keys.extend(bytes.fromhex(k) for k in rule.platform_key)
    return dataclasses.replace(base or VerifierConfig(),
                               sim_platform_keys=tuple(dict.fromkeys(keys)))


def _evidence(data: Any) -> Evidence:
    try:
        body = protocol.EvidenceModel.model_validate(data)
        tee = Tee(body.tee)
        return Evidence(tee, base64.b64decode(body.evidence, validate=True),
                        None if body.collateral is None
                        else base64.b64decode(body.collateral, validate=True),
                        None if body.certificates is None
                        else base64.b64decode(body.certificates, validate=True))
    except (ValueError, binascii.Error):  # pydantic's ValidationError is a ValueError
        raise KeycacheAttestationError("the keycache's answer evidence is malformed") from None


def _proof_b64(value: Any, field: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise KeycacheAttestationError(f"the keycache's answer: {field} is not {size} bytes "
                                       f"of base64")
    return raw


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
