"""Keyserver clients: the attested client side (shared by the keycache and
``attest fetch-key``) and the owner's admin client.

:class:`AttestedKeyClient` runs the whole attestation protocol: challenge → evidence with
report_data binding (nonce, ephemeral X25519 key) → attest → fetch → HPKE open.  The
ephemeral private key never leaves this object.  It is also a
:class:`~sealedtorch.keys.KeySource` (``get_key``), so it can be handed straight to the
loading API.  :class:`AdminClient` wraps the admin API for the ``keys`` commands.

Problem responses come back as the matching :mod:`sealedtorch.errors` classes; a keyserver
that cannot be reached is :class:`~sealedtorch.errors.KeyUnavailable`.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

from .. import crypto
from ..attest import binding
from ..attest.attesters import Attester
from ..attest.policy import Policy, load_policy
from ..errors import (
    AuthenticationError,
    ConfigError,
    IntegrityError,
    KeyUnavailable,
    SealedTorchError,
    TlsVerificationError,
    TransparencyError,
)
from ..keys import ModelKey, read_key_file
from . import protocol, tlog
from .problems import error_from_problem
from .protocol import PROBLEM_MEDIA_TYPE, Role, b64encode
from .tls import client_context

__all__ = [
    "AdminClient",
    "AttestationResult",
    "AttestedKeyClient",
    "ReleasedKey",
    "register_key",
]

#: Re-attest when the token has less than this many seconds left.
TOKEN_MARGIN = 10.0


class ReleasedKey(NamedTuple):
    """A model key opened from a release, and the policy it was released under (a key cache
    must enforce ``policy.allow`` on its local runtimes).  A named pair, so
    ``key, policy = released`` works."""

    model_key: ModelKey
    policy: Policy

    @property
    def policy_digest(self) -> str:
        return self.policy.digest()


@dataclass(frozen=True)
class AttestationResult:
    token: str
    expires_at: float
    role: Role
    tee: str
    insecure: bool
    claims: dict[str, Any]


def _parse_time(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _is_tls_verification_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def tls_failure_text(url: str, ca: Path | str | ssl.SSLContext | None,
                     exc: BaseException) -> str:
    """Say that TLS verification failed (not "unreachable"), which CA was used and how to
    pass the right one: the flag, its variable and the file ``keyserver init`` wrote."""
    reason = str(exc).split("(_ssl.c")[0].strip().rstrip(":") or type(exc).__name__
    if ca is None:
        used = "no --ca file was given, so the system trust store was used"
    elif isinstance(ca, ssl.SSLContext):
        used = "the given TLS context does not trust it"
    else:
        used = f"the --ca file {ca} does not verify it"
    return (f"TLS verification of keyserver {url} failed ({reason}): {used}; pass the "
            "keyserver's CA certificate with --ca FILE (or $SEALEDTORCH_KEYSERVER_CA): "
            "tls/ca.pem in the keyserver's data directory")


class _Http:
    """httpx with the pinned CA, problem+json → typed errors, transport errors →
    :class:`KeyUnavailable`."""

    def __init__(self, url: str, ca: Path | str | ssl.SSLContext | None, timeout: float,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith("https://") and not (transport is not None
                                                   and url.startswith("http://")):
            raise ConfigError(f"keyserver URL must start with https:// (got {url!r})")
        self.url = url.rstrip("/")
        self._ca = ca
        verify: ssl.SSLContext | bool = client_context(ca) if url.startswith("https://") \
            else False
        self._client = httpx.Client(base_url=self.url, verify=verify, timeout=timeout,
                                    transport=transport,
                                    headers={"User-Agent": "sealedtorch-keyserver-client/1"})

    def request(self, method: str, path: str, *, token: str | None = None,
                json: Any = None, params: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            response = self._client.request(method, path, json=json, params=params,
                                            headers=headers)
        except httpx.ConnectError as exc:
            if _is_tls_verification_failure(exc):
                raise TlsVerificationError(tls_failure_text(self.url, self._ca, exc)) from None
            raise KeyUnavailable(f"keyserver {self.url} unreachable: "
                                 f"{type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise KeyUnavailable(f"keyserver {self.url} unreachable: "
                                 f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if response.headers.get("content-type", "").startswith(PROBLEM_MEDIA_TYPE) or \
                    isinstance(body, dict):
                raise error_from_problem(body, response.status_code)
            raise SealedTorchError(f"keyserver answered HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise SealedTorchError(f"keyserver answered {path} with invalid JSON") from None

    def close(self) -> None:
        self._client.close()


class AttestedKeyClient:
    """The attested client side of key release.

    ``attester`` produces evidence inside this TEE (see
    :func:`sealedtorch.attest.attesters.get_attester`); ``role`` says whether this process
    will use keys itself (``runtime``) or hold them for local runtimes (``holder``, the
    keycache).  Thread-safe: one attestation at a time, tokens reused until near expiry.
    """

    def __init__(self, url: str, ca: Path | str | ssl.SSLContext | None, attester: Attester,
                 role: Role | str = Role.RUNTIME, *, timeout: float = 10.0,
                 transport: httpx.BaseTransport | None = None,
                 witness: tlog.Witness | None = None) -> None:
        self.attester = attester
        #: Checks every release's transparency-log receipt and keeps the newest checkpoint
        #: (log key pinned on first use unless the witness was given one).
        self.witness = witness if witness is not None else tlog.Witness()
        self.role = Role(role)
        self._http = _Http(url, ca, timeout, transport)
        self._lock = threading.Lock()
        self._keypair: crypto.EphemeralKeyPair | None = None
        self._result: AttestationResult | None = None

    def __repr__(self) -> str:
        return f"AttestedKeyClient({self._http.url!r}, role={self.role.value!r})"

    @property
    def url(self) -> str:
        return self._http.url

    @property
    def result(self) -> AttestationResult | None:
        """The current attestation result, if any."""
        return self._result

    def attest(self) -> AttestationResult:
        """Run challenge → evidence → attest with a fresh ephemeral key pair."""
        with self._lock:
            return self._attest_locked()

    def _attest_locked(self) -> AttestationResult:
        keypair = crypto.EphemeralKeyPair.generate()
        tee = str(self.attester.tee)
        challenge = self._http.request("POST", "/v1/attest/challenge", json={"tee": tee})
        try:
            nonce = protocol.b64decode(challenge["nonce"], field="nonce",
                                       size=binding.NONCE_SIZE)
        except (KeyError, TypeError, SealedTorchError):
            raise SealedTorchError("keyserver sent a malformed challenge") from None
        evidence = self.attester.evidence(binding.report_data(nonce, keypair.public_bytes))
        body: dict[str, Any] = {
            "nonce": b64encode(nonce), "tee": tee, "evidence": b64encode(evidence.data),
            "public_key": b64encode(keypair.public_bytes), "role": self.role.value}
        if evidence.collateral is not None:
            body["collateral"] = b64encode(evidence.collateral)
        if evidence.certificates is not None:
            body["certificates"] = b64encode(evidence.certificates)
        answer = self._http.request("POST", "/v1/attest", json=body)
        try:
            result = AttestationResult(
                token=answer["token"], expires_at=_parse_time(answer["expires_at"]),
                role=Role(answer["role"]), tee=answer["tee"], insecure=bool(answer["insecure"]),
                claims=dict(answer["claims"]))
        except (KeyError, TypeError, ValueError):
            raise SealedTorchError("keyserver sent a malformed attestation result") from None
        self._keypair, self._result = keypair, result
        return result

    def _session(self) -> tuple[str, crypto.EphemeralKeyPair]:
        with self._lock:
            if self._result is None or self._keypair is None or \
                    self._result.expires_at - time.time() < TOKEN_MARGIN:
                self._attest_locked()
            assert self._result is not None and self._keypair is not None
            return self._result.token, self._keypair

    def _get(self, path: str, params: dict[str, Any] | None = None) -> list[ReleasedKey]:
        return [released for released, _lease in self._get_leased(path, params)[0]]

    def _get_leased(self, path: str, params: dict[str, Any] | None = None
                    ) -> tuple[list[tuple[ReleasedKey, str | None]], bytes]:
        # one release at a time per witness: the consistency proof asked for must start
        # at the size the witness still holds when the receipt is checked
        with self.witness.lock:
            return self._get_locked(path, params)

    def _get_locked(self, path: str, params: dict[str, Any] | None
                    ) -> tuple[list[tuple[ReleasedKey, str | None]], bytes]:
        params = dict(params or {})
        if self.witness.size is not None:  # ask for a consistency proof from what we saw
            params["tlog_since"] = self.witness.size
        token, keypair = self._session()
        try:
            answer = self._http.request("GET", path, token=token, params=params)
        except AuthenticationError:
            with self._lock:  # token expired or keyserver key changed: attest once more
                self._result = None
            token, keypair = self._session()
            answer = self._http.request("GET", path, token=token, params=params)
        try:
            items = answer["keys"]
            out = []
            for item in items:
                lease = item.get("lease")
                out.append((_open(item, keypair), lease if isinstance(lease, str) else None))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SealedTorchError(f"keyserver sent a malformed key release: {exc}") from None
        self._check_receipt(answer.get("receipt"), [released for released, _ in out], keypair)
        return out, keypair.public_bytes

    def _check_receipt(self, receipt: Any, released: list[ReleasedKey],
                       keypair: crypto.EphemeralKeyPair) -> None:
        """No key is used unless its release is on the log: the receipt's checkpoint is
        signed by the log key, consistent with every checkpoint seen before, and includes
        an ``allow`` record of releasing exactly this key version to this key pair."""
        _, included = self.witness.check_receipt(receipt)
        thumbprint = protocol.thumbprint(keypair.public_bytes)
        for item in released:
            key = item.model_key
            if not any(tlog.release_record_matches(rec, model_id=key.model_id,
                                                   version=key.version,
                                                   thumbprint=thumbprint)
                       for rec in included.values()):
                raise TransparencyError(
                    f"model {key.model_id!r} version {key.version}: the release is not in "
                    f"the transparency log (no included allow record for this key pair)")

    def fetch_all_leased(self) -> tuple[list[tuple[ReleasedKey, str | None]], bytes]:
        """Like :meth:`fetch_all`, with each key's lease text (``None``: the keyserver sent
        none) and the attested public key the keys were sealed to (the leases' holder), so
        a key cache can verify and enforce the leases (see :mod:`.leases`)."""
        return self._get_leased("/v1/keys")

    def fetch_all(self) -> list[ReleasedKey]:
        """Every active key version this identity may have (attesting first if needed)."""
        return self._get("/v1/keys")

    def fetch(self, model_id: str, version: int | None = None) -> ReleasedKey:
        """One model's key: ``version``, or its latest active version."""
        params = {"version": version} if version is not None else None
        keys = self._get(f"/v1/keys/{_path(model_id)}", params)
        for released in keys:
            key = released.model_key
            if key.model_id == model_id and (version is None or key.version == version):
                return released
        raise KeyUnavailable(f"keyserver did not return the key of model {model_id!r}")

    def get_key(self, model_id: str, version: int | None = None) -> ModelKey:
        """:class:`~sealedtorch.keys.KeySource` interface."""
        return self.fetch(model_id, version).model_key

    def close(self) -> None:
        self._http.close()
        self._keypair = None

    def __enter__(self) -> AttestedKeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _path(model_id: str) -> str:
    """A model id as one URL path segment: every '/' and '.' percent-encoded, so no client
    library normalises '..' away (the server decodes it back)."""
    return quote(model_id, safe="").replace(".", "%2E")


def _open(item: dict[str, Any], keypair: crypto.EphemeralKeyPair) -> ReleasedKey:
    model_id, version = str(item["model_id"]), int(item["version"])
    policy = load_policy(item["policy"])
    digest = str(item["policy_digest"])
    if policy.digest() != digest:
        raise IntegrityError(f"model {model_id!r}: the policy sent with the key does not "
                             f"match its digest")
    sealed = protocol.b64decode(item["sealed_key"], field="sealed_key")
    secret = keypair.open(sealed, info=protocol.release_info(model_id, version, digest))
    return ReleasedKey(ModelKey(model_id, version, secret), policy)


# --------------------------------------------------------------------------- admin

def read_token_file(path: Path | str) -> str:
    p = Path(path)
    try:
        st = p.stat()
        token = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read admin token file {p}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"{p}: admin token file is readable by group or others; "
                          f"run `chmod 600 {p}`")
    if not token:
        raise ConfigError(f"{p}: empty admin token file")
    return token


