"""The public surface: a few functions, one result type, all visible to ``dir()``."""

from __future__ import annotations

import subprocess
import sys

import torch

import sealedtorch


def test_dir_lists_the_lazily_imported_api():
    names = dir(sealedtorch)
    for name in ("seal", "load_state_dict", "load_model", "load_pretrained", "unseal",
                 "read_preamble", "SealResult", "ModelKey", "write_key_file"):
        assert name in names


def test_every_name_in_all_resolves():
    for name in sealedtorch.__all__:
        assert getattr(sealedtorch, name) is not None


def test_dir_does_not_import_torch():
    code = "import sys, sealedtorch; dir(sealedtorch); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


def test_seal_returns_the_exported_result_with_the_generated_key(tmp_path):
    result = sealedtorch.seal({"w": torch.ones(3)}, tmp_path / "m.sealed", model_id="m",
                              progress=False)
    assert isinstance(result, sealedtorch.SealResult)
    assert result.tensor_count == 1 and result.key.model_id == "m"
    assert result.file_size == (tmp_path / "m.sealed").stat().st_size
    assert result.key.secret.hex() not in repr(result) and str(result.key.secret) not in repr(
        result)
    loaded = sealedtorch.load_state_dict(result.path, key=result.key)
    assert torch.equal(loaded["w"], torch.ones(3))
