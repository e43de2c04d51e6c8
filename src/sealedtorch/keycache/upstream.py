"""The keycache's view of the keyserver: one small protocol, and the adapter to the real client.

The service depends only on :class:`Upstream`::

    fetch_all() -> list[(ModelKey, Policy)]

which attests if needed and returns *every* key the keyserver currently releases to this
keycache, already opened, each with its model's policy.  Failures are typed:

- :class:`UpstreamUnavailable` — unreachable, timed out, a 5xx, or an answer that is not the
  protocol (garbage).  Transient: the keycache keeps serving what it holds (up to max-stale)
  and retries with backoff.
- :class:`~sealedtorch.errors.AttestationError`, :class:`~sealedtorch.errors.PolicyDenied`,
  :class:`~sealedtorch.errors.AuthenticationError` — the keyserver understood and refused
  this keycache.  Also retried with backoff (a TCB update or a policy fix can change the
  answer), but logged as refusals, not outages.

:class:`KeyserverUpstream` adapts the keyserver's attested client
(:class:`sealedtorch.keyserver.client.AttestedKeyClient`) to this protocol.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from ..attest.policy import Policy
from ..errors import (
    AttestationError,
    AuthenticationError,
    IntegrityError,
    KeyUnavailable,
    LogInconsistent,
    PolicyDenied,
    PolicyError,
    RequestError,
    SealedTorchError,
)
from ..keys import ModelKey

if TYPE_CHECKING:
    from ..attest.attesters import Attester

__all__ = ["KeyserverUpstream", "Released", "Upstream", "UpstreamUnavailable"]

log = logging.getLogger("sealedtorch.keycache.upstream")


#: The keyserver understood and refused this keycache (or its request): passed through.
REFUSALS = (AttestationError, PolicyDenied, AuthenticationError, RequestError)


class UpstreamUnavailable(KeyUnavailable):
    """The keyserver could not be reached, or answered something that is not the protocol."""

    problem_type = "keyserver-unavailable"
    http_status = 503


class Released(NamedTuple):
    """One key released to this keycache, with the policy it was released under."""

    key: ModelKey
    policy: Policy


@runtime_checkable
class Upstream(Protocol):
    """Where the keycache gets its keys from."""

    def fetch_all(self) -> list[tuple[ModelKey, Policy]]:
        """Every key currently released to this keycache (attesting first if needed)."""
        ...


class KeyserverUpstream:
    """:class:`Upstream` over the keyserver's attested client, in role ``holder``.

    The client attests on first use and again whenever its token is near expiry or refused;
    this adapter only sorts its failures into "unavailable" (retry, keep serving) and
    "refused" (typed errors passed through), and tells the refresher when the token ends.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    def connect(cls, url: str, *, ca: str | os.PathLike[str] | None, attester: Attester,
                timeout: float = 10.0, log_key: str | None = None) -> KeyserverUpstream:
        """``log_key``: the keyserver's transparency-log verifier key to pin (None: pinned
        on first use); every release's receipt is checked against it."""
        from ..keyserver import tlog
        from ..keyserver.client import AttestedKeyClient

        witness = tlog.Witness(log_key) if log_key else None
        return cls(AttestedKeyClient(url, ca, attester, role="holder", timeout=timeout,
                                     witness=witness))

    def __repr__(self) -> str:
        return f"KeyserverUpstream({self._client!r})"

    @property
    def url(self) -> str:
        return str(getattr(self._client, "url", "?"))

    def fetch_all(self) -> list[tuple[ModelKey, Policy]]:
        try:
            released = self._client.fetch_all()
        except REFUSALS:
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
            raise UpstreamUnavailable(str(exc)) from None
        except Exception as exc:  # anything else the transport or parser may raise
            raise UpstreamUnavailable(f"keyserver {self.url}: {type(exc).__name__}: "
                                      f"{exc}") from None
        out: list[tuple[ModelKey, Policy]] = []
        for item in released:
            key, policy = item
            if not isinstance(key, ModelKey) or not isinstance(policy, Policy):
                raise UpstreamUnavailable(f"keyserver client returned {type(item).__name__}, "
                                          f"not (ModelKey, Policy)")
            out.append(Released(key, policy))
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
