"""The owner's CLI: seal, inspect, unseal, with clean failures and no partial outputs."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from sealedtorch.cli import main


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    sd = {"layer.weight": torch.randn(16, 8), "layer.bias": torch.randn(16),
          "steps": torch.tensor(5)}
    torch.save(sd, tmp_path / "model.pt")
    return sd


def _seal(tmp_path, *extra: str) -> int:
    return main(["seal", str(tmp_path / "model.pt"), "-o", str(tmp_path / "m.sealed"),
                 "--model-id", "demo", "--key-out", str(tmp_path / "m.key"), "-q", *extra])


def test_seal_writes_sealed_file_and_0600_key(tmp_path, weights, capsys):
    assert _seal(tmp_path) == 0
    assert (tmp_path / "m.sealed").is_file()
    assert stat.S_IMODE((tmp_path / "m.key").stat().st_mode) == 0o600
    assert "3 tensors" in capsys.readouterr().out


def test_seal_refuses_to_overwrite_an_existing_key_file(tmp_path, weights, capsys):
    (tmp_path / "m.key").write_text("precious")
    assert _seal(tmp_path) == 2
    assert (tmp_path / "m.key").read_text() == "precious"
    assert not (tmp_path / "m.sealed").exists()
    assert "refusing to overwrite" in capsys.readouterr().err


def test_seal_with_existing_key_for_another_model_is_refused(tmp_path, weights, capsys):
    assert _seal(tmp_path) == 0
    rc = main(["seal", str(tmp_path / "model.pt"), "-o", str(tmp_path / "n.sealed"),
               "--model-id", "other", "--key", str(tmp_path / "m.key"), "-q"])
    assert rc == 2 and "not 'other'" in capsys.readouterr().err


def test_inspect_without_key_shows_only_the_preamble(tmp_path, weights, capsys):
    _seal(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m.sealed"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preamble"]["model_id"] == "demo" and "tensors" not in info


def test_inspect_with_key_lists_tensors_and_metadata(tmp_path, weights, capsys):
    _seal(tmp_path, "--metadata", "arch=mlp", "--metadata-json", 'kw={"n": 3}')
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m.sealed"), "--key", str(tmp_path / "m.key"),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in info["tensors"]} == set(weights)
    assert info["metadata"] == {"arch": "mlp", "kw": {"n": 3}}


def test_unseal_restores_a_bit_identical_safetensors_file(tmp_path, weights):
    _seal(tmp_path)
    assert main(["unseal", str(tmp_path / "m.sealed"), "--key", str(tmp_path / "m.key"),
                 "-o", str(tmp_path / "out.safetensors"), "-q"]) == 0
    out = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(out[k], weights[k]) for k in weights)


def test_unseal_with_wrong_key_writes_nothing(tmp_path, weights, capsys):
    _seal(tmp_path)
    main(["seal", str(tmp_path / "model.pt"), "-o", str(tmp_path / "x.sealed"),
          "--model-id", "demo", "--key-out", str(tmp_path / "other.key"), "-q"])
    rc = main(["unseal", str(tmp_path / "m.sealed"), "--key", str(tmp_path / "other.key"),
               "-o", str(tmp_path / "out.safetensors")])
    assert rc == 2 and "IntegrityError" in capsys.readouterr().err
    assert list(tmp_path.glob("*.safetensors*")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_unseal_of_tampered_file_writes_nothing(tmp_path, weights):
    _seal(tmp_path)
    raw = bytearray((tmp_path / "m.sealed").read_bytes())
    raw[-5] ^= 0x40
    (tmp_path / "m.sealed").write_bytes(raw)
    rc = main(["unseal", str(tmp_path / "m.sealed"), "--key", str(tmp_path / "m.key"),
               "-o", str(tmp_path / "out.safetensors")])
    assert rc == 2 and not (tmp_path / "out.safetensors").exists()


def test_safetensors_input_round_trips_with_tied_weights(tmp_path):
    emb = torch.randn(4, 4)
    save_file({"emb": emb}, tmp_path / "in.safetensors",
              metadata={"sealedtorch.aliases": json.dumps({"head": "emb"}),
                        "sealedtorch.metadata": "{}"})
    assert main(["seal", str(tmp_path / "in.safetensors"), "-o", str(tmp_path / "m.sealed"),
                 "--model-id", "t", "--key-out", str(tmp_path / "k"), "-q"]) == 0
    import sealedtorch

    out = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=tmp_path / "k")
    assert out["head"] is out["emb"] and torch.equal(out["emb"], emb)


def test_pickled_arbitrary_objects_are_refused_not_executed(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("PWNED",))

    torch.save({"w": torch.ones(1), "evil": Evil()}, tmp_path / "model.pt")
    rc = _seal(tmp_path)
    captured = capsys.readouterr()
    assert rc == 2 and "PWNED" not in captured.out and "never unpickles" in captured.err
    assert not (tmp_path / "m.key").exists()


def test_input_that_is_not_a_state_dict_is_refused(tmp_path, capsys):
    torch.save([torch.ones(1)], tmp_path / "model.pt")
    assert _seal(tmp_path) == 2
    assert "expected a state_dict" in capsys.readouterr().err


def test_garbage_input_file_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"garbage" * 10)
    assert _seal(tmp_path) == 2
    assert "FormatError" in capsys.readouterr().err


def test_inspect_of_a_non_sealed_file_is_a_format_error(tmp_path, capsys):
    (tmp_path / "x.sealed").write_bytes(b"hello world, not sealed")
    assert main(["inspect", str(tmp_path / "x.sealed")]) == 2
    assert "FormatError" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("seal", "unseal", "inspect", "attest", "sim"))
