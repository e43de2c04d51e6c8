"""A sealed file is opened once: the preamble, the digest a runtime pins and the tensors it
decrypts all come from that one open file, even if the path is replaced in between."""

from __future__ import annotations

import hashlib
import os

import torch

import sealedtorch
from sealedtorch.format import SealedReader
from sealedtorch.keys import ModelKey


def test_a_reader_decrypts_the_file_it_opened_even_after_the_path_is_replaced(tmp_path):
    key = ModelKey.generate("m")
    first, second = tmp_path / "m.sealed", tmp_path / "other.sealed"
    sealedtorch.seal({"w": torch.ones(4)}, first, key=key, progress=False)
    sealedtorch.seal({"w": torch.zeros(4)}, second, key=key, progress=False)
    pinned = hashlib.sha256(first.read_bytes()).hexdigest()
    with SealedReader(first) as f:
        os.replace(second, first)  # swapped after the open, before the digest and the load
        assert f.sha256() == pinned
        tensors, _ = f.read_tensors(key)
    assert torch.equal(tensors["w"], torch.ones(4))


def test_a_reader_closes_its_file_when_the_preamble_is_not_a_sealed_file(tmp_path):
    import pytest

    from sealedtorch.errors import FormatError

    bad = tmp_path / "x.sealed"
    bad.write_bytes(b"not sealed at all")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(FormatError):
            SealedReader(bad)
    assert len(os.listdir("/proc/self/fd")) <= before + 1
