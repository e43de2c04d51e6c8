"""The runtime authenticates its keycache (issue 10 §2): a host that points a genuine runtime
at a keycache of its own — real keycache code under another measurement or on another sim
platform, a plain process speaking the protocol, or a relay in front of the genuine keycache
that swaps the sealed key — gets a typed refusal, and the runtime never becomes ready.

Every keycache here is a separate process on a real Unix socket (``host_keycache.py``); the
host's weights are sealed under the configured model id with the host's own key, which each
impostor hands out correctly HPKE-sealed to the runtime: only the keycache check stops it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sealedtorch.attest import measure
from sealedtorch.attest.sim import PUB_FILE, SimPlatform, init_platform
from sealedtorch.errors import ConfigError, KeycacheAttestationError
from sealedtorch.format import seal
from sealedtorch.keycache import KeycacheClient
from sealedtorch.keys import ModelKey, write_key_file
from sealedtorch.runtime.architectures import mlp
from sealedtorch.runtime.client import AttestedClient
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.loader import ModelSource
from sealedtorch.runtime.server import SubprocessServer

from .conftest import MLP_ARCH, MLP_KWARGS

SCRIPT = Path(__file__).with_name("host_keycache.py")
TRUSTED_LABEL = "the trusted keycache build"
HOST_LABEL = "the host's own keycache build"


def trusting(platform_dir: Path, label: str = TRUSTED_LABEL, **settings: Any) -> RuntimeConfig:
    """A runtime configuration whose keycache rule names ``label``'s measurement on the
    platform in ``platform_dir``."""
    pub = SimPlatform.load(platform_dir).public_key
    return RuntimeConfig.model_validate({**settings, "keycache": [{
        "tee": "sim", "measurement": measure.measurement(label.encode()).hex(),
        "platform_key": pub.hex()}]})


@pytest.fixture
def short_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))  # Unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def host(short_dir) -> Iterator[Callable[..., Path]]:
    """Start a host keycache process (``host_keycache.py MODE ...``); return its socket."""
    procs: list[subprocess.Popen[str]] = []
    count = [0]

    def start(mode: str, *args: str | os.PathLike[str]) -> Path:
        count[0] += 1
        sock = short_dir / f"k{count[0]}" / "kc.sock"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), mode, str(sock),
                                 *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        return sock

    yield start
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipes


@pytest.fixture
def host_file(tmp_path) -> tuple[Path, Path]:
    """The host's own weights, sealed under the owner's model id with the host's key."""
    torch.manual_seed(1234)
    key = ModelKey.generate("tiny-mlp")
    path = tmp_path / "host.sealed"
    seal(mlp(**MLP_KWARGS), path, key=key,
         metadata={"arch": MLP_ARCH, "arch_kwargs": MLP_KWARGS})
    return path, write_key_file(tmp_path / "host.key", key)


@pytest.fixture
def owner_key_file(tiny, tmp_path) -> Path:
    return write_key_file(tmp_path / "owner.key", tiny.key)


def keys_for(sock: Path, sim_dir: Path, config: RuntimeConfig) -> KeycacheClient:
    return KeycacheClient(sock, tee="sim", sim_platform=sim_dir,
                          runtime_config=config.canonical_bytes(),
                          keycache_rules=config.keycache)


def refused_and_unready(start_server, raw_client, source: ModelSource, keys: KeycacheClient,
                        config: RuntimeConfig, error: type[Exception], match: str) -> None:
    srv = start_server([source], keys=keys, config=config)
    with pytest.raises(error, match=match):
        srv.wait_ready(60)
    ready = raw_client(srv.url).get("/v2/health/ready")
    assert ready.status_code == 503
    assert error.__name__ in ready.json()["models"][0]["error"]
    assert srv.runtime.slots["tiny"].model is None  # nothing was loaded


