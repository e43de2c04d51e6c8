"""Round trips: what goes in comes back, bit for bit, for every dtype and shape."""

from __future__ import annotations

import pytest
import torch

import sealedtorch
from sealedtorch.errors import UnsupportedTensorError
from sealedtorch.format import inspect_file, read_preamble
from sealedtorch.format.spec import DTYPES
from sealedtorch.keys import ModelKey


def _random(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,),
                        dtype=torch.uint8)
    if dtype == torch.bool:
        return (raw[: torch.Size(shape).numel()] % 2).bool().reshape(shape)
    return raw.view(dtype)[: torch.Size(shape).numel()].reshape(shape).clone()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Compare raw bytes, so NaN payloads and -0.0 count too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8)) if a.numel() else True


@pytest.fixture
def key() -> ModelKey:
    return ModelKey.generate("test-model")


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exactly(tmp_path, key, name):
    dtype = DTYPES[name]
    sd = {"t": _random(dtype, (5, 7)), "s": _random(dtype, ())}
    sealedtorch.seal(sd, tmp_path / "m.sealed", key=key, chunk_size=4096)
    out = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=key)
    assert all(_bits_equal(out[k], sd[k]) for k in sd)


def test_zero_element_and_scalar_tensors_round_trip(tmp_path, key):
    sd = {"empty": torch.empty(0, 3), "empty2": torch.empty(4, 0, dtype=torch.int8),
          "scalar": torch.tensor(2.5), "int_scalar": torch.tensor(7)}
    sealedtorch.seal(sd, tmp_path / "m.sealed", key=key)
    out = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=key)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == \
        {k: (v.shape, v.dtype) for k, v in sd.items()}
    assert out["scalar"].item() == 2.5 and out["int_scalar"].item() == 7


def test_empty_state_dict_round_trips(tmp_path, key):
    sealedtorch.seal({}, tmp_path / "m.sealed", key=key)
    assert sealedtorch.load_state_dict(tmp_path / "m.sealed", key=key) == {}


def test_non_contiguous_tensor_comes_back_with_same_values(tmp_path, key):
    sd = {"t": torch.randn(6, 8).t(), "sliced": torch.randn(6, 8)[:, ::2]}
    sealedtorch.seal(sd, tmp_path / "m.sealed", key=key)
    out = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=key)
    assert torch.equal(out["t"], sd["t"]) and torch.equal(out["sliced"], sd["sliced"])
    assert out["t"].is_contiguous()


def test_tied_weights_come_back_tied(tmp_path, key):
    emb = torch.randn(10, 4)
    sd = {"embed.weight": emb, "head.weight": emb, "other": torch.randn(3)}
    sealedtorch.seal(sd, tmp_path / "m.sealed", key=key)
    out = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=key)
    assert out["head.weight"] is out["embed.weight"]
    assert torch.equal(out["head.weight"], emb)


def test_overlapping_views_that_are_not_identical_are_refused(tmp_path, key):
    base = torch.randn(10)
    with pytest.raises(UnsupportedTensorError, match="shares memory"):
        sealedtorch.seal({"a": base, "b": base[2:5]}, tmp_path / "m.sealed", key=key)
    assert not (tmp_path / "m.sealed").exists()


def test_non_tensor_values_are_refused(tmp_path, key):
    with pytest.raises(UnsupportedTensorError, match="not a tensor"):
        sealedtorch.seal({"a": torch.ones(1), "step": 5}, tmp_path / "m.sealed", key=key)


def test_sparse_tensors_are_refused(tmp_path, key):
    with pytest.raises(UnsupportedTensorError, match="dense"):
        sealedtorch.seal({"s": torch.eye(3).to_sparse()}, tmp_path / "m.sealed", key=key)


def test_multi_chunk_tensor_spanning_many_chunks_round_trips(tmp_path, key):
    sd = {"big": torch.randn(50_000), "small": torch.randn(3), "big2": torch.randn(7, 3001)}
    sealedtorch.seal(sd, tmp_path / "m.sealed", key=key, chunk_size=4096)
    assert read_preamble(tmp_path / "m.sealed").chunk_count > 50
    for workers in (1, 2, 3):
        out = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=key, workers=workers)
        assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_metadata_is_encrypted_and_returned_with_the_key(tmp_path, key):
    sealedtorch.seal({"w": torch.ones(2)}, tmp_path / "m.sealed", key=key,
                     metadata={"arch": "torchvision.models:resnet50",
                               "kwargs": {"num_classes": 10}})
    raw = (tmp_path / "m.sealed").read_bytes()
    assert b"resnet50" not in raw and b"num_classes" not in raw
    info = inspect_file(tmp_path / "m.sealed", key=key)
    assert info["metadata"]["kwargs"] == {"num_classes": 10}


def test_tensor_names_and_values_do_not_appear_in_the_file(tmp_path, key):
    w = torch.arange(1000, dtype=torch.float32)
    sealedtorch.seal({"secret_layer_name.weight": w}, tmp_path / "m.sealed", key=key)
    raw = (tmp_path / "m.sealed").read_bytes()
    assert b"secret_layer_name" not in raw
    assert w.numpy().tobytes()[400:464] not in raw


def test_preamble_is_readable_without_a_key(tmp_path, key):
    sealedtorch.seal({"w": torch.ones(2)}, tmp_path / "m.sealed", key=key)
    pre = read_preamble(tmp_path / "m.sealed")
    assert (pre.model_id, pre.key_version) == ("test-model", 1)


def test_same_key_seals_many_files_with_distinct_salts(tmp_path, key):
    sd = {"w": torch.ones(100)}
    sealedtorch.seal(sd, tmp_path / "a.sealed", key=key)
    sealedtorch.seal(sd, tmp_path / "b.sealed", key=key)
    a, b = (tmp_path / "a.sealed").read_bytes(), (tmp_path / "b.sealed").read_bytes()
    assert read_preamble(tmp_path / "a.sealed").salt != read_preamble(tmp_path / "b.sealed").salt
    assert a[-100:] != b[-100:]


def test_load_model_assigns_decrypted_tensors_as_parameters(tmp_path, key):
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sealedtorch.seal(src, tmp_path / "m.sealed", key=key)
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sealedtorch.load_model(tmp_path / "m.sealed", dst, key=key)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert isinstance(dst[0].weight, torch.nn.Parameter)


def test_load_model_works_on_a_meta_device_module(tmp_path, key):
    src = torch.nn.Linear(8, 2)
    sealedtorch.seal(src, tmp_path / "m.sealed", key=key)
    with torch.device("meta"):
        dst = torch.nn.Linear(8, 2)
    sealedtorch.load_model(tmp_path / "m.sealed", dst, key=key, device="cpu")
    assert torch.equal(dst.weight, src.weight)


def test_existing_output_is_not_overwritten_by_default(tmp_path, key):
    target = tmp_path / "m.sealed"
    target.write_bytes(b"precious")
    with pytest.raises(sealedtorch.ConfigError, match="already exists"):
        sealedtorch.seal({"w": torch.ones(1)}, target, key=key)
    assert target.read_bytes() == b"precious"


def test_key_file_path_is_accepted_as_key(tmp_path, key):
    kf = sealedtorch.write_key_file(tmp_path / "k.json", key)
    sealedtorch.seal({"w": torch.ones(3)}, tmp_path / "m.sealed", key=kf)
    out = sealedtorch.load_state_dict(tmp_path / "m.sealed", key=kf)
    assert torch.equal(out["w"], torch.ones(3))
