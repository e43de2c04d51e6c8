"""What `KeycacheClient()` uses when given nothing: the documented in-TEE snippet relies on
it (README; tests/test_docs.py runs that snippet against real processes)."""

from __future__ import annotations

import json

from sealedtorch.keycache import KeycacheClient
from sealedtorch.keycache.client import default_runtime_config
from sealedtorch.keycache.protocol import DEFAULT_SOCKET
from sealedtorch.runtime.config import RuntimeConfig


def test_socket_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEALEDTORCH_KEYCACHE_SOCKET", str(tmp_path / "kc.sock"))
    with KeycacheClient() as client:
        assert client.socket_path == str(tmp_path / "kc.sock")


def test_socket_defaults_to_the_standard_path(monkeypatch):
    monkeypatch.delenv("SEALEDTORCH_KEYCACHE_SOCKET", raising=False)
    with KeycacheClient() as client:
        assert client.socket_path == DEFAULT_SOCKET


def test_measured_configuration_defaults_to_the_runtimes(monkeypatch):
    monkeypatch.delenv("SEALEDTORCH_RUNTIME_CONFIG", raising=False)
    assert default_runtime_config() == RuntimeConfig().canonical_bytes()


def test_measured_configuration_comes_from_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({"max_batch_size": 8}))
    monkeypatch.setenv("SEALEDTORCH_RUNTIME_CONFIG", str(path))
    assert default_runtime_config() == RuntimeConfig(max_batch_size=8).canonical_bytes()
    assert default_runtime_config() != RuntimeConfig().canonical_bytes()


def test_attester_measures_the_default_configuration(monkeypatch, tmp_path):
    from sealedtorch.attest.measure import measurement
    from sealedtorch.attest.sim import init_platform

    init_platform(tmp_path / "sim")
    monkeypatch.setenv("SEALEDTORCH_SIM_PLATFORM", str(tmp_path / "sim"))
    monkeypatch.delenv("SEALEDTORCH_RUNTIME_CONFIG", raising=False)
    with KeycacheClient(tmp_path / "none.sock") as client:
        assert client.attester.measurement == measurement(RuntimeConfig().canonical_bytes())