def test_the_keycache_the_configuration_names_serves_the_runtime(
        host, tiny, owner_key_file, sim_dir, start_server, policy_for):
    config = trusting(sim_dir)
    sock = host("real", sim_dir, TRUSTED_LABEL, owner_key_file,
                runtime_measurement(config).hex())
    with keys_for(sock, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", tiny.path)], keys=keys, config=config)
        srv.wait_ready(60)
        with AttestedClient(srv.url, policy=policy_for(config),
                            sim_roots=[sim_dir / PUB_FILE]) as client:
            x = torch.randn(2, 4)
            with torch.inference_mode():
                assert torch.equal(client.infer("tiny", x)["output"], tiny.module(x))


@pytest.mark.slow
def test_a_real_keycache_under_another_measurement_is_refused_by_sealedtorch_serve(
        host, host_file, sim_dir, tmp_path):
    """The whole `sealedtorch serve` process: it exits 2 naming the keycache check."""
    config = trusting(sim_dir, key_retries=1)
    path, key_file = host_file
    sock = host("real", sim_dir, HOST_LABEL, key_file, runtime_measurement(config).hex())
    cfg = tmp_path / "runtime.json"
    cfg.write_bytes(config.canonical_bytes())
    srv = SubprocessServer.start(["--model", f"tiny={path}", "--keycache", str(sock),
                                  "--listen", "127.0.0.1:0", "--tee", "sim",
                                  "--sim-platform", str(sim_dir), "--config", str(cfg)])
    try:
        assert srv.process.wait(120) == 2
    finally:
        srv.stop()
    log = srv.log_text()
    assert "KeycacheAttestationError" in log
    assert "matches no keycache rule" in log and "measurement" in log
    assert "model tiny ready" not in log


def test_a_real_keycache_under_another_measurement_is_refused(
        host, host_file, sim_dir, start_server, raw_client):
    config = trusting(sim_dir)
    path, key_file = host_file
    sock = host("real", sim_dir, HOST_LABEL, key_file, runtime_measurement(config).hex())
    with keys_for(sock, sim_dir, config) as keys:
        refused_and_unready(start_server, raw_client, ModelSource("tiny", path), keys, config,
                            KeycacheAttestationError, "keycache.*measurement: expected")


def test_a_real_keycache_on_another_sim_platform_is_refused(
        host, host_file, sim_dir, tmp_path, start_server, raw_client):
    """Same code, same measurement, but the host's own sim platform key signs."""
    rogue = init_platform(tmp_path / "rogue-platform")
    config = trusting(sim_dir)
    path, key_file = host_file
    sock = host("real", rogue.directory, TRUSTED_LABEL, key_file,
                runtime_measurement(config).hex(), sim_dir)
    with keys_for(sock, sim_dir, config) as keys:
        refused_and_unready(start_server, raw_client, ModelSource("tiny", path), keys, config,
                            KeycacheAttestationError, "evidence does not verify")


def test_a_plain_process_speaking_the_protocol_is_refused(
        host, host_file, sim_dir, start_server, raw_client):
    config = trusting(sim_dir)
    path, key_file = host_file
    sock = host("plain", key_file)
    with keys_for(sock, sim_dir, config) as keys:
        refused_and_unready(start_server, raw_client, ModelSource("tiny", path), keys, config,
                            KeycacheAttestationError, "without evidence of its own")


def test_a_relay_that_swaps_the_sealed_key_is_refused(
        host, host_file, owner_key_file, sim_dir, start_server, raw_client):
    """The genuine keycache's evidence and signature, with the host's key spliced in: the
    signature covers the sealed key, so the splice is detected."""
    config = trusting(sim_dir)
    path, key_file = host_file
    genuine = host("real", sim_dir, TRUSTED_LABEL, owner_key_file,
                   runtime_measurement(config).hex())
    sock = host("relay", key_file, genuine)
    with keys_for(sock, sim_dir, config) as keys:
        refused_and_unready(start_server, raw_client, ModelSource("tiny", path), keys, config,
                            KeycacheAttestationError, "signature over the keycache's answer")


def test_without_a_keycache_rule_the_runtime_asks_for_no_key(
        host, tiny, owner_key_file, sim_dir, start_server, raw_client):
    config = RuntimeConfig()
    sock = host("real", sim_dir, TRUSTED_LABEL, owner_key_file,
                runtime_measurement(config).hex())
    with keys_for(sock, sim_dir, config) as keys:
        refused_and_unready(start_server, raw_client, ModelSource("tiny", tiny.path), keys,
                            config, ConfigError, "no keycache rule configured")


def test_a_sim_keycache_rule_must_name_its_platform_key():
    with pytest.raises(ConfigError, match="platform_key"):
        from sealedtorch.runtime.config import load_config

        load_config({"keycache": [{"tee": "sim", "measurement": "00" * 48}]})

