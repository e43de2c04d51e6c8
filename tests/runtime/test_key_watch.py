"""The runtime's key watcher against a real keycache on a Unix socket and a real TLS server:
unload drops the weights, the grace period for an unreachable keycache, reload after
recovery, and a newer file that does not load.  The watcher is driven by hand (its thread
is off: ``key_watch_s=0``) on a clock the test moves; the same behaviours with real
keyserver, keycache and ``sealedtorch serve`` processes are in
``tests/keycache/test_leases_with_keyserver.py``."""

from __future__ import annotations

import gc
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sealedtorch import crypto
from sealedtorch.attest import VerifierConfig, measure
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.attest.policy import load_policy
from sealedtorch.attest.sim import SimPlatform
from sealedtorch.errors import KeyUnavailable
from sealedtorch.format import seal
from sealedtorch.keycache import KeycacheClient
from sealedtorch.keycache.local import AnswerSigner, EvidenceAppraiser
from sealedtorch.keycache.server import KeycacheServer
from sealedtorch.keycache.service import Keycache
from sealedtorch.keys import ModelKey
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.loader import ModelSource
from sealedtorch.runtime.watch import KeyWatcher

from .conftest import MLP_ARCH, MLP_KWARGS

SETTINGS: dict[str, Any] = {"key_watch_s": 0, "key_watch_grace_s": 10, "key_retries": 1,
                            "key_retry_delay_s": 0.01}
KEYCACHE_MEASUREMENT = measure.measurement(b"key-watch tests: keycache")


def trusting(sim_dir: Path) -> RuntimeConfig:
    """The watcher tests' runtime configuration, whose `keycache` rule names the test
    keycache (its measurement, the sim platform): keys — on load and on every re-check —
    come only from a keycache that proves itself (mutual attestation)."""
    pub = crypto.load_ed25519_public((sim_dir / "platform.pub").read_bytes())
    return RuntimeConfig.model_validate({**SETTINGS, "keycache": [{
        "tee": "sim", "measurement": KEYCACHE_MEASUREMENT.hex(), "platform_key": pub.hex()}]})


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Upstream:
    """The keycache's upstream protocol; the test changes ``released`` (the keyserver)."""

    def __init__(self, released: list[tuple[ModelKey, Any]]) -> None:
        self.released = released

    def fetch_all(self) -> list[tuple[ModelKey, Any]]:
        return list(self.released)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kw-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Host:
    def __init__(self, short: Path, sim_dir: Path, tmp: Path) -> None:
        pub = crypto.load_ed25519_public((sim_dir / "platform.pub").read_bytes())
        self.config = trusting(sim_dir)
        self.policy = load_policy({"allow": [{"tee": "sim", "measurement":
                                              runtime_measurement(self.config).hex()}]})
        self.upstream = Upstream([])
        self.kc = Keycache(self.upstream, EvidenceAppraiser(
            VerifierConfig(sim_platform_keys=(pub,)), tees=["sim"]), refresh=3600,
            max_stale=3600)
        self.sock = short / "kc" / "keycache.sock"
        signer = AnswerSigner(SimAttester(SimPlatform.load(sim_dir), KEYCACHE_MEASUREMENT))
        self.server = KeycacheServer(self.kc, self.sock, signer=signer).start()
        self.client = KeycacheClient(self.sock, tee="sim", sim_platform=sim_dir,
                                     runtime_config=self.config.canonical_bytes(),
                                     keycache_rules=self.config.keycache, timeout=5)
        self.tmp = tmp
        torch.manual_seed(0)
        from sealedtorch.runtime.architectures import mlp

        self.module = mlp(**MLP_KWARGS).eval()
        self.path = tmp / "served.sealed"

    def hold(self, *keys: ModelKey) -> None:
        self.upstream.released = [(k, self.policy) for k in keys]
        assert self.kc.refresh_once()

    def put_file(self, key: ModelKey) -> None:
        tmp = self.tmp / f"new-{key.version}.sealed"
        seal(self.module, tmp, key=key, metadata={"arch": MLP_ARCH, "arch_kwargs": MLP_KWARGS})
        tmp.replace(self.path)

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.kc.stop()


@pytest.fixture
def host(short_dir, sim_dir, tmp_path) -> Iterator[Host]:
    h = Host(short_dir, sim_dir, tmp_path)
    yield h
    h.close()


def _serving(host: Host, start_server: Any, key: ModelKey) -> tuple[Any, KeyWatcher, Clock]:
    host.hold(key)
    host.put_file(key)
    srv = start_server([ModelSource("m", host.path)], keys=host.client, config=host.config)
    srv.wait_ready(60)
    clock = Clock()
    return srv, KeyWatcher(srv.runtime, clock=clock), clock


