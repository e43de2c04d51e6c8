"""The encrypted header: the tensor table and the owner's metadata.

Kept secret because names, shapes and the architecture reveal the owner's model.  Encoded
as compact UTF-8 JSON; validated after decryption so that a reader never trusts offsets
blindly, even authentic ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FormatError
from .spec import DTYPES, chunks_of


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}


@dataclass(frozen=True)
class AliasEntry:
    """A state_dict entry that is the very same tensor as ``target`` (tied weights)."""

    name: str
    target: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "alias_of": self.target}


@dataclass(frozen=True)
class Header:
    entries: tuple[TensorEntry | AliasEntry, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[TensorEntry, ...]:
        return tuple(e for e in self.entries if isinstance(e, TensorEntry))

    def encode(self) -> bytes:
        doc = {"tensors": [e.to_json() for e in self.entries], "metadata": self.metadata}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, raw: bytes, *, data_length: int, chunk_size: int, chunk_count: int,
               source: str) -> Header:
        try:
            doc = json.loads(raw)
            entries = [_entry(e) for e in doc["tensors"]]
            metadata = doc.get("metadata", {})
            if not isinstance(metadata, dict):
                raise TypeError("metadata is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{source}: header is authentic but malformed ({exc})") from None
        header = cls(tuple(entries), metadata)
        header.validate(data_length, chunk_size, chunk_count, source=source)
        return header

    def validate(self, data_length: int, chunk_size: int, chunk_count: int, *,
                 source: str) -> None:
        """Tensors are stored back to back, in order, each in its own whole chunks."""
        names: set[str] = set()
        end = chunks = 0
        for e in self.entries:
            if e.name in names:
                raise FormatError(f"{source}: duplicate tensor name {e.name!r}")
            if isinstance(e, AliasEntry):
                if e.target not in names:
                    raise FormatError(f"{source}: alias {e.name!r} points to unknown tensor")
            else:
                expected = math.prod(e.shape) * e.torch_dtype.itemsize
                if e.nbytes != expected or e.offset != end:
                    raise FormatError(f"{source}: tensor {e.name!r} has an invalid extent")
                end = e.offset + e.nbytes
                chunks += chunks_of(e.nbytes, chunk_size)
            names.add(e.name)
        if end != data_length or chunks != chunk_count:
            raise FormatError(f"{source}: tensor table does not cover the data segment")


def _entry(e: dict[str, Any]) -> TensorEntry | AliasEntry:
    if "alias_of" in e:
        return AliasEntry(str(e["name"]), str(e["alias_of"]))
    if e["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {e['dtype']!r}")
    shape = tuple(int(d) for d in e["shape"])
    if any(d < 0 for d in shape):
        raise ValueError("negative dimension")
    return TensorEntry(str(e["name"]), e["dtype"], shape, int(e["offset"]), int(e["nbytes"]))
