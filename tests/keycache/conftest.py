"""Fixtures for keycache tests: a sim platform, runtimes' attesters, and a keycache serving on
a real Unix socket in a short temporary directory (socket paths are limited to 107 bytes).

The local-side tests feed the keycache from :class:`ScriptedUpstream`, an implementation of
the keycache's own ``Upstream`` protocol whose answers the test sets; the tests against the
real keyserver (processes, TLS) are in ``test_with_keyserver.py``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sealedtorch.attest import VerifierConfig, measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.attest.policy import Policy, load_policy
from sealedtorch.keycache.client import KeycacheClient
from sealedtorch.keycache.local import AnswerSigner, EvidenceAppraiser
from sealedtorch.keycache.server import KeycacheServer
from sealedtorch.keycache.service import Backoff, Keycache
from sealedtorch.keys import ModelKey

RUNTIME_MEASUREMENT = measure.measurement(b"keycache-tests: runtime")
OTHER_MEASUREMENT = measure.measurement(b"keycache-tests: some other program")
KEYCACHE_MEASUREMENT = measure.measurement(b"keycache-tests: the keycache")


def keycache_rules(platform: sim.SimPlatform, measurement: bytes = KEYCACHE_MEASUREMENT
                   ) -> tuple[Any, ...]:
    """The `keycache` rules a runtime configuration names: this keycache, this platform."""
    from sealedtorch.runtime.config import RuntimeConfig

    return RuntimeConfig.model_validate({"keycache": [{
        "tee": "sim", "measurement": measurement.hex(),
        "platform_key": platform.public_key.hex()}]}).keycache or ()


def sim_policy(*measurements: bytes) -> Policy:
    return load_policy({"allow": [{"tee": "sim", "measurement": m.hex()}
                                  for m in (measurements or (RUNTIME_MEASUREMENT,))]})


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds


@dataclass
class ScriptedUpstream:
    """The keycache's Upstream protocol with answers chosen by the test: a list of
    (ModelKey, Policy), or an exception to raise, or anything else (garbage)."""

    answer: Any = field(default_factory=list)
    calls: int = 0

    def fetch_all(self) -> list[tuple[ModelKey, Policy]]:
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        if callable(self.answer):
            return self.answer()  # type: ignore[no-any-return]
        return self.answer  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> sim.SimPlatform:
    return sim.init_platform(tmp_path_factory.mktemp("kc-sim") / "platform")


@pytest.fixture
def runtime(platform: sim.SimPlatform) -> SimAttester:
    return SimAttester(platform, RUNTIME_MEASUREMENT)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Running:
    keycache: Keycache
    server: KeycacheServer
    upstream: ScriptedUpstream
    clock: FakeClock
    socket: Path
    rules: tuple[Any, ...] = ()
    clients: list[KeycacheClient] = field(default_factory=list)

    def client(self, attester: Any = None, **kw: Any) -> KeycacheClient:
        """A runtime's client that trusts this keycache (its measurement and platform)."""
        kw.setdefault("keycache_rules", self.rules)
        c = KeycacheClient(self.socket, attester=attester, **kw)
        self.clients.append(c)
        return c


StartKeycache = Callable[..., Running]


@pytest.fixture
def start_keycache(short_dir: Path, platform: sim.SimPlatform) -> Iterator[StartKeycache]:
    """Start a keycache (no background refresher: tests call refresh_once) on a socket."""
    started: list[Running] = []

    def start(answer: Any = (), *, appraiser: Any = None, max_stale: float = 60.0,
              refresh: float = 10.0, nonce_ttl: float = 30.0,
              socket_name: str = "run/keycache.sock", signer: Any = "default") -> Running:
        """``signer``: the keycache's AnswerSigner (default: sim evidence under
        KEYCACHE_MEASUREMENT on the test platform); None serves without one."""
        clock = FakeClock()
        upstream = ScriptedUpstream(list(answer) if isinstance(answer, list | tuple)
                                    else answer)
        appraiser = appraiser or EvidenceAppraiser(
            VerifierConfig(sim_platform_keys=(platform.public_key,)), tees=["sim"])
        kc = Keycache(upstream, appraiser, refresh=refresh, max_stale=max_stale,
                      nonce_ttl=nonce_ttl, clock=clock, backoff=Backoff(base=0.01, cap=0.05))
        kc.refresh_once()
        if signer == "default":
            signer = AnswerSigner(SimAttester(platform, KEYCACHE_MEASUREMENT))
        server = KeycacheServer(kc, short_dir / socket_name, signer=signer).start()
        running = Running(kc, server, upstream, clock, short_dir / socket_name,
                          keycache_rules(platform))
        started.append(running)
        return running

    yield start
    for running in started:
        for c in running.clients:
            c.close()
        running.server.stop()
        running.keycache.stop()
