"""The verifying client: attest the runtime, pin its TLS key, only then send inputs.

::

    client = AttestedClient("https://host:8443", policy="runtime-policy.yaml",
                            sim_roots=["sim/platform.pub"])
    result = client.attest()                         # raises unless the policy allows it
    outputs = client.infer("resnet50", {"input": x})  # over a connection pinned to that key

:meth:`AttestedClient.attest` sends a fresh 32-byte nonce to ``/v1/attestation``, reads the
server key *of the TLS connection that answered* (not a key the document claims), verifies
the evidence through the attestation front door, checks that its report_data binds the
nonce and that key, and applies the policy (``decide_use``).  Inference then runs on a
separate HTTP client whose SSL context accepts only that key: the check runs inside every
TLS handshake, before the HTTP request is written, so a different server never sees a byte
of the input.  :meth:`infer` attests first if that has not happened yet, and refuses
models that the attested runtime did not list.

``expect`` pins what the attested runtime must be serving under each name (model id, lowest
key version, SHA-256 of the sealed file; ``sealedtorch client infer --expect-model
NAME=ID[@MINVERSION] --expect-digest NAME=SHA256``): checked against the models the
attestation document lists, right after the evidence, before anything is sent.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from .. import crypto
from ..attest import VerifierConfig
from ..attest.policy import Policy, load_policy
from ..attest.sim import load_platform_keys
from ..errors import (
    AttestationError,
    BindingError,
    ConfigError,
    InferenceError,
    ModelMismatch,
)
from .attestation import AttestationResult, encode_nonce, verify_document
from .kserve import (
    DATATYPES,
    HEADER_LENGTH,
    TensorSpec,
    decode_infer_response,
    encode_infer_request_parts,
)
from .tls import PinMismatch, capture_context, peer_spki, pin_spki, pinned_context

__all__ = ["AttestedClient", "InferenceError", "ModelExpectation", "attested_ssl_context",
           "check_expectations", "parse_expectations", "pinned_ssl_context"]


@dataclass(frozen=True)
class ModelExpectation:
    """What the client requires of one served name (unset fields are not checked)."""

    model_id: str | None = None
    min_key_version: int | None = None
    sha256: str | None = None


def parse_expectations(models: Sequence[str] = (), digests: Sequence[str] = ()
                       ) -> dict[str, ModelExpectation]:
    """``--expect-model NAME=ID[@MINVERSION]`` and ``--expect-digest NAME=SHA256`` values
    as expectations per served name; a malformed value is a :class:`ConfigError`."""
    from ..keys import validate_model_id

    out: dict[str, dict[str, Any]] = {}
    for value in models:
        name, sep, rest = value.partition("=")
        model_id, at, version = rest.partition("@")
        if not sep or not name or not model_id or (at and not version.isdigit()):
            raise ConfigError(f"--expect-model expects NAME=MODEL_ID[@MIN_KEY_VERSION], "
                              f"got {value!r}")
        try:
            validate_model_id(model_id)
        except ValueError as exc:
            raise ConfigError(f"--expect-model {value!r}: {exc}") from None
        if at and int(version) < 1:
            raise ConfigError(f"--expect-model {value!r}: key versions start at 1")
        out.setdefault(name, {}).update(model_id=model_id,
                                        min_key_version=int(version) if at else None)
    for value in digests:
        name, sep, digest = value.partition("=")
        digest = digest.strip().lower()
        if not sep or not name or len(digest) != 64 or \
                not all(c in "0123456789abcdef" for c in digest):
            raise ConfigError(f"--expect-digest expects NAME=SHA256 (64 hex digits, the "
                              f"sha256sum of the .sealed file), got {value!r}")
        out.setdefault(name, {})["sha256"] = digest
    return {name: ModelExpectation(**fields) for name, fields in out.items()}


def check_expectations(result: AttestationResult,
                       expect: Mapping[str, ModelExpectation]) -> None:
    """Raise :class:`ModelMismatch` unless every expected name is served, loaded, under the
    expected model id, at least the expected key version, from the expected file."""
    for name, want in expect.items():
        entry = result.model(name)
        if entry is None:
            raise ModelMismatch(f"the attested runtime does not serve {name!r}")
        if not entry.get("ready") or entry.get("model_id") is None:
            raise ModelMismatch(f"the attested runtime has not loaded {name!r} (yet), so it "
                                f"cannot show which model it serves under that name")
        got_id, got_version = entry.get("model_id"), entry.get("key_version")
        if want.model_id is not None and got_id != want.model_id:
            raise ModelMismatch(f"the attested runtime serves model {got_id!r} as {name!r}, "
                                f"not the expected {want.model_id!r}")
        if want.min_key_version is not None and not (
                isinstance(got_version, int) and got_version >= want.min_key_version):
            raise ModelMismatch(f"the attested runtime serves {name!r} under key version "
                                f"{got_version}, older than the expected minimum "
                                f"{want.min_key_version}")
        if want.sha256 is not None and entry.get("file_sha256") != want.sha256:
            raise ModelMismatch(f"the attested runtime serves {name!r} from a file with "
                                f"SHA-256 {entry.get('file_sha256')}, not the expected "
                                f"{want.sha256}")


class AttestedClient:
    """A KServe v2 client that talks only to an attested runtime."""

    def __init__(self, url: str, *, policy: Policy | str | os.PathLike[str] | dict[str, Any],
                 sim_roots: Sequence[str | os.PathLike[str]] = (),
                 verifier: VerifierConfig | None = None, timeout: float = 120.0,
                 allow_file_tls_key: bool = False,
                 expect: Mapping[str, ModelExpectation] | None = None) -> None:
        if not url.startswith("https://"):
            raise ConfigError(f"the runtime URL must be https:// (got {url!r}): attestation "
                              f"binds the server's TLS key")
        self.url = url.rstrip("/")
        self.policy = load_policy(policy if not isinstance(policy, os.PathLike)
                                  else Path(policy))
        if verifier is None:
            verifier = VerifierConfig(sim_platform_keys=load_platform_keys(sim_roots))
        elif sim_roots:
            raise ConfigError("give either verifier= or sim_roots=, not both")
        self.verifier = verifier
        self.timeout = timeout
        #: Accept a runtime whose TLS key came from a file (see attestation.py); off by
        #: default because the host may hold such a key and terminate TLS itself.
        self.allow_file_tls_key = allow_file_tls_key
        self.expect = dict(expect or {})
        self.result: AttestationResult | None = None
        #: DER certificate of the connection whose key the evidence bound
        self.certificate_der: bytes | None = None
        self._http: httpx.Client | None = None
        self._metadata: dict[str, dict[str, Any]] = {}

    # --- attestation ----------------------------------------------------------------------

    def attest(self) -> AttestationResult:
        """Verify the runtime; on success pin its TLS key for every later request."""
        nonce = crypto.random_bytes(32)
        with _http_client(capture_context(), self.timeout) as probe:
            try:
                response = probe.get(f"{self.url}/v1/attestation",
                                     params={"nonce": encode_nonce(nonce)})
            except httpx.HTTPError as exc:
                raise AttestationError(f"cannot fetch evidence from {self.url}: {exc}") \
                    from None
            stream = response.extensions.get("network_stream")
            ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
            connection_spki = peer_spki(ssl_object)
            connection_cert: bytes = ssl_object.getpeercert(True) if ssl_object else b""
            if response.status_code != 200:
                raise AttestationError(f"{self.url}/v1/attestation answered HTTP "
                                       f"{response.status_code}: {_error_text(response)}")
            try:
                doc = response.json()
            except ValueError:
                raise AttestationError("the attestation answer is not JSON") from None
        result = verify_document(doc, nonce=nonce, connection_spki=connection_spki,
                                 policy=self.policy, verifier=self.verifier,
                                 allow_file_tls_key=self.allow_file_tls_key)
        check_expectations(result, self.expect)
        self.result = result
        self.certificate_der = connection_cert
        self.reconnect()
        return result

    def ssl_context(self, context_class: type[ssl.SSLContext] = ssl.SSLContext
                    ) -> ssl.SSLContext:
        """An SSL context for *other* HTTP clients (httpx ``verify=``, the kserve SDK's
        ``RESTConfig(verify=...)``, tritonclient via :meth:`ssl_context_factory`) that
        accepts only the certificate of the attested connection (attests first if needed).
        A restarted runtime has a new key: attest again and make a new context."""
        if self.result is None or self.certificate_der is None:
            self.attest()
        assert self.result is not None and self.certificate_der is not None
        return pinned_ssl_context(self.certificate_der, self.result.spki,
                                  context_class=context_class)

    def ssl_context_factory(self) -> Callable[..., ssl.SSLContext]:
        """For ``tritonclient.http.InferenceServerClient(url, ssl=True,
        ssl_context_factory=client.ssl_context_factory(), insecure=True)``: returns gevent
        contexts pinned like :meth:`ssl_context`.  The factory ignores the ``cafile`` that
        tritonclient passes (its default is the public CA bundle, which must not widen the
        pin); ``insecure=True`` only turns off the host-name match."""
        try:
            import gevent.ssl  # type: ignore[import-untyped]
            context_class: type[ssl.SSLContext] = gevent.ssl.SSLContext
        except ImportError:  # pragma: no cover (tritonclient always brings gevent)
            context_class = ssl.SSLContext
        context = self.ssl_context(context_class)

        def factory(*_args: Any, **_kwargs: Any) -> ssl.SSLContext:
            return context

        return factory

    def reconnect(self) -> None:
        """Drop pooled connections; new ones are pinned to the same attested key (no new
        attestation).  Use :meth:`attest` to appraise the runtime afresh."""
        if self.result is None:
            return
        self._close_http()
        self._http = _http_client(pinned_context(self.result.spki), self.timeout, self.url)

    @property
    def pinned_spki(self) -> bytes | None:
        return self.result.spki if self.result is not None else None

    def _client(self) -> httpx.Client:
        if self._http is None:
            self.attest()
        assert self._http is not None
        return self._http

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client().request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            if isinstance(exc.__cause__, PinMismatch) or "pinning failed" in str(exc):
                raise BindingError(
                    f"{self.url} presented a TLS key other than the attested one; nothing "
                    f"was sent ({exc})") from None
            raise
        except httpx.HTTPError as exc:
            raise InferenceError(0, f"request to {self.url}{path} failed: {exc}") from None

    # --- KServe v2 ----------------------------------------------------------------------

    def _check_listed(self, model: str) -> None:
        assert self.result is not None
        if self.result.model(model) is None:
            listed = ", ".join(str(m.get("name")) for m in self.result.models) or "none"
            raise AttestationError(f"the attested runtime does not serve model {model!r} "
                                   f"(it lists: {listed})")

    def model_metadata(self, model: str) -> dict[str, Any]:
        if model not in self._metadata:
            self._client()
            self._check_listed(model)
            response = self._request("GET", f"/v2/models/{model}")
            if response.status_code != 200:
                raise InferenceError(response.status_code, _error_text(response))
            self._metadata[model] = response.json()
        return self._metadata[model]

    def ready(self) -> bool:
        return self._request("GET", "/v2/health/ready").status_code == 200

    def infer(self, model: str, inputs: Mapping[str, Any] | Any, *, binary: bool = True,
              outputs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Run ``model`` on ``inputs`` (name -> tensor/array, or one tensor for a
        single-input model), cast to the declared datatypes; returns named outputs."""
        meta = self.model_metadata(model)  # attests first, checks the model is listed
        specs = [TensorSpec.from_json(s) for s in meta["inputs"]]
        named = _name_inputs(inputs, specs)
        parts, headers = encode_infer_request_parts(named, binary=binary,
                                                    binary_outputs=binary, outputs=outputs)
        response = self._request("POST", f"/v2/models/{model}/infer", content=iter(parts),
                                 headers=headers)
        if response.status_code != 200:
            raise InferenceError(response.status_code, _error_text(response))
        return decode_infer_response(response.content, response.headers.get(HEADER_LENGTH))

    def metrics_text(self) -> str:
        return self._request("GET", "/metrics").text

    # --- lifecycle ----------------------------------------------------------------------

    def _close_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def close(self) -> None:
        self._close_http()

    def __enter__(self) -> AttestedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pinned_ssl_context(certificate: bytes | str, spki_der: bytes | None = None, *,
                       context_class: type[ssl.SSLContext] = ssl.SSLContext
                       ) -> ssl.SSLContext:
    """A client SSL context whose only trust anchor is ``certificate`` (DER bytes or PEM
    text/bytes: the runtime certificate whose key an attestation bound, e.g. from
    :attr:`AttestedClient.certificate_der`, or a ``serve --write-cert`` file after checking
    its key against ``/v1/attestation``).

    OpenSSL accepts a server only if it presents exactly that certificate (partial-chain
    verification against it) and proves possession of its key; host names are not checked
    (the trust comes from the attestation, and runtimes are often reached by IP or a name
    not in the certificate).  Works with every client that takes an ``ssl.SSLContext``,
    including gevent's (pass ``context_class=gevent.ssl.SSLContext``).  With the standard
    class, and when ``spki_der`` is given, each handshake also checks the server's
    SubjectPublicKeyInfo against it before any byte is sent (as :meth:`AttestedClient.infer`
    does)."""
    if isinstance(certificate, str):
        certificate = certificate.encode()
    pem = certificate.decode("ascii", "replace") if certificate.lstrip().startswith(
        b"-----BEGIN") else ssl.DER_cert_to_PEM_cert(certificate)
    leaf = pem[:pem.find("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    if spki_der is not None and not crypto.constant_time_equal(
            crypto.tls_certificate_spki(leaf.encode()), spki_der):
        raise BindingError("the certificate's key is not the attested TLS key")
    ctx = context_class(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        ctx.load_verify_locations(cadata=leaf)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"not a PEM/DER certificate: {exc}") from None
    if spki_der is not None and type(ctx) is ssl.SSLContext:
        pin_spki(ctx, spki_der)
    return ctx


def attested_ssl_context(url: str, *,
                         policy: Policy | str | os.PathLike[str] | dict[str, Any],
                         sim_roots: Sequence[str | os.PathLike[str]] = (),
                         verifier: VerifierConfig | None = None,
                         context_class: type[ssl.SSLContext] = ssl.SSLContext,
                         timeout: float = 30.0) -> ssl.SSLContext:
    """Attest the runtime at ``url`` (raises unless ``policy`` allows it) and return an SSL
    context pinned to the certificate of the connection the evidence bound: for httpx
    (``verify=ctx``), the kserve SDK and others.  See :func:`pinned_ssl_context`."""
    with AttestedClient(url, policy=policy, sim_roots=sim_roots, verifier=verifier,
                        timeout=timeout) as client:
        return client.ssl_context(context_class)


def _http_client(context: ssl.SSLContext, timeout: float, base_url: str = "") -> httpx.Client:
    """An HTTP/1.1 client over ``context``, with TCP_NODELAY: a request's header and its
    tensor data go out as separate writes, which Nagle's algorithm would otherwise hold
    back until the server's delayed ACK (tens of milliseconds)."""
    transport = httpx.HTTPTransport(
        verify=context, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(transport=transport, timeout=timeout, base_url=base_url)


def _error_text(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    return str(doc)[:500]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(np.asarray(value)))


def _name_inputs(inputs: Mapping[str, Any] | Any,
                 specs: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            raise ConfigError(f"the model takes {len(specs)} inputs "
                              f"({', '.join(s.name for s in specs)}); pass them by name")
        inputs = {specs[0].name: inputs}
    by_name = {s.name: s for s in specs}
    out: dict[str, torch.Tensor] = {}
    for name, value in inputs.items():
        t = _as_tensor(value)
        spec = by_name.get(name)
        if spec is not None and t.dtype != DATATYPES[spec.datatype]:
            want = DATATYPES[spec.datatype]
            if t.dtype.is_floating_point != want.is_floating_point and want != torch.bool:
                raise ConfigError(f"input {name!r} is {t.dtype}, the model takes "
                                  f"{spec.datatype}")
            t = t.to(want)
        out[name] = t
    return out
