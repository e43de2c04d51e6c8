"""The keycache's view of the keyserver: one small protocol, and the adapter to the real client.

The service depends only on :class:`Upstream`::

    fetch_all() -> list[(ModelKey, Policy)]

which attests if needed and returns *every* key the keyserver currently releases to this
keycache, already opened, each with its model's policy and (from the real keyserver) its
verified lease (:class:`Released`).  Failures are typed:

- :class:`UpstreamUnavailable` — unreachable, timed out, a 5xx (503 included), a 408/429, an
  answer that is not the protocol (garbage), or a release whose lease does not verify.  An
  *outage*: the keycache keeps serving what it holds, each key until its lease ends (and
  never longer than max-stale), and retries with backoff.
- :class:`~sealedtorch.errors.AttestationError`, :class:`~sealedtorch.errors.PolicyDenied`,
  :class:`~sealedtorch.errors.AuthenticationError`, :class:`~sealedtorch.errors.RequestError`
  and any other 4xx problem answer — the keyserver understood and *refused* this keycache.
  The keycache wipes every key at once (see :mod:`.service`) and keeps retrying with backoff
  (a TCB update or a policy fix can change the answer).  A :class:`~sealedtorch.errors.
  NonceError` (the challenge expired in transit) is the one refusal that is not about this
  keycache: it counts as an outage.

:class:`KeyserverUpstream` adapts the keyserver's attested client
(:class:`sealedtorch.keyserver.client.AttestedKeyClient`) to this protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from .. import crypto
from ..attest.policy import Policy
from ..errors import (
    AttestationError,
    AuthenticationError,
    IntegrityError,
    LeaseInvalid,
    LogInconsistent,
    NonceError,
    PolicyDenied,
    PolicyError,
    RequestError,
    SealedTorchError,
    UpstreamUnavailable,
)
from ..keys import ModelKey
from ..keyserver.leases import Lease, check_lease, verify_lease

if TYPE_CHECKING:
    from ..attest.attesters import Attester

__all__ = ["KeyserverUpstream", "Leased", "Released", "Upstream", "UpstreamUnavailable"]

log = logging.getLogger("sealedtorch.keycache.upstream")


#: The keyserver understood and refused this keycache (or its request): passed through.
REFUSALS = (AttestationError, PolicyDenied, AuthenticationError, RequestError)


def _explicit_refusal(exc: SealedTorchError) -> bool:
    """A problem answer in which the keyserver decided against this keycache (4xx other
    than 408 timeout and 429 rate limit), as opposed to an outage (transport errors, 5xx,
    503, garbage): the former wipes keys at once, the latter keeps them to lease end."""
    status = exc.http_status
    return exc.problem is not None and 400 <= status < 500 and status not in (408, 429)
class Released(NamedTuple):
    """One key released to this keycache, with the policy it was released under."""

    key: ModelKey
    policy: Policy


class Leased(NamedTuple):
    """A :class:`Released` key with the verified keyserver-signed lease that bounds how long
    it may be served (what :class:`KeyserverUpstream` returns for the real keyserver; a key
    without a lease is bounded by max-stale only)."""

    key: ModelKey
    policy: Policy
    lease: Lease


@runtime_checkable
class Upstream(Protocol):
    """Where the keycache gets its keys from."""

    def fetch_all(self) -> Sequence[Released | Leased]:
        """Every key currently released to this keycache (attesting first if needed)."""
        ...


class KeyserverUpstream:
    """:class:`Upstream` over the keyserver's attested client, in role ``holder``.

    The client attests on first use and again whenever its token is near expiry or refused;
    this adapter only sorts its failures into "unavailable" (retry, keep serving) and
    "refused" (typed errors passed through), and tells the refresher when the token ends.
    """

    def __init__(self, client: Any, *, lease_key: bytes | None = None) -> None:
        self._client = client
        #: The keyserver's lease-signing key: given (pinned by configuration) or learnt from
        #: the first verified release over the pinned TLS channel, then fixed for the life
        #: of this process (a lease signed by another key is refused).
        self.lease_key = lease_key

    @classmethod
    def connect(cls, url: str, *, ca: Path | str | None, attester: Attester,
                timeout: float = 10.0, lease_key: bytes | None = None,
                log_key: str | None = None) -> KeyserverUpstream:
        """``lease_key``: the keyserver's Ed25519 public key (raw 32 bytes) to pin for
        leases; None learns it from the first verified release.  ``log_key``: the
        keyserver's transparency-log verifier key to pin (None: pinned on first use); every
        release's receipt is checked against it."""
        from ..keyserver import tlog
        from ..keyserver.client import AttestedKeyClient

        witness = tlog.Witness(log_key) if log_key else None
        return cls(AttestedKeyClient(url, ca, attester, role="holder", timeout=timeout,
                                     witness=witness), lease_key=lease_key)

    def __repr__(self) -> str:
        return f"KeyserverUpstream({self._client!r})"

    @property
    def url(self) -> str:
        return str(getattr(self._client, "url", "?"))

    def fetch_all(self) -> Sequence[Released | Leased]:
        try:
            leased = getattr(self._client, "fetch_all_leased", None)
            if callable(leased):
                return self._verified(*leased())
            released = self._client.fetch_all()
        except NonceError as exc:  # the challenge expired in transit: not a decision
            raise UpstreamUnavailable(f"keyserver {self.url}: {exc}") from None
        except REFUSALS:
            raise
        except UpstreamUnavailable:
            raise
        except LogInconsistent:
            # the keyserver's log forked or shrank since we last looked: not an outage;
            # the service stops using keys (see KeycacheService.refresh_once)
            raise
        except (IntegrityError, PolicyError) as exc:
            # a release that does not open, or a policy that does not parse or match its
            # digest: someone in between, or a broken keyserver; keep what we hold
            log.error("keyserver %s sent a release that failed checks: %s", self.url, exc)
            raise UpstreamUnavailable(f"keyserver {self.url} sent an invalid release: "
                                      f"{exc}") from None
        except SealedTorchError as exc:  # unreachable (KeyUnavailable), 5xx, garbage
            if _explicit_refusal(exc):
                raise
            raise UpstreamUnavailable(str(exc)) from None
        except Exception as exc:  # anything else the transport or parser may raise
            raise UpstreamUnavailable(f"keyserver {self.url}: {type(exc).__name__}: "
                                      f"{exc}") from None
        out: list[Released] = []
        for item in released:
            key, policy = item
            if not isinstance(key, ModelKey) or not isinstance(policy, Policy):
                raise UpstreamUnavailable(f"keyserver client returned {type(item).__name__}, "
                                          f"not (ModelKey, Policy)")
            out.append(Released(key, policy))
        return out

    def _verified(self, items: list[tuple[Any, str | None]], holder: bytes
                  ) -> list[Leased]:
        """Every released key with its verified lease; any key without a valid lease for
        itself and this holder fails the whole refresh (:class:`LeaseInvalid`)."""
        out: list[Leased] = []
        pinned = self.lease_key
        for item, text in items:
            key, policy = item
            if not isinstance(key, ModelKey) or not isinstance(policy, Policy):
                raise UpstreamUnavailable(f"keyserver client returned {type(item).__name__}, "
                                          f"not (ModelKey, Policy)")
            if text is None:
                raise LeaseInvalid(f"the keyserver released {key.model_id!r} version "
                                   f"{key.version} without a lease (a keyserver older than "
                                   f"this keycache?); keys are only served under a lease")
            lease = verify_lease(text, pinned_key=pinned)
            check_lease(lease, model_id=key.model_id, version=key.version,
                        policy_digest=policy.digest(), holder_public_key=holder)
            pinned = lease.signing_key
            out.append(Leased(key, policy, lease))
        if pinned is not None and self.lease_key is None:
            self.lease_key = pinned
            log.info("keycache: pinned the keyserver's lease key %s (learnt over TLS from "
                     "%s)", crypto.sha256(pinned)[:8].hex(), self.url)
        return out

    def seconds_until_reattest(self) -> float | None:
        """Seconds until the attestation token needs renewing (None: not attested yet)."""
        result = getattr(self._client, "result", None)
        expires = getattr(result, "expires_at", None)
        if not isinstance(expires, int | float):
            return None
        from ..keyserver.client import TOKEN_MARGIN

        return expires - TOKEN_MARGIN - time.time()

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if callable(close):
            close()
