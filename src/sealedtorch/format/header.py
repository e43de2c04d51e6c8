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

from .. import uniquejson
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
        """Parse and validate an authentic header, strictly (docs/format.md, "Reader
        requirements"): a header that a lenient reader would accept in a different sense
        than the writer meant is refused, not guessed at.

        Raises:
            FormatError: malformed JSON, a duplicate key, an unknown or missing field, a
                value of the wrong type, or a table that does not match the preamble.
        """
        try:
            doc = uniquejson.loads(raw)
            header = cls._from_json(doc)
        except (ValueError, TypeError) as exc:
            raise FormatError(f"{source}: header is authentic but malformed ({exc})") from None
        header.validate(data_length, chunk_size, chunk_count, source=source)
        return header

    @classmethod
    def _from_json(cls, doc: object) -> Header:
        _check_fields(doc, "header", required={"tensors"}, optional={"metadata"})
        assert isinstance(doc, dict)
        tensors = doc["tensors"]
        if not isinstance(tensors, list):
            raise TypeError("field 'tensors' is not a list")
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict):
            raise TypeError("field 'metadata' is not an object")
        return cls(tuple(_entry(i, e) for i, e in enumerate(tensors)), metadata)

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


_TENSOR_FIELDS = {"name", "dtype", "shape", "offset", "nbytes"}
_ALIAS_FIELDS = {"name", "alias_of"}


def _check_fields(obj: object, what: str, *, required: set[str],
                  optional: frozenset[str] | set[str] = frozenset()) -> None:
    if not isinstance(obj, dict):
        raise TypeError(f"{what} is not an object")
    missing = sorted(required - obj.keys())
    if missing:
        raise ValueError(f"{what}: missing field {missing[0]!r}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise ValueError(f"{what}: unknown field {unknown[0]!r}")


def _non_negative_int(value: object, what: str) -> int:
    """JSON integers only: ``true``, ``1.0`` and ``"1"`` are not integers here."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} is not a non-negative integer ({value!r})")
    return value


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} is not a string ({value!r})")
    return value


def _entry(index: int, e: object) -> TensorEntry | AliasEntry:
    what = f"tensors[{index}]"
    if isinstance(e, dict) and "alias_of" in e:
        _check_fields(e, what, required=_ALIAS_FIELDS)
        return AliasEntry(_string(e["name"], f"{what}.name"),
                          _string(e["alias_of"], f"{what}.alias_of"))
    _check_fields(e, what, required=_TENSOR_FIELDS)
    assert isinstance(e, dict)
    dtype = _string(e["dtype"], f"{what}.dtype")
    if dtype not in DTYPES:
        raise ValueError(f"{what}.dtype: unknown dtype {dtype!r}")
    shape = e["shape"]
    if not isinstance(shape, list):
        raise TypeError(f"{what}.shape is not a list")
    dims = tuple(_non_negative_int(d, f"{what}.shape[{i}]") for i, d in enumerate(shape))
    return TensorEntry(_string(e["name"], f"{what}.name"), dtype, dims,
                       _non_negative_int(e["offset"], f"{what}.offset"),
                       _non_negative_int(e["nbytes"], f"{what}.nbytes"))
