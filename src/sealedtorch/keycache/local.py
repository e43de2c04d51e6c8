"""Local attestation: how the keycache decides which process on its host gets a key.

Every local key request carries a fresh keycache nonce and the runtime's ephemeral X25519
public key.  An *appraiser* turns the request (and the peer's SO_PEERCRED credentials) into
verified :class:`~sealedtorch.attest.Claims`, which the model's policy (``allow`` rules,
:meth:`Policy.decide_use`) then judges.  Two appraisers:

:class:`EvidenceAppraiser` — the runtime sends evidence from its own TEE with
    ``report_data = binding.report_data(nonce, public_key)``; it is verified through the
    attestation front door (:func:`sealedtorch.attest.verify`) and the binding is checked with
    :func:`sealedtorch.attest.binding.check`, exactly as the keyserver does.  Used for ``sim``
    (statements signed by a trusted sim platform key; insecure) and for ``sgx`` (the runtime
    enclave's DCAP quote — see docs/keycache.md for why this is a quote and not an EREPORT),
    and usable for ``tdx``/``snp`` when collateral is reachable.

:class:`PeerAppraiser` — one TDX / SEV-SNP confidential VM: every process in it is inside
    the same TEE, whose identity the keycache attested itself (``vm_claims``).  The runtime
    sends no hardware evidence; it is identified by the VM's claims plus its kernel-reported
    uid/gid, which must be on a configured allow-list.  The nonce still makes each request
    single-use; the public key reaches the keycache over the local socket, which never leaves
    the VM.

Nonces (:class:`NonceRegistry`) are 32 random bytes, single use, short-lived, and tied to the
uid of the peer that asked for them.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from .. import crypto
from ..attest import Claims, Evidence, Tee, VerifierConfig, binding, verify
from ..errors import AttestationError, NonceError, PolicyDenied

__all__ = [
    "EvidenceAppraiser", "LocalRequest", "NonceRegistry", "PeerAppraiser", "PeerCred",
    "peer_credentials",
]

NONCE_SIZE = binding.NONCE_SIZE
DEFAULT_NONCE_TTL = 30.0
DEFAULT_MAX_OUTSTANDING = 20_000


@dataclass(frozen=True)
class PeerCred:
    """The connecting process, as the kernel reports it (SO_PEERCRED at connect time)."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peer_credentials(sock: socket.socket | object) -> PeerCred | None:
    """SO_PEERCRED of a connected Unix socket (Linux), or None where unavailable."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,  # type: ignore[attr-defined]
                              struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


class NonceRegistry:
    """Single-use, short-lived challenges, each tied to the uid that asked for it.

    Consuming a nonce removes it first, so a request that then fails verification has still
    used it up (no retrying a guess against the same nonce).  At most ``max_outstanding``
    nonces are kept; beyond that the oldest are forgotten (a flood costs only the flooder's
    own pending challenges, since nonces expire in order).
    """

    def __init__(self, *, ttl: float = DEFAULT_NONCE_TTL,
                 max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("nonce ttl must be positive")
        self.ttl = float(ttl)
        self._max = max_outstanding
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[bytes, tuple[float, int | None]] = {}

    def issue(self, uid: int | None = None) -> bytes:
        nonce = crypto.random_bytes(NONCE_SIZE)
        now = self._clock()
        with self._lock:
            if len(self._pending) >= self._max:
                self._prune(now)
            while len(self._pending) >= self._max:
                del self._pending[next(iter(self._pending))]
            self._pending[nonce] = (now + self.ttl, uid)
        return nonce

    def consume(self, nonce: bytes, uid: int | None = None) -> None:
        """Use ``nonce`` up, or raise :class:`NonceError` saying why it is not acceptable."""
        now = self._clock()
        with self._lock:
            found = self._pending.pop(bytes(nonce), None)
        if found is None:
            raise NonceError("unknown or already used keycache nonce (replayed request, or "
                             "a nonce from another keycache or an earlier run): ask for a "
                             "fresh challenge")
        expires, owner = found
        if now > expires:
            raise NonceError(f"keycache nonce expired ({now - expires:.1f} s ago; nonces "
                             f"live {self.ttl:g} s): ask for a fresh challenge")
        if owner is not None and uid != owner:
            raise NonceError(f"keycache nonce was issued to uid {owner}, not to this "
                             f"requester (uid {uid})")

    def _prune(self, now: float) -> None:
        for nonce in [n for n, (exp, _) in self._pending.items() if exp < now]:
            del self._pending[nonce]

    def __len__(self) -> int:
        return len(self._pending)


@dataclass(frozen=True)
class LocalRequest:
    """A decoded key request (already syntactically valid)."""

    model_id: str
    version: int | None
    nonce: bytes
    public_key: bytes
    evidence: Evidence | None


class Appraiser(Protocol):
    #: What the runtime must send: "evidence" or "peer" (told to clients in the challenge).
    mode: str
    #: True if appraisal may block on I/O (collateral fetches): run it off the event loop.
    may_block: bool

    def appraise(self, request: LocalRequest, peer: PeerCred | None) -> Claims: ...


def _check_peer(peer: PeerCred | None, uids: frozenset[int], gids: frozenset[int]) -> None:
    if not uids and not gids:
        return
    if peer is None:
        raise PolicyDenied("local requester refused",
                           ["peer credentials unavailable (SO_PEERCRED), but a uid/gid "
                            "allow-list is configured"])
    if peer.uid in uids or peer.gid in gids:
        return
    allowed = []
    if uids:
        allowed.append(f"uids [{', '.join(map(str, sorted(uids)))}]")
    if gids:
        allowed.append(f"gids [{', '.join(map(str, sorted(gids)))}]")
    raise PolicyDenied("local requester refused",
                       [f"peer {peer} is not among the allowed {' or '.join(allowed)}"])


class EvidenceAppraiser:
    """Runtime evidence, verified through the attestation front door and bound to the request."""

    mode = "evidence"

    def __init__(self, config: VerifierConfig, *, tees: Collection[Tee | str] | None = None,
                 allowed_uids: Collection[int] = (), allowed_gids: Collection[int] = ()) -> None:
        self.config = config
        self.tees = frozenset(Tee(t) for t in tees) if tees else frozenset(Tee)
        self.allowed_uids = frozenset(allowed_uids)
        self.allowed_gids = frozenset(allowed_gids)
        self.may_block = any(t is not Tee.SIM for t in self.tees)

    def appraise(self, request: LocalRequest, peer: PeerCred | None) -> Claims:
        _check_peer(peer, self.allowed_uids, self.allowed_gids)
        evidence = request.evidence
        if evidence is None:
            raise AttestationError("this keycache requires evidence from the runtime's TEE, "
                                   "and the request carries none")
        if evidence.tee not in self.tees:
            raise AttestationError(
                f"this keycache accepts local evidence from {', '.join(sorted(self.tees))}, "
                f"not {evidence.tee}")
        claims = verify(evidence, config=self.config)
        binding.check(claims.report_data, request.nonce, request.public_key)
        return claims


class PeerAppraiser:
    """Inside one confidential VM: the VM's own attested claims plus a uid/gid allow-list."""

    mode = "peer"
    may_block = False

    def __init__(self, vm_claims: Claims, *, allowed_uids: Collection[int] = (),
                 allowed_gids: Collection[int] = ()) -> None:
        if not allowed_uids and not allowed_gids:
            raise ValueError("peer mode needs a uid or gid allow-list: without hardware "
                             "evidence per request, the kernel's peer credentials are the "
                             "only thing that tells runtimes apart inside the VM")
        if vm_claims.tee not in (Tee.TDX, Tee.SNP, Tee.SIM):
            raise ValueError(f"peer mode is for one TDX or SEV-SNP VM, not {vm_claims.tee}")
        self.vm_claims = vm_claims
        self.allowed_uids = frozenset(allowed_uids)
        self.allowed_gids = frozenset(allowed_gids)

    def appraise(self, request: LocalRequest, peer: PeerCred | None) -> Claims:
        _check_peer(peer, self.allowed_uids, self.allowed_gids)
        return self.vm_claims


def self_claims(attester: object, config: VerifierConfig) -> Claims:
    """Attest this process's own TEE and verify the result (for :class:`PeerAppraiser`)."""
    nonce = crypto.random_bytes(NONCE_SIZE)
    public_key = crypto.EphemeralKeyPair.generate().public_bytes
    evidence = attester.evidence(binding.report_data(nonce, public_key))  # type: ignore[attr-defined]
    claims = verify(evidence, config=config)
    binding.check(claims.report_data, nonce, public_key)
    return claims