class AdminClient:
    """The owner's client for the admin API (``/v1/admin``)."""

    def __init__(self, url: str, ca: Path | str | ssl.SSLContext | None, token: str, *,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self._http = _Http(url, ca, timeout, transport)
        self._token = token

    @classmethod
    def from_token_file(cls, url: str, ca: Path | str | ssl.SSLContext | None,
                        token_file: Path | str, **kwargs: Any) -> AdminClient:
        return cls(url, ca, read_token_file(token_file), **kwargs)

    def __repr__(self) -> str:
        return f"AdminClient({self._http.url!r})"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return self._http.request(method, path, token=self._token, json=body)

    def register(self, key: ModelKey, policy: Policy | dict[str, Any] | str | Path,
                 ) -> dict[str, Any]:
        """Register a new model with its first key and policy."""
        pol = load_policy(policy)
        result: dict[str, Any] = self._call("POST", "/v1/admin/models", {
            "model_id": key.model_id, "policy": pol.to_json(),
            "key": {"version": key.version, "key": b64encode(key.secret)}})
        return result

    def set_policy(self, model_id: str, policy: Policy | dict[str, Any] | str | Path,
                   ) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", "/v1/admin/policies", {
            "model_id": model_id, "policy": load_policy(policy).to_json()})
        return result

    def rotate(self, model_id: str, key: ModelKey | None = None) -> tuple[int, ModelKey | None]:
        """Add a key version.  With ``key``: upload it.  Without: the keyserver generates it
        and returns it HPKE-sealed to a one-off key pair of ours; we return it opened."""
        if key is not None:
            if key.model_id != model_id:
                raise ConfigError(f"key file is for model {key.model_id!r}, not {model_id!r}")
            answer = self._call("POST", "/v1/admin/rotations", {
                "model_id": model_id,
                "key": {"version": key.version, "key": b64encode(key.secret)}})
            return int(answer["version"]), None
        keypair = crypto.EphemeralKeyPair.generate()
        answer = self._call("POST", "/v1/admin/rotations", {
            "model_id": model_id, "recipient_public_key": b64encode(keypair.public_bytes)})
        version = int(answer["version"])
        sealed = protocol.b64decode(answer["sealed_key"], field="sealed_key")
        secret = keypair.open(sealed, info=protocol.rotate_info(model_id, version))
        return version, ModelKey(model_id, version, secret)

    def revoke(self, model_id: str, version: int | None = None,
               reason: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/admin/revocations", {
            "model_id": model_id, "version": version, "reason": reason})
        return result

    def retire(self, model_id: str, version: int | None = None,
               reason: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/admin/retirements", {
            "model_id": model_id, "version": version, "reason": reason})
        return result

    def list_models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/admin/models")["models"]
        return result

    def get_model(self, model_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/admin/models/{_path(model_id)}")
        return result

    # --- tokens (admin role) and the audit log
    def create_token(self, role: str, name: str, *,
                     expires_in: int | None = None) -> dict[str, Any]:
        """A new token: ``{token_id, name, role, created_at, expires_at, principal_id,
        token}`` (``token`` only here); ``expires_in`` seconds (default: 90 days)."""
        body: dict[str, Any] = {"role": role, "name": name}
        if expires_in is not None:
            body["expires_in"] = expires_in
        result: dict[str, Any] = self._call("POST", "/v1/admin/tokens", body)
        return result

    def rotate_token(self, token_id: str, *, expires_in: int | None = None) -> dict[str, Any]:
        """The token's successor (same identity, name and role; shown once); the old one
        is revoked."""
        body: dict[str, Any] = {"token_id": token_id}
        if expires_in is not None:
            body["expires_in"] = expires_in
        result: dict[str, Any] = self._call("POST", "/v1/admin/tokens/rotations", body)
        return result

    def list_tokens(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/admin/tokens")["tokens"]
        return result

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/admin/tokens/revocations",
                                            {"token_id": token_id})
        return result

    # --- the transparency log (any admin-token role)
    def checkpoint(self) -> dict[str, Any]:
        """``{checkpoint, log_key, size, root}``: the log's current signed checkpoint."""
        result: dict[str, Any] = self._http.request("GET", "/v1/audit/checkpoint",
                                                    token=self._token)
        return result

    def inclusion_proof(self, index: int, size: int | None = None) -> dict[str, Any]:
        params = {"index": index} | ({"size": size} if size is not None else {})
        result: dict[str, Any] = self._http.request("GET", "/v1/audit/proof/inclusion",
                                                    token=self._token, params=params)
        return result

    def consistency_proof(self, first: int, second: int | None = None) -> dict[str, Any]:
        params = {"first": first} | ({"second": second} if second is not None else {})
        result: dict[str, Any] = self._http.request("GET", "/v1/audit/proof/consistency",
                                                    token=self._token, params=params)
        return result

    def audit(self, *, model_id: str | None = None, since: float | None = None,
              after_seq: int | None = None, limit: int | None = None) -> dict[str, Any]:
        """``{records: [...], head}``: audit records this token may read, in chain order."""
        params = {k: v for k, v in (("model_id", model_id), ("since", since),
                                    ("after_seq", after_seq), ("limit", limit))
                  if v is not None}
        result: dict[str, Any] = self._http.request("GET", "/v1/admin/audit",
                                                    token=self._token, params=params)
        return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register_key(url: str, ca: Path | str | None, token_file: Path | str,
                 key: ModelKey | Path | str | os.PathLike[str],
                 policy: Policy | dict[str, Any] | str | Path) -> dict[str, Any]:
    """Register ``key`` (a :class:`ModelKey` or key file) under ``policy`` (a Policy, dict or
    policy file) on the keyserver at ``url``; for ``sealedtorch seal --register``."""
    model_key = key if isinstance(key, ModelKey) else read_key_file(key)
    with AdminClient.from_token_file(url, ca, token_file) as admin:
        return admin.register(model_key, policy)
