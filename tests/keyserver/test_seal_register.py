"""`sealedtorch seal --register`: seal and register the key in one step."""

from __future__ import annotations

import json

import torch

from sealedtorch.cli import main
from sealedtorch.keys import read_key_file


def _args(ks, tmp_path, model_id: str, *extra: str) -> list[str]:
    torch.save({"w": torch.randn(4, 4)}, tmp_path / "m.pt")
    return ["seal", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.sealed"),
            "--model-id", model_id, "--key-out", str(tmp_path / "m.key"), "-q",
            "--register", ks.url, "--ca", str(ks.ca), *extra]


def test_seal_register_makes_the_key_releasable_to_an_attested_runtime(ks, tmp_path, capsys):
    (tmp_path / "policy.json").write_text(json.dumps(ks.policy()))
    rc = main(_args(ks, tmp_path, "sealreg-ok", "--token-file",
                    str(ks.init.admin_token_file), "--policy",
                    str(tmp_path / "policy.json")))
    assert rc == 0, capsys.readouterr().err
    assert "registered model 'sealreg-ok' version 1" in capsys.readouterr().out
    released = ks.client().fetch("sealreg-ok")
    assert released.model_key == read_key_file(tmp_path / "m.key")


def test_seal_register_with_an_invalid_policy_does_no_work(ks, tmp_path, capsys):
    (tmp_path / "policy.yaml").write_text("allow: []\n")
    rc = main(_args(ks, tmp_path, "sealreg-bad", "--token-file",
                    str(ks.init.admin_token_file), "--policy",
                    str(tmp_path / "policy.yaml")))
    assert rc == 2 and "PolicyError" in capsys.readouterr().err
    assert not (tmp_path / "m.sealed").exists() and not (tmp_path / "m.key").exists()


def test_seal_register_without_token_file_is_a_config_error(ks, tmp_path, capsys):
    assert main(_args(ks, tmp_path, "sealreg-none")) == 2
    assert "--token-file" in capsys.readouterr().err