def _infer(raw_client: Any, srv: Any) -> Any:
    return raw_client(srv.url).post("/v2/models/m/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})


def test_unloading_zeroes_the_weights_and_drops_every_reference(host, start_server,
                                                                raw_client):
    key = ModelKey.generate("watched")
    srv, watcher, _ = _serving(host, start_server, key)
    slot = srv.runtime.slots["m"]
    module_ref = weakref.ref(slot.model.module)
    weight = next(slot.model.module.parameters())
    assert bool(weight.abs().sum() > 0)
    assert _infer(raw_client, srv).status_code == 200
    host.hold()  # revoked on the keyserver: the keycache drops it at the next refresh
    watcher.check_once()
    assert slot.state == "unloaded" and slot.model is None and slot.batcher is None
    assert bool(weight.abs().sum() == 0)  # zeroed in place before being dropped
    del weight
    gc.collect()
    assert module_ref() is None  # nothing in the runtime references the weights any more
    r = _infer(raw_client, srv)
    assert r.status_code == 503 and "no longer holds its key" in r.json()["error"]


def test_an_unreachable_keycache_is_tolerated_for_the_grace_period_then_unloads(
        host, start_server, raw_client):
    key = ModelKey.generate("watched")
    srv, watcher, clock = _serving(host, start_server, key)
    watcher.check_once()  # confirmed now
    host.server.stop()  # the host kills the keycache: its socket is gone
    clock.t += host.config.key_watch_grace_s - 1
    watcher.check_once()
    assert srv.runtime.slots["m"].state == "ready"
    assert _infer(raw_client, srv).status_code == 200
    clock.t += 2
    watcher.check_once()
    slot = srv.runtime.slots["m"]
    assert slot.state == "unloaded" and "unreachable" in str(slot.error)


def test_an_unloaded_model_is_loaded_again_once_the_keycache_holds_its_key(
        host, start_server, raw_client):
    key = ModelKey.generate("watched")
    srv, watcher, _ = _serving(host, start_server, key)
    host.hold()
    watcher.check_once()
    assert srv.runtime.slots["m"].state == "unloaded"
    host.hold(key)  # e.g. the network came back and a refresh renewed the lease
    watcher.check_once()
    assert srv.runtime.slots["m"].state == "ready" and srv.runtime.ready
    assert _infer(raw_client, srv).status_code == 200
    assert 'model_reloads_total{model="m",outcome="ok"} 1' in srv.runtime.metrics.render()


def test_a_model_that_failed_to_load_for_want_of_its_key_loads_once_the_key_is_held(
        host, start_server, raw_client):
    key = ModelKey.generate("watched")
    host.hold()  # the keycache holds nothing yet
    host.put_file(key)
    srv = start_server([ModelSource("m", host.path)], keys=host.client, config=host.config)
    with pytest.raises(KeyUnavailable):
        srv.wait_ready(60)
    watcher = KeyWatcher(srv.runtime, clock=Clock())
    watcher.check_once()
    assert srv.runtime.slots["m"].state == "failed"
    host.hold(key)
    watcher.check_once()
    assert srv.runtime.ready and _infer(raw_client, srv).status_code == 200


def test_a_newer_file_that_does_not_load_leaves_the_old_version_serving(
        host, start_server, raw_client):
    v1 = ModelKey.generate("watched")
    srv, watcher, _ = _serving(host, start_server, v1)
    v2 = ModelKey("watched", 2, crypto.generate_key())
    host.hold(v1, v2)
    host.put_file(ModelKey("watched", 2, crypto.generate_key()))  # not the keyserver's v2
    watcher.check_once()
    watcher.check_once()  # the same broken file is not loaded again
    slot = srv.runtime.slots["m"]
    assert slot.state == "ready" and slot.model.key_version == 1
    assert _infer(raw_client, srv).status_code == 200
    assert 'model_reloads_total{model="m",outcome="failed"} 1' in \
        srv.runtime.metrics.render()
    host.put_file(v2)  # the right file: picked up at the next check
    watcher.check_once()
    assert slot.model.key_version == 2
    # the KServe version is the serving version, stable across the key rotation
    assert _infer(raw_client, srv).json()["model_version"] == "1"
    assert raw_client(srv.url).get("/v2/models/m").json()["parameters"]["key_version"] == 2


def test_a_re_check_answered_by_an_unattested_keycache_unloads_at_once(
        host, start_server, raw_client, sim_dir):
    """Mutual attestation applies to the watcher's re-checks too: a keycache on the socket
    whose evidence matches no `keycache` rule (here: another program's measurement, still
    holding the key) is refused, and the model is unloaded at once, not tolerated as an
    unreachable keycache for the grace period."""
    key = ModelKey.generate("watched")
    srv, watcher, _ = _serving(host, start_server, key)
    watcher.check_once()
    assert srv.runtime.slots["m"].state == "ready"
    host.server.stop()
    impostor = AnswerSigner(SimAttester(SimPlatform.load(sim_dir),
                                        measure.measurement(b"key-watch tests: impostor")))
    host.server = KeycacheServer(host.kc, host.sock, signer=impostor).start()
    watcher.check_once()
    slot = srv.runtime.slots["m"]
    assert slot.state == "unloaded" and slot.model is None
    assert "KeycacheAttestationError" in str(slot.error)
    assert "matches no keycache rule" in str(slot.error)
    assert _infer(raw_client, srv).status_code == 503


def test_key_watch_settings_are_validated_and_measured():
    from sealedtorch.errors import ConfigError
    from sealedtorch.runtime.config import load_config

    with pytest.raises(ConfigError, match="key_watch_s"):
        load_config({"key_watch_s": -1})
    with pytest.raises(ConfigError, match="key_watch_grace_s"):
        load_config({"key_watch_grace_s": "soon"})
    assert runtime_measurement(RuntimeConfig(key_watch_s=5)) != \
        runtime_measurement(RuntimeConfig(key_watch_s=6))
