"""Units: the keycache serves a key only while its lease runs (monotonic clock), renews
before lease end, wipes at lease end, and wipes everything at once on an explicit refusal.
The same behaviours against real keyserver and keycache processes are in
``test_leases_with_keyserver.py``."""

from __future__ import annotations

import pytest

from sealedtorch import crypto
from sealedtorch.errors import (
    AttestationError,
    AuthenticationError,
    KeyUnavailable,
    LeaseExpired,
    LeaseInvalid,
    NonceError,
    PolicyDenied,
    RequestError,
    SealedTorchError,
)
from sealedtorch.keycache.service import Backoff, Keycache
from sealedtorch.keycache.store import KeysStale, KeyStore
from sealedtorch.keycache.upstream import KeyserverUpstream, Leased, UpstreamUnavailable
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver import protocol
from sealedtorch.keyserver.client import ReleasedKey
from sealedtorch.keyserver.leases import Lease, issue_lease, verify_lease
from sealedtorch.keyserver.tokens import TokenSigner

from .conftest import FakeClock, ScriptedUpstream, sim_policy

POLICY = sim_policy()
SIGNER = TokenSigner(crypto.SigningKey.generate())
HOLDER = crypto.EphemeralKeyPair.generate().public_bytes


def lease_for(key: ModelKey, seconds: int, *, signer: TokenSigner = SIGNER,
              holder: bytes = HOLDER, policy_digest: str | None = None) -> Lease:
    thumb = protocol.thumbprint(holder)
    text = issue_lease(signer, model_id=key.model_id, version=key.version,
                       policy_digest=policy_digest or POLICY.digest(), subject=f"sim:{thumb}",
                       role="holder", holder_thumbprint=thumb, token_id="t", now=1.7e9,
                       seconds=seconds)
    return verify_lease(text)


def _store(clock: FakeClock, max_stale: float = 3600.0) -> KeyStore:
    return KeyStore(max_stale=max_stale, clock=clock, wall_clock=lambda: 1.7e9)


class _NoAppraiser:
    mode = "evidence"
    may_block = False


# --- the store --------------------------------------------------------------------------

def test_a_key_is_served_until_its_lease_ends_then_wiped_with_lease_expired():
    clock = FakeClock()
    store = _store(clock)
    key = ModelKey.generate("m")
    store.replace([Leased(key, POLICY, lease_for(key, 10))])
    clock.advance(9.9)
    entry = store.get("m")
    assert bytes(entry.secret) == key.secret
    clock.advance(0.1)
    with pytest.raises(LeaseExpired, match="lease on model 'm' version 1 ended"):
        store.get("m")
    assert entry.secret == bytearray(32) and len(store) == 0  # wiped, not just hidden
    with pytest.raises(LeaseExpired):
        store.get("m", 1)


def test_the_lease_runs_from_when_the_request_was_sent_not_when_the_answer_came():
    clock = FakeClock()
    store = _store(clock)
    key = ModelKey.generate("m")
    sent = clock()
    clock.advance(4)  # a slow (or host-delayed) answer
    store.replace([Leased(key, POLICY, lease_for(key, 10))], leased_at=sent)
    clock.advance(6)
    with pytest.raises(LeaseExpired):
        store.get("m")


def test_a_refresh_renews_the_lease_of_a_key_it_returns_again():
    clock = FakeClock()
    store = _store(clock)
    key = ModelKey.generate("m")
    store.replace([Leased(key, POLICY, lease_for(key, 10))])
    kept = store.get("m")
    clock.advance(8)
    store.replace([Leased(key, POLICY, lease_for(key, 10))])
    clock.advance(8)
    assert store.get("m") is kept and bytes(kept.secret) == key.secret
    info = store.list()[0]
    assert info.lease_left_s == pytest.approx(2.0) and info.lease_id


def test_a_renewed_lease_after_expiry_serves_the_key_again():
    clock = FakeClock()
    store = _store(clock)
    key = ModelKey.generate("m")
    store.replace([Leased(key, POLICY, lease_for(key, 5))])
    clock.advance(6)
    with pytest.raises(LeaseExpired):
        store.get("m")
    store.replace([Leased(key, POLICY, lease_for(key, 5))])
    assert bytes(store.get("m").secret) == key.secret


def test_a_key_withdrawn_after_its_lease_ended_reads_as_not_held():
    clock = FakeClock()
    store = _store(clock)
    key = ModelKey.generate("m")
    store.replace([Leased(key, POLICY, lease_for(key, 5))])
    clock.advance(6)
    store.replace([])
    with pytest.raises(KeyUnavailable) as info:
        store.get("m")
    assert not isinstance(info.value, LeaseExpired)


def test_max_stale_stays_the_outer_bound_over_longer_leases():
    clock = FakeClock()
    store = _store(clock, max_stale=5)
    key = ModelKey.generate("m")
    store.replace([Leased(key, POLICY, lease_for(key, 60))])
    clock.advance(5.5)
    with pytest.raises(KeysStale):
        store.get("m")


def test_refusal_wipes_every_key_and_names_the_refusal():
    clock = FakeClock()
    store = _store(clock)
    key = ModelKey.generate("m")
    store.replace([Leased(key, POLICY, lease_for(key, 60))])
    entry = store.get("m")
    assert store.refuse("PolicyDenied: no") == 1
    assert entry.secret == bytearray(32)
    with pytest.raises(KeyUnavailable, match="refused it at its last refresh"):
        store.get("m")
    store.replace([Leased(key, POLICY, lease_for(key, 60))])
    assert bytes(store.get("m").secret) == key.secret


# --- the service --------------------------------------------------------------------------

