"""Units: the key store, nonces, backoff, durations, and the upstream adapter's sorting of
keyserver failures."""

from __future__ import annotations

import argparse
import random

import pytest

from sealedtorch.attest import binding
from sealedtorch.cli.keycache import parse_duration
from sealedtorch.errors import (
    AttestationError,
    IntegrityError,
    KeyUnavailable,
    NonceError,
    PolicyDenied,
    SealedTorchError,
)
from sealedtorch.keycache.local import NonceRegistry
from sealedtorch.keycache.service import Backoff, Keycache
from sealedtorch.keycache.store import KeysStale, KeyStore
from sealedtorch.keycache.upstream import KeyserverUpstream, UpstreamUnavailable
from sealedtorch.keys import ModelKey

from .conftest import OTHER_MEASUREMENT, FakeClock, ScriptedUpstream, sim_policy

POLICY = sim_policy()


def _store(clock: FakeClock, max_stale: float = 100.0) -> KeyStore:
    return KeyStore(max_stale=max_stale, clock=clock, wall_clock=lambda: 1.7e9)


# --- store ------------------------------------------------------------------------------

def test_store_serves_versions_and_latest():
    clock = FakeClock()
    store = _store(clock)
    k1, k2, other = ModelKey.generate("m", 1), ModelKey.generate("m", 2), ModelKey.generate("o")
    changes = store.replace([(k1, POLICY), (k2, POLICY), (other, POLICY)])
    assert changes.added == (("m", 1), ("m", 2), ("o", 1)) and not changes.removed
    assert bytes(store.get("m").secret) == k2.secret
    assert bytes(store.get("m", 1).secret) == k1.secret
    assert store.get("o").version == 1
    with pytest.raises(KeyUnavailable, match=r"version 3 .*holds version\(s\) 1, 2"):
        store.get("m", 3)
    with pytest.raises(KeyUnavailable, match="no key for model 'nope'"):
        store.get("nope")
    listed = store.list()
    assert [(i.model_id, i.version, i.latest) for i in listed] == \
        [("m", 1, False), ("m", 2, True), ("o", 1, True)]
    assert all(i.policy_digest == POLICY.digest() for i in listed)
    assert k2.secret.hex() not in repr(store.get("m"))


def test_store_drops_what_a_refresh_no_longer_returns_and_wipes_it():
    clock = FakeClock()
    store = _store(clock)
    k1, k2 = ModelKey.generate("m", 1), ModelKey.generate("m", 2)
    store.replace([(k1, POLICY), (k2, POLICY)])
    held_v2 = store.get("m", 2)
    changes = store.replace([(k1, POLICY)])  # v2 revoked on the keyserver
    assert changes.removed == (("m", 2),) and not changes.added
    assert held_v2.secret == bytearray(32)  # wiped
    with pytest.raises(KeyUnavailable):
        store.get("m", 2)
    assert store.get("m").version == 1  # latest falls back to what is held
    # a key that stays is the same object (not re-copied) ...
    kept = store.get("m", 1)
    store.replace([(k1, POLICY)])
    assert store.get("m", 1) is kept
    # ... unless its policy changed
    new_policy = sim_policy(OTHER_MEASUREMENT)
    changes = store.replace([(k1, new_policy)])
    assert changes.policy_changed == ("m",)
    assert store.get("m", 1).policy == new_policy
    assert bytes(store.get("m", 1).secret) == k1.secret
    store.replace([])
    assert len(store) == 0 and kept.secret == bytearray(32)


def test_store_staleness_clock():
    clock = FakeClock()
    store = _store(clock, max_stale=100)
    with pytest.raises(KeysStale, match="holds no keys yet"):
        store.get("m")
    store.replace([(ModelKey.generate("m"), POLICY)])
    clock.advance(99)
    entry = store.get("m")
    assert not store.is_stale()
    clock.advance(2)
    assert store.is_stale() and len(store) == 1  # noticed on the next read, not by a timer
    with pytest.raises(KeysStale, match=r"101 s ago, more than max-stale \(100 s\)"):
        store.get("m")
    assert len(store) == 0 and entry.secret == bytearray(32) and store.expired
    assert not store.expire()  # nothing left to wipe
    with pytest.raises(KeysStale):
        store.get("m")
    store.replace([(ModelKey.generate("m"), POLICY)])  # the keyserver is back
    assert store.get("m") and not store.expired


def test_store_rejects_non_keys():
    store = _store(FakeClock())
    with pytest.raises(TypeError):
        store.replace([("m", POLICY)])  # type: ignore[list-item]
    with pytest.raises(KeysStale):  # a failed replace does not count as a refresh
        store.get("m")


# --- nonces -----------------------------------------------------------------------------

def test_nonces_are_single_use_short_lived_and_tied_to_the_uid():
    clock = FakeClock()
    reg = NonceRegistry(ttl=30, clock=clock)
    n = reg.issue(uid=1000)
    assert len(n) == binding.NONCE_SIZE
    reg.consume(n, uid=1000)
    with pytest.raises(NonceError, match="unknown or already used"):
        reg.consume(n, uid=1000)
    n = reg.issue(uid=1000)
    clock.advance(31)
    with pytest.raises(NonceError, match="expired"):
        reg.consume(n, uid=1000)
    n = reg.issue(uid=1000)
    with pytest.raises(NonceError, match="issued to uid 1000"):
        reg.consume(n, uid=1001)
    with pytest.raises(NonceError):  # and a failed attempt used it up
        reg.consume(n, uid=1000)


