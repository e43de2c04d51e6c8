"""Sealing from files without loading them: lazy safetensors tensors, bounded memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import sealedtorch
from sealedtorch.errors import FormatError
from sealedtorch.format.lazy import read_safetensors_lazily
from sealedtorch.keys import ModelKey

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8,
          torch.uint8, torch.bool, torch.float64]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        base = torch.randn(40, 50, generator=g) * 10  # several 4 KiB chunks each
        out[f"t{i}"] = (base > 0) if dtype == torch.bool else base.to(dtype)
    out["empty"] = torch.empty(0, 4)
    return out


def test_lazy_tensors_are_the_file_tensors(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(_tensors(), str(path))
    lazy = read_safetensors_lazily(path)
    eager = load_file(str(path))
    assert sorted(lazy) == sorted(eager)
    for name, t in eager.items():
        assert lazy[name].dtype == t.dtype and lazy[name].shape == tuple(t.shape)
        assert torch.equal(lazy[name].load(), t)


def test_sealing_lazily_equals_sealing_loaded_tensors(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(_tensors(), str(path))
    key = ModelKey.generate("lazy")
    sealedtorch.seal(read_safetensors_lazily(path), tmp_path / "lazy.sealed", key=key,
                     chunk_size=4096, progress=False)
    got = sealedtorch.load_state_dict(tmp_path / "lazy.sealed", key=key)
    want = load_file(str(path))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def _raw(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("raw, match", [
    (b"\x01\x00", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (struct.pack("<Q", 4) + b"nope", "not JSON"),
    (_raw({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
     "unsupported dtype"),
    (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)),
     "do not fit"),
    (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(2)),
     "do not fit"),
    (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, bytes(8)),
     "overlapping or holed"),
    (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(9)),
     "follow the last tensor"),
    (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
     "malformed shape"),
])
def test_malformed_safetensors_headers_are_format_errors(tmp_path, raw, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(FormatError, match=match):
        read_safetensors_lazily(path)


def test_a_file_that_shrinks_while_sealing_is_refused_without_output(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(1024)}, str(path))
    lazy = read_safetensors_lazily(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FormatError, match="file ended"):
        sealedtorch.seal(lazy, tmp_path / "x.sealed", model_id="x", progress=False)
    assert not (tmp_path / "x.sealed").exists()
    assert not list(tmp_path.glob(".x.sealed.*"))


@pytest.mark.slow
def test_sealing_shards_holds_a_few_chunks_not_the_checkpoint(tmp_path):
    """Peak memory of a real process sealing 4 x 64 MiB shards stays far below one shard."""
    for i in range(4):
        save_file({f"layer{i}.weight": torch.randn(16 << 20)}, str(tmp_path / f"s{i}.safetensors"))
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import sealedtorch
        from sealedtorch.format.lazy import read_safetensors_lazily
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        state = {{}}
        for i in range(4):
            state.update(read_safetensors_lazily(Path({str(tmp_path)!r}) / f"s{{i}}.safetensors"))
        sealedtorch.seal({{}}, Path({str(tmp_path)!r}) / "warm.sealed", model_id="w",
                         progress=False)
        before = hwm()
        sealedtorch.seal(state, Path({str(tmp_path)!r}) / "all.sealed", model_id="m",
                         progress=False)
        print(json.dumps({{"growth": hwm() - before}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 32 << 20, f"peak RSS grew by {growth / 2**20:.1f} MiB sealing 256 MiB"
