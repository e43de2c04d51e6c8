"""The documented recipe for serving one's own nn.Module (docs/runtime.md, "Custom models")."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch

import sealedtorch
from sealedtorch.attest import measure
from sealedtorch.errors import ConfigError
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.loader import ModelSource, load_sealed

ARCH = "acme_models.vision:TinyNet"
MODULE = textwrap.dedent('''
    import torch


    class TinyNet(torch.nn.Module):
        """The owner's own architecture: two inputs, two outputs."""

        def __init__(self, channels: int = 3, classes: int = 4) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, classes)

        def forward(self, image: torch.Tensor, scale: torch.Tensor):
            features = self.conv(image).mean(dim=(2, 3)) * scale
            return {"logits": self.head(features), "features": features}
''')
SIGNATURE = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 8, 8]},
               {"name": "scale", "datatype": "FP32", "shape": [-1, 1]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]},
                {"name": "features", "datatype": "FP32", "shape": [-1, 8]}],
}


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """The owner's code, installed where the runtime's Python finds it (here: sys.path)."""
    root = tmp_path / "site"
    (root / "acme_models").mkdir(parents=True)
    (root / "acme_models" / "__init__.py").write_text("")
    (root / "acme_models" / "vision.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(root))
    measure.clear_cache()
    yield root
    for name in [m for m in sys.modules if m.startswith("acme_models")]:
        del sys.modules[name]
    measure.clear_cache()


def _sealed(tmp_path: Path) -> tuple[Path, ModelKey, torch.nn.Module]:
    from acme_models.vision import TinyNet

    torch.manual_seed(0)
    module = TinyNet().eval()
    key = ModelKey.generate("acme-tiny")
    path = tmp_path / "tiny.sealed"
    sealedtorch.seal(module, path, key=key, progress=False,
                     metadata={"arch": ARCH, "arch_kwargs": {"classes": 4}, **SIGNATURE})
    return path, key, module


def test_a_custom_module_allow_listed_in_the_configuration_is_served(package, tmp_path,
                                                                     start_server):
    path, key, module = _sealed(tmp_path)
    config = RuntimeConfig(architectures=(ARCH,))
    srv = start_server([ModelSource("tiny", path)], keys=StaticKeys(key), config=config)
    srv.wait_ready(60)
    image, scale = torch.randn(2, 3, 8, 8), torch.full((2, 1), 0.5)
    body = {"inputs": [
        {"name": "image", "datatype": "FP32", "shape": [2, 3, 8, 8],
         "data": image.reshape(-1).tolist()},
        {"name": "scale", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 0.5]}]}
    with httpx.Client(base_url=srv.url, verify=False, timeout=30) as c:
        meta = c.get("/v2/models/tiny").json()
        answer = c.post("/v2/models/tiny/infer", json=body).json()
    assert meta["inputs"] == SIGNATURE["inputs"] and meta["outputs"] == SIGNATURE["outputs"]
    with torch.inference_mode():
        want = module(image, scale)
    got = {o["name"]: torch.tensor(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    assert torch.equal(got["logits"], want["logits"])
    assert torch.equal(got["features"], want["features"])


def test_the_same_module_is_refused_when_the_configuration_does_not_list_it(package,
                                                                            tmp_path):
    path, key, _ = _sealed(tmp_path)
    with pytest.raises(ConfigError, match="not on this runtime's allow-list"):
        load_sealed(ModelSource("tiny", path), StaticKeys(key), RuntimeConfig())


def test_editing_the_allowed_module_changes_the_runtime_measurement(package):
    config = RuntimeConfig(architectures=(ARCH,))
    before = runtime_measurement(config)
    (package / "acme_models" / "vision.py").write_text(MODULE + "\n# a backdoor would go here\n")
    measure.clear_cache()
    assert runtime_measurement(config) != before


def test_a_custom_module_without_a_declared_signature_is_refused(package, tmp_path):
    from acme_models.vision import TinyNet

    key = ModelKey.generate("acme-nosig")
    path = tmp_path / "nosig.sealed"
    sealedtorch.seal(TinyNet(), path, key=key, progress=False, metadata={"arch": ARCH})
    with pytest.raises(ConfigError, match="has no built-in signature"):
        load_sealed(ModelSource("x", path), StaticKeys(key),
                    RuntimeConfig(architectures=(ARCH,)))
