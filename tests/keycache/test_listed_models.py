"""A keycache holds only the models its own measured configuration lists (issue 10 §3): an
owner whose policy names the public runtime and keycache measurements still cannot route its
key into a keycache (and so a runtime) deployed for other models.  The keycache serves on a
real Unix socket; its upstream releases every key, as a keyserver would for such a policy."""

from __future__ import annotations

import argparse
import logging

import pytest

from sealedtorch import crypto
from sealedtorch.attest import measure
from sealedtorch.cli import keycache as cli_keycache
from sealedtorch.errors import ConfigError, KeyUnavailable
from sealedtorch.keycache.config import KeycacheConfig, ListedModels, load_keycache_config
from sealedtorch.keys import ModelKey

from .conftest import RUNTIME_MEASUREMENT, sim_policy


def test_a_key_for_a_model_the_configuration_does_not_list_is_dropped_and_never_served(
        start_keycache, runtime, caplog):
    mine, foreign = ModelKey.generate("owner-b/model"), ModelKey.generate("owner-a/model")
    kc = start_keycache()
    listed = ListedModels(kc.upstream, load_keycache_config(b"models: [owner-b/model]\n"))
    kc.keycache.upstream = listed
    kc.upstream.answer = [(mine, sim_policy()), (foreign, sim_policy(RUNTIME_MEASUREMENT))]
    with caplog.at_level(logging.WARNING, logger="sealedtorch.keycache"):
        assert kc.keycache.refresh_once()
    client = kc.client(runtime)
    assert client.get_key("owner-b/model") == mine
    with pytest.raises(KeyUnavailable, match="owner-a/model"):
        client.get_key("owner-a/model")
    held = [k["model_id"] for k in client.status()["keys"]]
    assert held == ["owner-b/model"]
    assert any("does not list: dropped, never served" in r.getMessage() for r in caplog.records)
    assert foreign.secret.hex() not in caplog.text


def test_without_a_models_list_every_released_key_is_held():
    config = load_keycache_config({})
    assert config.models is None and config.holds("anything")


@pytest.mark.parametrize("text, match", [
    (b"models: [\"bad id\"]\n", "invalid model id"),
    (b"model: [a]\n", "Extra inputs"),
    (b"- a\n", "expected a mapping"),
    (b"models: [a\n", "not YAML/JSON")])
def test_a_malformed_keycache_configuration_is_a_config_error(text, match):
    with pytest.raises(ConfigError, match=match):
        load_keycache_config(text)


def test_the_keycache_measures_its_configuration_file(tmp_path, platform):
    """`keycache run --config FILE` attests with measurement(FILE's bytes): the value
    `sealedtorch attest measure --raw-config FILE` prints and a holders rule pins."""
    cfg = tmp_path / "kc.yaml"
    cfg.write_bytes(b"models: [owner-b/model]\n")
    ca = tmp_path / "ca.pem"  # the keyserver is TLS-only: its CA (nothing connects here)
    ca.write_bytes(crypto.generate_tls_ca("test keyserver ca", days=1)[0])
    args = argparse.Namespace(
        keyserver="https://127.0.0.1:9", ca=ca, tee="sim", sim_platform=platform.directory,
        runtime_config=None, config=cfg, trust_sim_root=[], pccs_url=None, kds_url=None,
        cache_dir=None, local_proof="evidence", allow_uid=[], allow_gid=[], refresh=60.0,
        max_stale=3600.0, nonce_ttl=30.0, log_key=None)
    keycache, signer = cli_keycache.build_with_signer(args)
    try:
        assert signer.attester.measurement == measure.measurement(cfg.read_bytes())
        assert isinstance(keycache.upstream, ListedModels)
        assert keycache.upstream.config == KeycacheConfig(models=("owner-b/model",))
    finally:
        keycache.stop()
    args.runtime_config = cfg
    with pytest.raises(ConfigError, match="not both"):
        cli_keycache.build_with_signer(args)
