"""Loading: keys, retries, tampering, the allow-list, architectures, and what readiness says."""

from __future__ import annotations

import pytest
import torch
import torchvision

from sealedtorch.errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    KeyUnavailable,
    UnsafeModelError,
)
from sealedtorch.format import seal
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.architectures import exported_program_state
from sealedtorch.runtime.config import RuntimeConfig, load_config, runtime_measurement
from sealedtorch.runtime.loader import ModelSource, PlainSource, load_sealed

MLP = "sealedtorch.runtime.architectures:mlp"


class Flaky:
    """A key source that is 'down' (HTTP 503-style) for the first ``failures`` calls."""

    class Down(KeyUnavailable):
        problem_type = "keycache-unavailable"
        http_status = 503
        transient = True  # errors.py: retryability is declared on the class

    def __init__(self, key: ModelKey, failures: int) -> None:
        self.key, self.failures, self.calls = key, failures, 0

    def get_key(self, model_id: str, version: int | None = None) -> ModelKey:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.Down("cannot reach the keycache at /run/x.sock: connection refused")
        return self.key


def fast(**kw) -> RuntimeConfig:
    return RuntimeConfig(key_retry_delay_s=0.01, **kw)


def test_load_decrypts_into_the_model_and_evals(tiny):
    loaded = load_sealed(ModelSource("tiny", tiny.path), tiny.keys)
    assert not loaded.module.training
    assert all(not p.requires_grad for p in loaded.module.parameters())
    x = torch.randn(3, 4)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), tiny.module(x))
    assert (loaded.model_id, loaded.key_version, loaded.version) == ("tiny-mlp", 1, "1")


def test_keycache_down_is_retried_then_succeeds(tiny):
    keys = Flaky(tiny.key, failures=2)
    loaded = load_sealed(ModelSource("tiny", tiny.path), keys, fast(key_retries=3))
    assert keys.calls == 3 and loaded.model_id == "tiny-mlp"


def test_keycache_down_gives_a_clear_error_after_the_retries(tiny):
    keys = Flaky(tiny.key, failures=100)
    with pytest.raises(Flaky.Down, match=r"after 4 attempts .* connection refused"):
        load_sealed(ModelSource("tiny", tiny.path), keys, fast(key_retries=4))
    assert keys.calls == 4


def test_a_key_the_source_does_not_hold_fails_at_once(tiny):
    keys = StaticKeys(ModelKey.generate("someone-else"))
    with pytest.raises(KeyUnavailable, match="no key for model 'tiny-mlp'"):
        load_sealed(ModelSource("tiny", tiny.path), keys, fast())


def test_unheld_key_leaves_the_server_unready_and_says_why(start_server, tiny, raw_client):
    keys = StaticKeys(ModelKey.generate("someone-else"))
    srv = start_server([ModelSource("tiny", tiny.path)], keys=keys, config=fast())
    c = raw_client(srv.url)
    assert c.get("/v2/health/live").status_code == 200
    r = c.get("/v2/health/ready")
    assert r.status_code == 503
    (model,) = r.json()["models"]
    assert model["state"] == "failed" and "KeyUnavailable" in model["error"]
    assert "tiny-mlp" in model["error"]
    assert c.get("/v2/models/tiny/ready").status_code == 503
    r = c.post("/v2/models/tiny/infer", json={})
    assert r.status_code == 503 and "not ready (failed: KeyUnavailable" in r.json()["error"]
    with pytest.raises(KeyUnavailable):
        srv.wait_ready(5)


def test_tampered_file_refuses_to_load_with_integrity_error(tiny, tmp_path, start_server,
                                                            raw_client):
    data = bytearray(tiny.path.read_bytes())
    data[-40] ^= 0x01  # a byte of the last data chunk
    bad = tmp_path / "tampered.sealed"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="file modified"):
        load_sealed(ModelSource("bad", bad), tiny.keys)
    srv = start_server([ModelSource("bad", bad)], keys=tiny.keys)
    r = raw_client(srv.url).get("/v2/health/ready")
    assert r.status_code == 503 and "IntegrityError" in r.json()["models"][0]["error"]


