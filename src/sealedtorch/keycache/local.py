"""Local attestation: how the keycache decides which process on its host gets a key.

Every local key request carries a fresh keycache nonce and the runtime's ephemeral X25519
public key.  An *appraiser* turns the request (and the peer's SO_PEERCRED credentials) into
verified :class:`~sealedtorch.attest.Claims`, which the model's policy (``allow`` rules,
:meth:`Policy.decide_use`) then judges.  Two appraisers:

:class:`EvidenceAppraiser` — the runtime sends evidence from its own TEE with
    ``report_data = binding.report_data(nonce, public_key)``; it is verified through the
    attestation front door (:func:`sealedtorch.attest.appraise`, which also checks the
    binding), exactly as the keyserver does.  Used for ``sim``
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

import base64
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .. import crypto
from ..attest import Claims, Evidence, Tee, VerifierConfig, appraise, binding
from ..errors import AttestationError, NonceError, PolicyDenied
from . import protocol

if TYPE_CHECKING:
    from ..attest.attesters import Attester

__all__ = [
    "AnswerSigner", "EvidenceAppraiser", "LocalRequest", "NonceRegistry", "PeerAppraiser",
    "PeerCred", "peer_credentials", "same_tee_instance",
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


class SocketOptions(Protocol):
    """What :func:`peer_credentials` reads: a socket, or asyncio's transport socket."""

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def peer_credentials(sock: SocketOptions | None) -> PeerCred | None:
    """SO_PEERCRED of a connected Unix socket (Linux), or None where unavailable."""
    if sock is None:  # the transport has no socket
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
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
    #: The runtime's own nonce, bound into the keycache's answer evidence (mutual
    #: attestation); None from clients that do not authenticate the keycache.
    runtime_nonce: bytes | None = None


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
        return appraise(evidence, nonce=request.nonce, public_key=request.public_key,
                        config=self.config)


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


def self_claims(attester: Attester, config: VerifierConfig) -> Claims:
    """Attest this process's own TEE and verify the result (for :class:`PeerAppraiser`)."""
    nonce = crypto.random_bytes(NONCE_SIZE)
    public_key = crypto.EphemeralKeyPair.generate().public_bytes
    evidence = attester.evidence(binding.report_data(nonce, public_key))
    return appraise(evidence, nonce=nonce, public_key=public_key, config=config)


IDENTITY_FIELDS: dict[Tee, tuple[str, ...]] = {
    Tee.SIM: ("measurement", "platform_key"),
    Tee.SNP: ("measurement", "host_data", "chip_id"),
    Tee.TDX: ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner",
              "mr_owner_config"),
    Tee.SGX: ("mr_enclave", "mr_signer"),
}


def _show(value: Any) -> str:
    return value.hex() if isinstance(value, bytes | bytearray) else repr(value)


def same_tee_instance(a: Claims, b: Claims) -> list[str]:
    """Identity fields in which two sets of claims differ (empty: the same image, and for
    sim/snp the same platform/chip).  Used in ``peer`` mode, where the runtime and the
    keycache are processes of one confidential VM and so must report the same identity."""
    if a.tee != b.tee:
        return [f"tee: runtime {a.tee}, keycache {b.tee}"]
    out = []
    for name in IDENTITY_FIELDS.get(Tee(a.tee), ()):
        mine, theirs = getattr(a, name, None), getattr(b, name, None)
        if mine != theirs:
            out.append(f"{name}: runtime {_show(mine)}, keycache {_show(theirs)}")
    return out


class AnswerSigner:
    """The keycache's side of mutual attestation: it proves to each runtime who answered.

    An Ed25519 *answer key* is generated in memory when the keycache starts and never leaves
    the process.  Every key answer carries fresh evidence from the keycache's own TEE whose
    report_data binds the runtime's nonce and this key (:func:`protocol.answer_report_data`),
    and this key's signature over the whole answer (:func:`protocol.answer_transcript_parts`):
    the runtime's public key, both nonces, model id, version, sealed key, policy digest.  So
    only a process inside an attested TEE holding the key can produce an answer the runtime
    accepts, and no answer can be replayed to another request or spliced with another.
    """

    def __init__(self, attester: Any) -> None:
        self.attester = attester
        self._key = crypto.SigningKey.generate()
        #: Evidence may take I/O (hardware quote generation): run it off the event loop.
        self.may_block = getattr(attester, "tee", None) is not Tee.SIM

    @property
    def public_key(self) -> bytes:
        return self._key.public_bytes

    def answer(self, request: LocalRequest, released: dict[str, Any]) -> dict[str, Any]:
        """The proof fields to add to ``released`` (the keycache's answer to ``request``:
        ``model_id``, ``version``, raw ``sealed_key``, ``policy_digest``)."""
        if request.runtime_nonce is None:
            return {}
        public = self.public_key
        evidence = self.attester.evidence(protocol.answer_report_data(request.runtime_nonce,
                                                                      public))
        parts = protocol.answer_transcript_parts(
            public_key=request.public_key, nonce=request.nonce,
            runtime_nonce=request.runtime_nonce, model_id=released["model_id"],
            version=released["version"], sealed_key=released["sealed_key"],
            policy_digest=released["policy_digest"])
        signature = crypto.sign_transcript(self._key, protocol.ANSWER_SIGNATURE_LABEL, *parts)
        return {"keycache_evidence": evidence.to_json(),
                "keycache_key": base64.b64encode(public).decode(),
                "signature": base64.b64encode(signature).decode()}
