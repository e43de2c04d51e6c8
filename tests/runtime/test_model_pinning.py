"""The measured configuration names what is served (issue 10 §3): each served name maps to a
model id, a minimum key version and optionally the sealed file's SHA-256.  A host that swaps
in an older file, a file under a retired key version, another model under the configured
name or a different file gets a typed refusal *before any key is requested* (so nothing is
decrypted), and the runtime is not ready.  Clients can pin the same things
(``--expect-model`` / ``--expect-digest``).

The keycache runs on a real Unix socket and holds every key involved — the runtime's own
check is all that stops each swap; `sealedtorch serve` and `sealedtorch client infer` run as
real processes where it matters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sealedtorch import crypto
from sealedtorch.attest import VerifierConfig
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.attest.sim import PUB_FILE, SimPlatform
from sealedtorch.errors import ConfigError, ModelMismatch
from sealedtorch.format import seal
from sealedtorch.keycache.local import AnswerSigner, EvidenceAppraiser
from sealedtorch.keycache.server import KeycacheServer
from sealedtorch.keycache.service import Keycache
from sealedtorch.keys import ModelKey
from sealedtorch.runtime.architectures import mlp
from sealedtorch.runtime.client import AttestedClient, ModelExpectation, parse_expectations
from sealedtorch.runtime.config import RuntimeConfig
from sealedtorch.runtime.loader import ModelSource
from sealedtorch.runtime.server import SubprocessServer

from .conftest import MLP_ARCH, MLP_KWARGS
from .test_with_keycache import KEYCACHE_MEASUREMENT, Upstream, allow, client_for, trusting


@dataclass
class Owner:
    """The owner's files: tiny-mlp under key versions 1 and 2, a second v2 file (same key,
    other weights), and another model of the same shape."""

    v1: Path
    v2: Path
    v2_other: Path
    other_model: Path
    keys: list[ModelKey]
    module_v2: torch.nn.Module

    def sha(self, path: Path) -> str:
        return crypto.sha256_file(path).hex()


@pytest.fixture(scope="module")
def owner(tmp_path_factory) -> Owner:
    d = tmp_path_factory.mktemp("pinning")
    meta = {"arch": MLP_ARCH, "arch_kwargs": MLP_KWARGS}
    k1, k2 = ModelKey.generate("tiny-mlp", 1), ModelKey.generate("tiny-mlp", 2)
    other = ModelKey.generate("other-mlp")
    modules = []
    for seed, path, key in ((1, "v1", k1), (2, "v2", k2), (3, "v2-other", k2),
                            (4, "other", other)):
        torch.manual_seed(seed)
        m = mlp(**MLP_KWARGS).eval()
        seal(m, d / f"{path}.sealed", key=key, metadata=meta)
        modules.append(m)
    return Owner(d / "v1.sealed", d / "v2.sealed", d / "v2-other.sealed", d / "other.sealed",
                 [k1, k2, other], modules[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pin-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Running:
    keycache: Keycache
    socket: Path


@pytest.fixture
def keycache(short_dir, sim_dir, owner) -> Iterator[Any]:
    """A keycache holding every key of the owner, for runtimes of ``config``."""
    started: list[tuple[Keycache, KeycacheServer]] = []

    def start(config: RuntimeConfig) -> Running:
        platform = SimPlatform.load(sim_dir)
        kc = Keycache(Upstream([(k, allow(config)) for k in owner.keys]),
                      EvidenceAppraiser(VerifierConfig(sim_platform_keys=(platform.public_key,)),
                                        tees=["sim"]), refresh=3600, max_stale=3600)
        kc.refresh_once()
        sock = short_dir / f"kc{len(started)}" / "keycache.sock"
        server = KeycacheServer(kc, sock, signer=AnswerSigner(
            SimAttester(platform, KEYCACHE_MEASUREMENT))).start()
        started.append((kc, server))
        return Running(kc, sock)

    yield start
    for kc, server in started:
        server.stop()
        kc.stop()


def pinned(sim_dir: Path, owner: Owner, **pin: Any) -> RuntimeConfig:
    fields = {"model_id": "tiny-mlp", "min_key_version": 2, **pin}
    return trusting(sim_dir, models={"tiny": fields}, key_retries=1)


def assert_refused_before_any_key(start_server, raw_client, keycache, sim_dir, config,
                                  path: Path, match: str, name: str = "tiny") -> None:
    kc = keycache(config)
    with client_for(kc.socket, sim_dir, config) as keys:
        srv = start_server([ModelSource(name, path)], keys=keys, config=config)
        with pytest.raises(ModelMismatch, match=match):
            srv.wait_ready(60)
        ready = raw_client(srv.url).get("/v2/health/ready")
        assert ready.status_code == 503
        assert "ModelMismatch" in ready.json()["models"][0]["error"]
    status = kc.keycache.status()["local"]
    assert status["released"] == 0 and status["refused"] == 0  # no key was even asked for


def test_the_pinned_file_is_served_and_reported_in_the_attestation(
        keycache, owner, sim_dir, start_server, policy_for):
    config = pinned(sim_dir, owner, sha256=owner.sha(owner.v2))
    kc = keycache(config)
    with client_for(kc.socket, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", owner.v2)], keys=keys, config=config)
        srv.wait_ready(60)
        expect = parse_expectations(["tiny=tiny-mlp@2"], [f"tiny={owner.sha(owner.v2)}"])
        with AttestedClient(srv.url, policy=policy_for(config), expect=expect,
                            sim_roots=[sim_dir / PUB_FILE]) as client:
            result = client.attest()
            entry = result.model("tiny")
            assert entry is not None
            assert (entry["model_id"], entry["key_version"], entry["file_sha256"]) == \
                ("tiny-mlp", 2, owner.sha(owner.v2))
            assert entry["pin"] == {"model_id": "tiny-mlp", "min_key_version": 2,
                                    "sha256": owner.sha(owner.v2), "manifest_keys": None}
            x = torch.randn(2, 4)
            with torch.inference_mode():
                assert torch.equal(client.infer("tiny", x)["output"], owner.module_v2(x))


def test_an_older_file_is_refused_before_any_key_is_requested(
        keycache, owner, sim_dir, start_server, raw_client):
    assert_refused_before_any_key(start_server, raw_client, keycache, sim_dir,
                                  pinned(sim_dir, owner), owner.v1,
                                  "key version 1 of 'tiny-mlp', older than the configured "
                                  "minimum 2")


def test_a_file_under_a_retired_key_version_the_keycache_still_holds_is_refused(
        keycache, owner, sim_dir, start_server, raw_client):
    """The owner retired v1 by raising min_key_version; the keycache still holds v1."""
    config = pinned(sim_dir, owner)
    assert_refused_before_any_key(start_server, raw_client, keycache, sim_dir, config,
                                  owner.v1, "older than the configured minimum")


def test_another_model_under_the_configured_name_is_refused(
        keycache, owner, sim_dir, start_server, raw_client):
    assert_refused_before_any_key(start_server, raw_client, keycache, sim_dir,
                                  pinned(sim_dir, owner, min_key_version=1), owner.other_model,
                                  "the file is model 'other-mlp', but the configuration "
                                  "serves 'tiny-mlp' as 'tiny'")


def test_a_file_with_another_digest_is_refused(keycache, owner, sim_dir, start_server,
                                               raw_client):
    """Same model id, same key version, other weights: only the digest tells them apart."""
    assert_refused_before_any_key(start_server, raw_client, keycache, sim_dir,
                                  pinned(sim_dir, owner, sha256=owner.sha(owner.v2)),
                                  owner.v2_other, "SHA-256 is .* the configuration pins")


def test_a_name_the_configuration_does_not_list_is_refused(keycache, owner, sim_dir,
                                                           start_server, raw_client):
    assert_refused_before_any_key(start_server, raw_client, keycache, sim_dir,
                                  pinned(sim_dir, owner), owner.v2,
                                  "does not list the served name 'extra'", name="extra")


@pytest.mark.slow
def test_sealedtorch_serve_exits_on_an_older_file(keycache, owner, sim_dir, tmp_path):
    config = pinned(sim_dir, owner)
    kc = keycache(config)
    cfg = tmp_path / "runtime.json"
    cfg.write_bytes(config.canonical_bytes())
    srv = SubprocessServer.start(["--model", f"tiny={owner.v1}", "--keycache",
                                  str(kc.socket), "--listen", "127.0.0.1:0", "--tee", "sim",
                                  "--sim-platform", str(sim_dir), "--config", str(cfg)])
    try:
        assert srv.process.wait(120) == 2
    finally:
        srv.stop()
    log = srv.log_text()
    assert "ModelMismatch" in log and "older than the configured minimum 2" in log
    assert kc.keycache.status()["local"]["released"] == 0


def _infer_cli(url: str, tmp_path: Path, sim_dir: Path, config: RuntimeConfig,
               *expect: str) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "policy.json"
    from .conftest import sim_policy

    policy.write_text(json.dumps(sim_policy(config)))
    np.save(tmp_path / "x.npy", np.ones((1, 4), dtype=np.float32))
    return subprocess.run([sys.executable, "-m", "sealedtorch.cli", "client", "infer",
                           "--url", url, "--policy", str(policy), "--model", "tiny",
                           "--input", str(tmp_path / "x.npy"), "--sim-root",
                           str(sim_dir / PUB_FILE), *expect],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_client_infer_pins_model_and_digest(keycache, owner, sim_dir, start_server, tmp_path):
    """Unpinned runtime configuration: the host picked v1; the client's pins catch it."""
    config = trusting(sim_dir)
    kc = keycache(config)
    with client_for(kc.socket, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", owner.v1)], keys=keys, config=config)
        srv.wait_ready(60)
        ok = _infer_cli(srv.url, tmp_path, sim_dir, config, "--expect-model",
                        "tiny=tiny-mlp@1", "--expect-digest", f"tiny={owner.sha(owner.v1)}")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["model"] == "tiny"
        old = _infer_cli(srv.url, tmp_path, sim_dir, config, "--expect-model",
                         "tiny=tiny-mlp@2")
        assert old.returncode == 2
        assert "ModelMismatch" in old.stderr and "older than the expected minimum 2" in \
            old.stderr
        other = _infer_cli(srv.url, tmp_path, sim_dir, config, "--expect-digest",
                           f"tiny={owner.sha(owner.v2)}")
        assert other.returncode == 2 and "not the expected" in other.stderr


def test_a_client_expectation_mismatch_sends_nothing(keycache, owner, sim_dir, start_server,
                                                     policy_for):
    config = trusting(sim_dir)
    kc = keycache(config)
    with client_for(kc.socket, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", owner.other_model)], keys=keys, config=config)
        srv.wait_ready(60)
        with AttestedClient(srv.url, policy=policy_for(config),
                            expect={"tiny": ModelExpectation(model_id="tiny-mlp")},
                            sim_roots=[sim_dir / PUB_FILE]) as client:
            with pytest.raises(ModelMismatch, match="serves model 'other-mlp' as 'tiny'"):
                client.infer("tiny", torch.ones(1, 4))
            assert client.result is None and client.pinned_spki is None  # no connection


@pytest.mark.parametrize("flag, value", [
    ("models", "tiny"), ("models", "tiny=tiny-mlp@x"), ("models", "tiny=bad id"),
    ("digests", "tiny=abc"), ("digests", "tiny")])
def test_malformed_expectations_are_config_errors(flag, value):
    with pytest.raises(ConfigError, match="--expect-"):
        parse_expectations(**{flag: [value]})


# --- owner-signed manifests ----------------------------------------------------------------

def _signed_copy(src: Path, tmp_path: Path, signing_key: Any, name: str = "m.sealed") -> Path:
    from sealedtorch.runtime.manifest import sign_manifest

    dst = tmp_path / name
    shutil.copyfile(src, dst)
    sign_manifest(dst, signing_key)
    return dst


def _owner_key(tmp_path: Path) -> Any:
    from sealedtorch.runtime.manifest import generate_signing_key

    return generate_signing_key(tmp_path / f"owner-{len(list(tmp_path.iterdir()))}.pem")


def test_a_file_the_owner_signed_a_manifest_for_is_served(keycache, owner, sim_dir,
                                                          start_server, tmp_path):
    signer = _owner_key(tmp_path)
    path = _signed_copy(owner.v2, tmp_path, signer)
    config = pinned(sim_dir, owner, manifest_keys=[signer.public_bytes.hex()])
    kc = keycache(config)
    with client_for(kc.socket, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", path)], keys=keys, config=config)
        srv.wait_ready(60)
        assert srv.runtime.slots["tiny"].model.file_sha256 == owner.sha(owner.v2)


def test_a_manifest_signed_by_another_key_is_refused(keycache, owner, sim_dir, start_server,
                                                     raw_client, tmp_path):
    trusted, host = _owner_key(tmp_path), _owner_key(tmp_path)
    path = _signed_copy(owner.v2_other, tmp_path, host)
    assert_refused_before_any_key(
        start_server, raw_client, keycache, sim_dir,
        pinned(sim_dir, owner, manifest_keys=[trusted.public_bytes.hex()]), path,
        "not by an owner key the configuration trusts")


def test_a_manifest_for_another_file_is_refused(keycache, owner, sim_dir, start_server,
                                                raw_client, tmp_path):
    """The owner's genuine manifest of v2, placed next to another v2 file."""
    from sealedtorch.runtime.manifest import manifest_path

    signer = _owner_key(tmp_path)
    genuine = _signed_copy(owner.v2, tmp_path, signer, "genuine.sealed")
    swapped = tmp_path / "swapped.sealed"
    shutil.copyfile(owner.v2_other, swapped)
    shutil.copyfile(manifest_path(genuine), manifest_path(swapped))
    assert_refused_before_any_key(
        start_server, raw_client, keycache, sim_dir,
        pinned(sim_dir, owner, manifest_keys=[signer.public_bytes.hex()]), swapped,
        "the owner's manifest vouches for")


def test_a_modified_manifest_is_refused(keycache, owner, sim_dir, start_server, raw_client,
                                        tmp_path):
    """The host edits the owner's manifest (here: the key version it vouches for)."""
    from sealedtorch.runtime.manifest import manifest_path

    signer = _owner_key(tmp_path)
    path = _signed_copy(owner.v2_other, tmp_path, signer)
    doc = json.loads(manifest_path(path).read_text())
    doc["key_version"] = 3
    manifest_path(path).write_text(json.dumps(doc))
    assert_refused_before_any_key(
        start_server, raw_client, keycache, sim_dir,
        pinned(sim_dir, owner, manifest_keys=[signer.public_bytes.hex()]), path,
        "signature does not verify")


def test_a_missing_manifest_is_a_format_error_before_any_key(keycache, owner, sim_dir,
                                                             start_server, tmp_path):
    from sealedtorch.errors import FormatError

    signer = _owner_key(tmp_path)
    config = pinned(sim_dir, owner, manifest_keys=[signer.public_bytes.hex()])
    kc = keycache(config)
    with client_for(kc.socket, sim_dir, config) as keys:
        srv = start_server([ModelSource("tiny", owner.v2)], keys=keys, config=config)
        with pytest.raises(FormatError, match="no manifest"):
            srv.wait_ready(60)
    assert kc.keycache.status()["local"]["released"] == 0


def test_manifest_cli_keygen_and_sign(owner, tmp_path):
    from sealedtorch.runtime.manifest import manifest_path, read_manifest

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sealedtorch.cli", "manifest", *args],
                              capture_output=True, text=True, timeout=120, check=False)

    key_file = tmp_path / "owner.pem"
    made = cli("keygen", "--out", str(key_file))
    assert made.returncode == 0, made.stderr
    assert oct(key_file.stat().st_mode & 0o777) == oct(0o600)
    public = made.stdout.strip()
    sealed = tmp_path / "m.sealed"
    shutil.copyfile(owner.v2, sealed)
    signed = cli("sign", str(sealed), "--signing-key", str(key_file))
    assert signed.returncode == 0, signed.stderr
    assert owner.sha(owner.v2) in signed.stdout
    manifest = read_manifest(manifest_path(sealed))
    assert (manifest.model_id, manifest.key_version, manifest.signer.hex()) == \
        ("tiny-mlp", 2, public)
    again = cli("sign", str(sealed), "--signing-key", str(key_file))
    assert again.returncode == 2 and "refusing to overwrite the manifest" in again.stderr
    assert cli("keygen", "--out", str(key_file)).returncode == 2  # never overwritten