def test_architecture_not_on_the_allow_list_is_never_imported(tiny, tmp_path):
    key = ModelKey.generate("evil")
    path = tmp_path / "evil.sealed"
    seal({"w": torch.zeros(1)}, path, key=key, metadata={"arch": "os:system"})
    with pytest.raises(ConfigError, match="'os:system' is not on this runtime's allow-list"):
        load_sealed(ModelSource("evil", path), StaticKeys(key))
    only_resnet = RuntimeConfig(architectures=("torchvision.models:resnet18",))
    with pytest.raises(ConfigError, match="not on this runtime's allow-list"):
        load_sealed(ModelSource("tiny", tiny.path), tiny.keys, only_resnet)


def test_arch_override_and_missing_arch(tmp_path):
    key = ModelKey.generate("noarch")
    path = tmp_path / "noarch.sealed"
    module = torchvision.models.resnet18(num_classes=10).eval()
    seal(module, path, key=key, metadata={"arch_kwargs": {"num_classes": 10}})
    with pytest.raises(ConfigError, match="names no architecture"):
        load_sealed(ModelSource("r", path), StaticKeys(key))
    loaded = load_sealed(ModelSource("r", path, "torchvision.models:resnet18"), StaticKeys(key))
    assert loaded.outputs[0].shape == (-1, 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), module(x))
    with pytest.raises(ConfigError, match=r"do not fit torchvision\.models:resnet34"):
        load_sealed(ModelSource("r", path, "torchvision.models:resnet34"), StaticKeys(key))


def test_downloading_kwargs_are_refused(tmp_path):
    key = ModelKey.generate("dl")
    path = tmp_path / "dl.sealed"
    seal({"w": torch.zeros(1)}, path, key=key, metadata={
        "arch": "torchvision.models:resnet18", "arch_kwargs": {"weights": "DEFAULT"}})
    with pytest.raises(ConfigError, match="would fetch pretrained weights"):
        load_sealed(ModelSource("dl", path), StaticKeys(key))


def test_bad_signature_metadata_is_a_format_error(tmp_path):
    key = ModelKey.generate("sig")
    path = tmp_path / "sig.sealed"
    seal({"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3)}, path, key=key, metadata={
        "arch": MLP, "arch_kwargs": {"in_features": 4, "out_features": 3},
        "inputs": [{"name": "x", "datatype": "FLOAT", "shape": [-1, 4]}]})
    with pytest.raises(FormatError, match="bad inputs/outputs"):
        load_sealed(ModelSource("sig", path), StaticKeys(key))


def test_torch_export_program_sealed_whole_is_refused(tmp_path):
    """Issue 10 §1: torch.export.load unpickles archive entries, so the runtime refuses
    every torch.export program (tests/runtime/test_model_code.py has the attack)."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * scale

    torch.manual_seed(1)
    net = Net().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.randn(2, 4), torch.randn(2, 1)),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    state, metadata = exported_program_state(program)
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                                  {"name": "scale", "datatype": "FP32", "shape": [-1, 1]}]
    key = ModelKey.generate("exported")
    path = tmp_path / "exported.sealed"
    seal(state, path, key=key, metadata=metadata)
    with pytest.raises(UnsafeModelError, match="refuses every torch"):
        load_sealed(ModelSource("exp", path), StaticKeys(key))


def test_configuration_is_measured(tmp_path):
    base = RuntimeConfig()
    assert load_config(None) == base
    assert runtime_measurement(base) != runtime_measurement(base.with_overrides(device="auto"))
    narrower = RuntimeConfig(architectures=("torchvision.models:resnet50",))
    assert runtime_measurement(base) != runtime_measurement(narrower)
    f = tmp_path / "runtime.yaml"
    f.write_text("max_batch_size: 8\narchitectures: ['torchvision.models:resnet50']\n")
    cfg = load_config(f)
    assert cfg.max_batch_size == 8
    canonical = tmp_path / "canonical.json"
    canonical.write_bytes(cfg.canonical_bytes())
    assert load_config(canonical).canonical_bytes() == cfg.canonical_bytes()
    f.write_text("max_batch_sise: 8\n")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        load_config(f)
    with pytest.raises(ConfigError, match="not 'module:callable'"):
        load_config({"architectures": ["os.system"]})


def test_plaintext_source_uses_the_same_build_path(tmp_path, tiny):
    path = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file(tiny.module.state_dict(), str(path))
    loaded = PlainSource("plain", path, metadata={
        "arch": MLP, "arch_kwargs": {"in_features": 4, "out_features": 3, "hidden": [8]}}
    ).load(None, RuntimeConfig())
    x = torch.randn(2, 4)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), tiny.module(x))
