"""Migrating checkpoints encrypted by sgx-pytorch: exact plaintext back, every bad buffer named."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import torch

import sealedtorch
from sealedtorch.cli import main
from sealedtorch.errors import ConfigError, FormatError, IntegrityError
from sealedtorch.format.importers import import_sgx_pytorch

KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")


@pytest.fixture
def encrypted(sgx_pytorch_fixture: Path) -> dict[str, torch.Tensor]:
    return torch.load(sgx_pytorch_fixture / "encrypted.pt", weights_only=True)


@pytest.fixture
def plain(sgx_pytorch_fixture: Path) -> dict[str, torch.Tensor]:
    return torch.load(sgx_pytorch_fixture / "plain_state_dict.pt", weights_only=True)


def _edited(tmp_path: Path, state: dict[str, torch.Tensor], name: str, edit) -> Path:
    """Save a copy of the checkpoint whose buffer ``name`` went through ``edit(bytes)``."""
    state = dict(state)
    raw = bytearray(state[name].numpy().astype("<i4").tobytes())
    raw = edit(raw)
    raw += bytes(-len(raw) % 4)
    state[name] = torch.frombuffer(bytearray(raw), dtype=torch.int32).clone()
    out = tmp_path / "edited.pt"
    torch.save(state, out)
    return out


def _assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert got[k].numpy().tobytes() == v.numpy().tobytes(), k


def test_fixture_converts_to_tensors_bit_identical_to_its_plaintext(sgx_pytorch_fixture, plain):
    result = import_sgx_pytorch(sgx_pytorch_fixture / "encrypted.pt", KEY)
    _assert_bit_identical(result.state_dict, plain)
    assert result.source_model_id == (7).to_bytes(4, "little")
    assert result.dropped_zero_biases == ("0.bias",)
    assert result.restored_counters == ("1.num_batches_tracked",)


def test_keep_zero_conv_bias_keeps_the_added_bias(sgx_pytorch_fixture):
    result = import_sgx_pytorch(sgx_pytorch_fixture / "encrypted.pt", KEY,
                                keep_zero_conv_bias=True)
    assert not result.state_dict["0.bias"].any()
    assert result.dropped_zero_biases == ()


def test_cli_import_seals_under_a_fresh_key_and_loads_back_bit_identical(
        sgx_pytorch_fixture, plain, tmp_path, capsys):
    out, key = tmp_path / "m.sealed", tmp_path / "m.key"
    assert main(["import", "sgx-pytorch", str(sgx_pytorch_fixture / "encrypted.pt"),
                 "--key", KEY.hex(), "--model-id", "legacy-cnn", "-o", str(out),
                 "--key-out", str(key), "-q"]) == 0
    assert "sgx-pytorch model 07000000" in capsys.readouterr().out
    assert sealedtorch.read_preamble(out).model_id == "legacy-cnn"
    _assert_bit_identical(sealedtorch.load_state_dict(out, key=key), plain)
    assert sealedtorch.read_key_file(key).secret != KEY + KEY  # a fresh 256-bit key


def test_imported_model_runs_like_the_plaintext_model(sgx_pytorch_fixture, plain):
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                   torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(128, 10)).eval()

    ours, theirs = net(), net()
    ours.load_state_dict(import_sgx_pytorch(sgx_pytorch_fixture / "encrypted.pt",
                                            KEY).state_dict)
    theirs.load_state_dict(plain)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours(x), theirs(x))


def test_wrong_key_is_an_integrity_error_naming_the_tensor(sgx_pytorch_fixture):
    with pytest.raises(IntegrityError, match=r"0\.encrypted_bias: authentication failed"):
        import_sgx_pytorch(sgx_pytorch_fixture / "encrypted.pt", bytes(16))


def test_flipped_ciphertext_byte_is_an_integrity_error_naming_the_tensor(tmp_path, encrypted):
    def flip(raw: bytearray) -> bytearray:
        raw[-7] ^= 0x01
        return raw

    path = _edited(tmp_path, encrypted, "4.encrypted_weight", flip)
    with pytest.raises(IntegrityError, match=r"4\.encrypted_weight: authentication failed"):
        import_sgx_pytorch(path, KEY)


def test_flipped_iv_byte_is_an_integrity_error(tmp_path, encrypted):
    def flip(raw: bytearray) -> bytearray:
        raw[4 + 4 * 4 + 100] ^= 0x80  # first IV byte of a 4-D buffer
        return raw

    path = _edited(tmp_path, encrypted, "0.encrypted_weight", flip)
    with pytest.raises(IntegrityError, match=r"0\.encrypted_weight"):
        import_sgx_pytorch(path, KEY)


def test_truncated_buffer_is_a_format_error_naming_the_tensor(tmp_path, encrypted):
    path = _edited(tmp_path, encrypted, "4.encrypted_bias", lambda raw: raw[:-8])
    with pytest.raises(FormatError, match=r"4\.encrypted_bias: header says \(10,\)"):
        import_sgx_pytorch(path, KEY)


def test_buffer_shorter_than_its_header_is_a_format_error(tmp_path, encrypted):
    path = _edited(tmp_path, encrypted, "1.encrypted_var", lambda raw: raw[:40])
    with pytest.raises(FormatError, match=r"1\.encrypted_var: truncated buffer"):
        import_sgx_pytorch(path, KEY)


def test_header_that_disagrees_with_the_buffer_length_is_a_format_error(tmp_path, encrypted):
    def grow(raw: bytearray) -> bytearray:
        struct.pack_into("<I", raw, 4, 9)  # says 9 elements, holds 8
        return raw

    path = _edited(tmp_path, encrypted, "1.encrypted_mean", grow)
    with pytest.raises(FormatError, match=r"1\.encrypted_mean: header says \(9,\)"):
        import_sgx_pytorch(path, KEY)


def test_header_shape_that_disagrees_with_the_module_is_a_format_error(tmp_path, encrypted):
    def reshape(raw: bytearray) -> bytearray:
        struct.pack_into("<II", raw, 4, 20, 64)  # same element count, other shape
        return raw

    path = _edited(tmp_path, encrypted, "4.encrypted_weight", reshape)
    with pytest.raises(FormatError, match=r"4\.encrypted_weight: header shape \(20, 64\) "
                                          r"disagrees with 4\.weight \(10, 128\)"):
        import_sgx_pytorch(path, KEY)


def test_unknown_dtype_code_is_a_format_error(tmp_path, encrypted):
    def dtype(raw: bytearray) -> bytearray:
        struct.pack_into("<I", raw, 8, 7)
        return raw

    path = _edited(tmp_path, encrypted, "4.encrypted_bias", dtype)
    with pytest.raises(FormatError, match="unknown dtype code 7"):
        import_sgx_pytorch(path, KEY)


def test_buffers_of_different_models_are_refused(tmp_path, encrypted):
    def other_model(raw: bytearray) -> bytearray:
        raw[8 + 4:8 + 8] = (8).to_bytes(4, "little")  # 1-D buffer: model id at 4+4+4
        return raw

    path = _edited(tmp_path, encrypted, "4.encrypted_bias", other_model)
    with pytest.raises(FormatError, match="2 different model ids"):
        import_sgx_pytorch(path, KEY)


def test_expected_source_model_id_is_enforced(sgx_pytorch_fixture):
    with pytest.raises(FormatError, match="model id 07000000, not 08000000"):
        import_sgx_pytorch(sgx_pytorch_fixture / "encrypted.pt", KEY,
                           expect_model_id=bytes.fromhex("08000000"))


def test_modified_plaintext_batchnorm_statistics_are_refused(tmp_path, encrypted):
    state = dict(encrypted)
    state["1.running_mean"] = state["1.running_mean"] + 1
    path = tmp_path / "stats.pt"
    torch.save(state, path)
    with pytest.raises(IntegrityError, match=r"1\.running_mean: the plaintext copy"):
        import_sgx_pytorch(path, KEY)


def test_plain_state_dict_is_not_an_sgx_pytorch_checkpoint(sgx_pytorch_fixture):
    with pytest.raises(FormatError, match="no encrypted_\\* buffers"):
        import_sgx_pytorch(sgx_pytorch_fixture / "plain_state_dict.pt", KEY)


def test_pickled_payload_in_the_checkpoint_never_runs(tmp_path):
    sentinel = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path = tmp_path / "evil.pt"
    torch.save({"0.encrypted_weight": Payload()}, path)
    with pytest.raises(FormatError, match="never unpickles"):
        import_sgx_pytorch(path, KEY)
    assert not sentinel.exists()


def test_cli_wrong_key_leaves_no_key_file_and_no_sealed_file(sgx_pytorch_fixture, tmp_path,
                                                             capsys):
    out, key = tmp_path / "m.sealed", tmp_path / "m.key"
    assert main(["import", "sgx-pytorch", str(sgx_pytorch_fixture / "encrypted.pt"),
                 "--key", "ff" * 16, "--model-id", "m", "-o", str(out),
                 "--key-out", str(key), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "IntegrityError" in err
    assert not out.exists() and not key.exists()


def test_cli_reads_the_key_from_a_file_or_the_environment(sgx_pytorch_fixture, tmp_path,
                                                          monkeypatch):
    src = str(sgx_pytorch_fixture / "encrypted.pt")
    (tmp_path / "legacy.hex").write_text(KEY.hex() + "\n")
    assert main(["import", "sgx-pytorch", src, "--key-file", str(tmp_path / "legacy.hex"),
                 "--model-id", "m", "-o", str(tmp_path / "a.sealed"),
                 "--key-out", str(tmp_path / "a.key"), "-q"]) == 0
    monkeypatch.setenv("SEALEDTORCH_SGX_PYTORCH_KEY", KEY.hex())
    assert main(["import", "sgx-pytorch", src, "--model-id", "m",
                 "-o", str(tmp_path / "b.sealed"), "--key-out", str(tmp_path / "b.key"),
                 "-q"]) == 0


@pytest.mark.parametrize("bad", ["00", "zz" * 16, "00" * 32])
def test_cli_malformed_key_is_one_config_error_line(sgx_pytorch_fixture, tmp_path, capsys, bad):
    assert main(["import", "sgx-pytorch", str(sgx_pytorch_fixture / "encrypted.pt"),
                 "--key", bad, "--model-id", "m", "-o", str(tmp_path / "m.sealed"),
                 "--key-out", str(tmp_path / "m.key")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sealedtorch: error (ConfigError): --key:") and err.count("\n") == 1


def test_missing_key_names_every_way_to_give_it(sgx_pytorch_fixture, tmp_path, monkeypatch):
    monkeypatch.delenv("SEALEDTORCH_SGX_PYTORCH_KEY", raising=False)
    from sealedtorch.cli.importer import _legacy_key

    args = type("A", (), {"key": None, "key_file": None})()
    with pytest.raises(ConfigError, match="--key HEX, --key-file FILE or "
                                          r"\$SEALEDTORCH_SGX_PYTORCH_KEY"):
        _legacy_key(args)
