"""Tensors that stay in their file until they are sealed: bounded memory for big checkpoints.

Sealing an 8 GiB sharded checkpoint should not need 8 GiB of memory.  A :class:`LazyTensor`
names a tensor's dtype, shape and the byte range of its raw little-endian data in a file;
the writer (:mod:`.writer`) reads each chunk with ``pread`` into a per-worker buffer just
before encrypting it, so a seal holds a few chunks per worker, whatever the checkpoint size
(page-cache pages are the kernel's, not the process's).

:func:`read_safetensors_lazily` parses a ``.safetensors`` file's header (an 8-byte length,
then JSON) with the checks the safetensors spec implies: known dtypes, byte ranges that
match shape × element size, lie inside the data section, and neither overlap nor leave
holes.  No tensor data is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError

__all__ = ["LazyTensor", "read_safetensors_lazily"]

#: safetensors dtype names -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class LazyTensor:
    """A tensor's raw bytes at ``offset`` in ``path`` (contiguous, little-endian)."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        """The tensor in memory (tests and small tensors only; sealing never calls this)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if self.nbytes:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                view = out.reshape(-1).view(torch.uint8).numpy().data  # the tensor's memory
                if f.readinto(view) != self.nbytes:
                    raise FormatError(f"{self.path}: truncated tensor data")
        return out


class FileReader:
    """``pread`` of byte ranges from the files lazy tensors live in, one descriptor each."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read_into(self, tensor: LazyTensor, start: int, out: memoryview) -> memoryview:
        fd = self._fds.get(tensor.path)
        if fd is None:
            fd = self._fds.setdefault(tensor.path, os.open(tensor.path, os.O_RDONLY))
        got = os.preadv(fd, [out], tensor.offset + start)
        if got != len(out):
            raise FormatError(f"{tensor.path}: file ended while reading tensor data "
                              f"(changed while sealing?)")
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _entries(path: Path, header: dict[str, object], data_start: int, size: int
             ) -> Iterator[tuple[str, LazyTensor, int, int]]:
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise FormatError(f"{path}: header entry {name!r} is not an object")
        dtype = SAFETENSORS_DTYPES.get(str(info.get("dtype")))
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise FormatError(f"{path}: tensor {name!r} has unsupported dtype "
                              f"{info.get('dtype')!r}")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"{path}: tensor {name!r} has a malformed shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise FormatError(f"{path}: tensor {name!r} has malformed data_offsets")
        begin, end = offsets
        tensor = LazyTensor(path, data_start + begin, dtype, tuple(shape))
        if not 0 <= begin <= end or end - begin != tensor.nbytes \
                or data_start + end > size:
            raise FormatError(f"{path}: tensor {name!r}: data_offsets {offsets} do not fit "
                              f"its shape {shape} and dtype, or the file")
        yield name, tensor, begin, end


def read_safetensors_lazily(path: str | os.PathLike[str]) -> dict[str, LazyTensor]:
    """Every tensor of a ``.safetensors`` file as a :class:`LazyTensor` (no data read).

    Raises:
        FormatError: a truncated or malformed header, unknown dtypes, byte ranges that do
            not match the shapes, overlap, leave holes, or run past the end of the file.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{p}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise FormatError(f"{p}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise FormatError(f"{p}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{p}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{p}: the safetensors header is not a JSON object")
    data_start = 8 + n
    found = sorted(_entries(p, header, data_start, size), key=lambda e: (e[2], e[3]))
    position = 0
    for name, _, begin, end in found:
        if begin != position:
            raise FormatError(f"{p}: tensor {name!r} starts at {begin}, not at {position} "
                              "(overlapping or holed data)")
        position = end
    if data_start + position != size:
        raise FormatError(f"{p}: {size - data_start - position} bytes follow the last tensor")
    return {name: tensor for name, tensor, _, _ in found}
