"""The runtime with a real keycache on a Unix socket: the runtime proves itself with sim
evidence whose measurement covers its configuration, the keycache applies the model's
policy, and ``sealedtorch serve`` runs as a real process."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
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
from sealedtorch.errors import KeyUnavailable, PolicyDenied
from sealedtorch.keycache import KeycacheClient
from sealedtorch.keycache.local import AnswerSigner, EvidenceAppraiser
from sealedtorch.keycache.server import KeycacheServer
from sealedtorch.keycache.service import Keycache
from sealedtorch.keys import ModelKey
from sealedtorch.runtime.client import AttestedClient
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.loader import ModelSource
from sealedtorch.runtime.server import SubprocessServer


class Upstream:
    """The keycache's upstream protocol, answering with fixed (key, policy) pairs."""

    def __init__(self, released: list[tuple[ModelKey, Any]]) -> None:
        self.released = released

    def fetch_all(self) -> list[tuple[ModelKey, Any]]:
        return self.released


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # Unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def keycache(short_dir, sim_dir) -> Iterator[Any]:
    running: list[tuple[Keycache, KeycacheServer]] = []

    def start(released: list[tuple[ModelKey, Any]]) -> Path:
        pub = crypto.load_ed25519_public((sim_dir / "platform.pub").read_bytes())
        kc = Keycache(Upstream(released),
                      EvidenceAppraiser(VerifierConfig(sim_platform_keys=(pub,)), tees=["sim"]),
                      refresh=3600, max_stale=3600)
        kc.refresh_once()
        sock = short_dir / "kc" / "keycache.sock"
        signer = AnswerSigner(SimAttester(SimPlatform.load(sim_dir), KEYCACHE_MEASUREMENT))
        server = KeycacheServer(kc, sock, signer=signer).start()
        running.append((kc, server))
        return sock

    yield start
    for kc, server in running:
        server.stop()
        kc.stop()


KEYCACHE_MEASUREMENT = measure.measurement(b"runtime tests: keycache")


def trusting(sim_dir: Path, **settings: Any) -> RuntimeConfig:
    """A runtime configuration whose keycache rule names the test keycache."""
    pub = crypto.load_ed25519_public((sim_dir / "platform.pub").read_bytes())
    return RuntimeConfig.model_validate({**settings, "keycache": [{
        "tee": "sim", "measurement": KEYCACHE_MEASUREMENT.hex(), "platform_key": pub.hex()}]})


def allow(config: RuntimeConfig) -> Any:
    return load_policy({"allow": [{"tee": "sim",
                                   "measurement": runtime_measurement(config).hex()}]})


def client_for(sock: Path, sim_dir: Path, config: RuntimeConfig) -> KeycacheClient:
    return KeycacheClient(sock, tee="sim", sim_platform=sim_dir,
                          runtime_config=config.canonical_bytes(),
                          keycache_rules=config.keycache)


def test_keys_from_the_keycache_to_an_attested_client(keycache, tiny, sim_dir, start_server,
                                                      policy_for):
    config = trusting(sim_dir)
    sock = keycache([(tiny.key, allow(config))])
    with client_for(sock, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", tiny.path)], keys=keys, config=config)
        srv.wait_ready(30)
        with AttestedClient(srv.url, policy=policy_for(config),
                            sim_roots=[sim_dir / "platform.pub"]) as client:
            x = torch.randn(3, 4)
            with torch.inference_mode():
                assert torch.equal(client.infer("tiny", x)["output"], tiny.module(x))


def test_a_runtime_the_model_policy_does_not_allow_gets_no_key(keycache, tiny, sim_dir,
                                                               start_server, raw_client):
    """Another runtime configuration is another measurement: the keycache refuses it."""
    sock = keycache([(tiny.key, allow(trusting(sim_dir)))])
    config = trusting(sim_dir, max_batch_size=8)
    with client_for(sock, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", tiny.path)], keys=keys, config=config)
        with pytest.raises(PolicyDenied, match="measurement"):
            srv.wait_ready(30)
        r = raw_client(srv.url).get("/v2/health/ready")
        assert r.status_code == 503 and "PolicyDenied" in r.json()["models"][0]["error"]


def test_a_key_the_keycache_does_not_hold(keycache, tiny, sim_dir, start_server):
    other = ModelKey.generate("someone-else")
    config = trusting(sim_dir, key_retry_delay_s=0.01)
    sock = keycache([(other, allow(config))])
    with client_for(sock, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", tiny.path)], keys=keys, config=config)
        with pytest.raises(KeyUnavailable, match="holds no key for model 'tiny-mlp'"):
            srv.wait_ready(30)


def _serve_args(tmp: Path, sim_dir: Path, model: Path, sock: Path, config: RuntimeConfig
                ) -> list[str]:
    cfg = tmp / "runtime.json"
    cfg.write_bytes(config.canonical_bytes())
    return ["--model", f"tiny={model}", "--keycache", str(sock), "--listen", "127.0.0.1:0",
            "--tee", "sim", "--sim-platform", str(sim_dir), "--config", str(cfg)]


@pytest.mark.slow
def test_sealedtorch_serve_process_end_to_end(keycache, tiny, sim_dir, tmp_path, policy_for):
    config = trusting(sim_dir)
    sock = keycache([(tiny.key, allow(config))])
    with SubprocessServer.start(_serve_args(tmp_path, sim_dir, tiny.path, sock, config)) as srv:
        with AttestedClient(srv.url, policy=policy_for(config),
                            sim_roots=[sim_dir / "platform.pub"]) as client:
            deadline = time.monotonic() + 60
            while not client.ready():
                assert time.monotonic() < deadline, srv.log_text()
                time.sleep(0.05)
            x = torch.randn(2, 4)
            with torch.inference_mode():
                assert torch.equal(client.infer("tiny", x)["output"], tiny.module(x))
        assert srv.stop() == 0  # SIGTERM: drained and stopped cleanly
    records = [json.loads(line) for line in srv.log_text().splitlines()
               if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert any(m.startswith("runtime listening on https://127.0.0.1:") for m in messages)
    assert "model tiny ready" in messages and "runtime stopped" in messages
    assert all(tiny.key.secret.hex() not in line for line in srv.log_text().splitlines())


@pytest.mark.slow
def test_serve_with_the_keycache_down_retries_then_exits_with_a_clear_error(
        sim_dir, tiny, tmp_path):
    config = trusting(sim_dir, key_retries=3, key_retry_delay_s=0.05)
    missing = Path(tempfile.gettempdir()) / f"rt-absent-{time.time_ns()}.sock"
    srv = SubprocessServer.start(_serve_args(tmp_path, sim_dir, tiny.path, missing, config))
    assert srv.process.wait(60) == 2
    log = srv.log_text()
    assert "cannot reach the keycache" in log
    assert "after 3 attempts" in log
    assert "sealedtorch: error (KeycacheUnavailable)" in log