@pytest.mark.parametrize("refusal", [
    AttestationError("evidence did not verify"),
    PolicyDenied("no", ["holders[0]: measurement"]),
    AuthenticationError("token revoked"),
    RequestError("bad request"),
])
def test_an_explicit_refusal_wipes_every_key_at_once(refusal):
    clock = FakeClock()
    key = ModelKey.generate("m")
    up = ScriptedUpstream([Leased(key, POLICY, lease_for(key, 300))])
    kc = Keycache(up, _NoAppraiser(), refresh=10, max_stale=3600, clock=clock)
    assert kc.refresh_once()
    entry = kc.store.get("m")
    up.answer = refusal
    assert not kc.refresh_once()
    assert entry.secret == bytearray(32) and len(kc.store) == 0
    with pytest.raises(KeyUnavailable, match=type(refusal).__name__):
        kc.store.get("m")
    st = kc.status()
    assert st["serving"] is False and st["refresh"]["refusals"] == 1
    assert st["refresh"]["refused"].startswith(type(refusal).__name__)


def test_an_outage_keeps_keys_until_lease_end_not_max_stale():
    clock = FakeClock()
    key = ModelKey.generate("m")
    up = ScriptedUpstream([Leased(key, POLICY, lease_for(key, 30))])
    kc = Keycache(up, _NoAppraiser(), refresh=10, max_stale=3600, clock=clock)
    assert kc.refresh_once()
    up.answer = UpstreamUnavailable("connection refused")
    clock.advance(29)
    assert not kc.refresh_once()
    assert bytes(kc.store.get("m").secret) == key.secret  # an outage: still served
    clock.advance(1)
    kc.expire_leases()
    assert len(kc.store) == 0 and kc.store.lease_expiries == 1
    with pytest.raises(LeaseExpired):
        kc.store.get("m")


def test_the_refresher_renews_two_thirds_into_the_shortest_lease_and_wakes_at_its_end():
    clock = FakeClock()
    a, b = ModelKey.generate("a"), ModelKey.generate("b")
    up = ScriptedUpstream([Leased(a, POLICY, lease_for(a, 9)),
                           Leased(b, POLICY, lease_for(b, 300))])
    kc = Keycache(up, _NoAppraiser(), refresh=60, max_stale=3600, clock=clock,
                  backoff=Backoff(base=30, cap=60))
    assert kc.refresh_once()
    assert kc._delay_after(True) == pytest.approx(6.0)  # renew at 2/3 of 9 s
    up.answer = UpstreamUnavailable("down")
    clock.advance(6)
    assert not kc.refresh_once()
    assert kc._delay_after(False) == pytest.approx(3.05)  # backoff would wait 15-30 s


# --- the adapter over the real client's leased answer ----------------------------------------

class _LeasingClient:
    url = "https://keyserver.test"

    def __init__(self, items: list, holder: bytes = HOLDER) -> None:
        self.items, self.holder = items, holder

    def fetch_all_leased(self):
        return self.items, self.holder


def test_the_adapter_returns_verified_leases_and_pins_the_lease_key():
    key = ModelKey.generate("m")
    text = lease_for(key, 60).text
    up = KeyserverUpstream(_LeasingClient([(ReleasedKey(key, POLICY), text)]))
    (got,) = up.fetch_all()
    assert got.key == key and got.lease.seconds == 60
    assert up.lease_key == SIGNER.public_key
    other = TokenSigner(crypto.SigningKey.generate())
    up._client = _LeasingClient([(ReleasedKey(key, POLICY), lease_for(key, 60,
                                                                       signer=other).text)])
    with pytest.raises(UpstreamUnavailable, match="not by the keyserver key"):
        up.fetch_all()


@pytest.mark.parametrize(("lease", "match"), [
    (None, "without a lease"),
    ("not.a.lease", "malformed"),
])
def test_the_adapter_refuses_a_release_without_a_valid_lease(lease, match):
    key = ModelKey.generate("m")
    up = KeyserverUpstream(_LeasingClient([(ReleasedKey(key, POLICY), lease)]))
    with pytest.raises(UpstreamUnavailable, match=match):
        up.fetch_all()


def test_the_adapter_refuses_a_lease_sealed_for_another_holder():
    key = ModelKey.generate("m")
    text = lease_for(key, 60, holder=crypto.EphemeralKeyPair.generate().public_bytes).text
    up = KeyserverUpstream(_LeasingClient([(ReleasedKey(key, POLICY), text)]))
    with pytest.raises(UpstreamUnavailable, match="another holder"):
        up.fetch_all()


class _FailingClient:
    url = "https://keyserver.test"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def fetch_all_leased(self):
        raise self.exc


def _problem(exc: SealedTorchError, status: int) -> SealedTorchError:
    exc.http_status = status  # type: ignore[attr-defined]
    exc.problem = {"status": status}  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(("exc", "refusal"), [
    (_problem(KeyUnavailable("model gone"), 410), True),
    (_problem(SealedTorchError("conflict"), 409), True),
    (_problem(KeyUnavailable("rate limited"), 429), False),
    (_problem(KeyUnavailable("database down"), 503), False),
    (_problem(SealedTorchError("internal"), 500), False),
    (KeyUnavailable("keyserver unreachable: ConnectError"), False),
    (NonceError("nonce expired"), False),
    (LeaseInvalid("bad lease"), False),
])
def test_the_adapter_sorts_problem_answers_into_refusals_and_outages(exc, refusal):
    up = KeyserverUpstream(_FailingClient(exc))
    with pytest.raises(SealedTorchError) as info:
        up.fetch_all()
    assert isinstance(info.value, UpstreamUnavailable) is not refusal
