"""The header reader is as strict as docs/format.md's "Reader requirements": an authentic
header that a lenient parser would read in some sense the writer may not have meant is
refused with a FormatError naming the field, never guessed at."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import sealedtorch
from sealedtorch.errors import FormatError
from sealedtorch.format.encode import encode_prefix, lay_out, seal_chunk_into
from sealedtorch.keys import ModelKey

KEY = ModelKey("strict-test", 1, bytes(range(32)))
GOOD = {"tensors": [{"name": "w", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8},
                    {"name": "v", "alias_of": "w"}],
        "metadata": {"arch": "x"}}


def _sealed_with_header(tmp_path, header_json: str):
    """A correctly encrypted file for a 2-element float32 tensor, whose (authentic) header
    plaintext is exactly ``header_json``."""
    w = torch.ones(2)
    layout = dataclasses.replace(lay_out({"w": w, "v": w}, chunk_size=4096),
                                 header_plain=header_json.encode())
    prefix = encode_prefix(layout, KEY, bytes(32))
    out = bytearray(prefix.data)
    for c in layout.chunks:
        assert not isinstance(c.source, tuple)
        out += seal_chunk_into(prefix, c.index, c.source, memoryview(bytearray(4096 + 16)))
    path = tmp_path / "m.sealed"
    path.write_bytes(out)
    return path


def _load(tmp_path, header_json: str):
    return sealedtorch.load_state_dict(_sealed_with_header(tmp_path, header_json), key=KEY)


def test_the_well_formed_header_loads(tmp_path):
    got = _load(tmp_path, json.dumps(GOOD))
    assert torch.equal(got["w"], torch.ones(2)) and got["v"] is got["w"]


def test_a_duplicate_key_in_a_tensor_entry_is_refused(tmp_path):
    raw = ('{"tensors":[{"name":"w","dtype":"float32","shape":[2],"offset":0,"nbytes":8,'
           '"nbytes":8},{"name":"v","alias_of":"w"}],"metadata":{}}')
    with pytest.raises(FormatError, match="duplicate key 'nbytes'"):
        _load(tmp_path, raw)


def test_a_duplicate_top_level_key_is_refused(tmp_path):
    raw = json.dumps(GOOD)[:-1] + ',"metadata":{"arch":"other"}}'
    with pytest.raises(FormatError, match="duplicate key 'metadata'"):
        _load(tmp_path, raw)


def test_a_duplicate_key_inside_metadata_is_refused(tmp_path):
    raw = json.dumps(GOOD).replace('{"arch": "x"}', '{"arch": "x", "arch": "y"}')
    with pytest.raises(FormatError, match="duplicate key 'arch'"):
        _load(tmp_path, raw)


def test_an_unknown_field_in_a_tensor_entry_is_refused(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    doc["tensors"][0]["strides"] = [1]
    with pytest.raises(FormatError, match=r"tensors\[0\]: unknown field 'strides'"):
        _load(tmp_path, json.dumps(doc))


def test_an_unknown_field_in_an_alias_entry_is_refused(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    doc["tensors"][1]["dtype"] = "float32"
    with pytest.raises(FormatError, match=r"tensors\[1\]: unknown field 'dtype'"):
        _load(tmp_path, json.dumps(doc))


def test_an_unknown_top_level_field_is_refused(tmp_path):
    with pytest.raises(FormatError, match="header: unknown field 'version'"):
        _load(tmp_path, json.dumps({**GOOD, "version": 2}))


def test_a_missing_field_is_refused(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    del doc["tensors"][0]["offset"]
    with pytest.raises(FormatError, match=r"tensors\[0\]: missing field 'offset'"):
        _load(tmp_path, json.dumps(doc))


@pytest.mark.parametrize("dim", ["2", 2.0, True, None, -2])
def test_a_shape_entry_that_is_not_a_non_negative_json_integer_is_refused(tmp_path, dim):
    doc = json.loads(json.dumps(GOOD))
    doc["tensors"][0]["shape"] = [dim]
    with pytest.raises(FormatError, match=r"tensors\[0\]\.shape\[0\] is not a non-negative"):
        _load(tmp_path, json.dumps(doc))


@pytest.mark.parametrize("field", ["offset", "nbytes"])
def test_an_extent_given_as_a_string_or_bool_is_refused(tmp_path, field):
    for bad in ("8", False):
        doc = json.loads(json.dumps(GOOD))
        doc["tensors"][0][field] = bad
        with pytest.raises(FormatError, match=rf"tensors\[0\]\.{field} is not a non-negative"):
            _load(tmp_path, json.dumps(doc))


def test_a_name_that_is_not_a_string_is_refused(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    doc["tensors"][0]["name"] = 7
    with pytest.raises(FormatError, match=r"tensors\[0\]\.name is not a string"):
        _load(tmp_path, json.dumps(doc))


def test_a_shape_that_is_not_a_list_is_refused(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    doc["tensors"][0]["shape"] = "2"
    with pytest.raises(FormatError, match=r"tensors\[0\]\.shape is not a list"):
        _load(tmp_path, json.dumps(doc))