def test_nonce_registry_is_bounded():
    clock = FakeClock()
    reg = NonceRegistry(ttl=30, max_outstanding=10, clock=clock)
    first = reg.issue()
    for _ in range(20):
        reg.issue()
    assert len(reg) == 10
    with pytest.raises(NonceError):
        reg.consume(first)


# --- backoff and durations -----------------------------------------------------------------

def test_backoff_grows_with_jitter_up_to_the_cap():
    b = Backoff(base=1, cap=8, rng=random.Random(1))
    delays = [b.next() for _ in range(6)]
    for n, d in enumerate(delays):
        ceiling = min(8, 2 ** n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 8
    b.reset()
    assert b.next() <= 1


@pytest.mark.parametrize(("text", "seconds"), [
    ("60s", 60), ("1h", 3600), ("500ms", 0.5), ("2m", 120), ("1d", 86400), ("7", 7),
    ("0.25s", 0.25)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "-1s", "0", "1w", "1 hour"])
def test_parse_duration_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


# --- the refresher never dies -------------------------------------------------------------

@pytest.mark.parametrize("answer", [
    UpstreamUnavailable("connection refused"),
    ZeroDivisionError("a bug"),
    "garbage",
    [("not", "pairs")],
])
def test_refresh_failures_keep_what_is_held(answer, runtime):
    clock = FakeClock()
    key = ModelKey.generate("m")
    up = ScriptedUpstream([(key, POLICY)])
    kc = Keycache(up, appraiser=_NoAppraiser(), refresh=10, max_stale=100, clock=clock)
    assert kc.refresh_once()
    up.answer = answer
    assert not kc.refresh_once()
    assert kc.last_error and bytes(kc.store.get("m").secret) == key.secret
    assert kc.reachable is False
    clock.advance(101)
    assert not kc.refresh_once()
    assert len(kc.store) == 0  # wiped once past max-stale
    with pytest.raises(KeysStale):
        kc.store.get("m")


class _NoAppraiser:
    mode = "evidence"
    may_block = False

    def appraise(self, request, peer):  # pragma: no cover - not used here
        raise AssertionError


def test_delay_is_backoff_on_failure_and_interval_on_success():
    clock = FakeClock()
    up = ScriptedUpstream(UpstreamUnavailable("down"))
    kc = Keycache(up, _NoAppraiser(), refresh=5, max_stale=100, clock=clock,
                  backoff=Backoff(base=0.5, cap=60, rng=random.Random(0)))
    delays = []
    for _ in range(8):
        kc.refresh_once()
        delays.append(kc._delay_after(False))
    assert delays[0] <= 0.5 and delays[1] <= 1.0 and max(delays) <= 5  # capped at refresh
    up.answer = [(ModelKey.generate("m"), POLICY)]
    assert kc.refresh_once()
    assert kc._delay_after(True) == 5 and kc.backoff.failures == 0


# --- the adapter over the keyserver client ----------------------------------------------------

class _Client:
    def __init__(self, exc: BaseException | None = None, answer: object = ()) -> None:
        self.exc, self.answer = exc, answer

    def fetch_all(self):
        if self.exc:
            raise self.exc
        return self.answer


@pytest.mark.parametrize(("exc", "expected"), [
    (KeyUnavailable("keyserver https://x unreachable: ConnectError"), UpstreamUnavailable),
    (SealedTorchError("keyserver answered HTTP 502"), UpstreamUnavailable),
    (IntegrityError("HPKE open failed"), UpstreamUnavailable),
    (OSError("weird"), UpstreamUnavailable),
    (AttestationError("evidence did not verify"), AttestationError),
    (PolicyDenied("no", ["holders[0]: measurement"]), PolicyDenied),
])
def test_adapter_sorts_failures(exc, expected):
    with pytest.raises(expected) as info:
        KeyserverUpstream(_Client(exc)).fetch_all()
    if expected is UpstreamUnavailable:
        assert not isinstance(info.value, AttestationError | PolicyDenied)


def test_adapter_passes_pairs_and_rejects_others():
    key = ModelKey.generate("m")
    assert KeyserverUpstream(_Client(answer=[(key, POLICY)])).fetch_all() == [(key, POLICY)]
    with pytest.raises(UpstreamUnavailable):
        KeyserverUpstream(_Client(answer=[(b"x", POLICY)])).fetch_all()
    assert KeyserverUpstream(_Client()).seconds_until_reattest() is None


def test_harden_process_in_a_child():
    import subprocess
    import sys

    code = ("import ctypes, ctypes.util, resource\n"
            "from sealedtorch.keycache.server import harden_process\n"
            "assert harden_process() == []\n"
            "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
            "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
            "print(libc.prctl(3, 0, 0, 0, 0))\n")  # PR_GET_DUMPABLE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "0"
