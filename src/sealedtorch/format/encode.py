"""Encoding a ``.sealed`` file: pure functions from tensors, key and salt to bytes.

Nothing here does I/O or draws randomness: the salt is an input, and the chunk nonces are
the chunk indices (docs/format.md), so the same inputs always give the same bytes.  That
makes the format testable against known-answer vectors (tests/format/vectors/), and leaves
the writer (:mod:`.writer`) with only what is not pure: a random salt, reading lazy
tensors, worker threads and the atomic write.

The steps, in the order the writer uses them:

1. :func:`lay_out`: the tensor table (tensors back to back, tied tensors as aliases) and one
   :class:`Chunk` per data chunk, pointing into the tensors' own memory (no copy);
2. :func:`encode_prefix`: preamble and encrypted header, and the per-file keys and digest
   every chunk needs;
3. :func:`seal_chunk_into`: one chunk's ciphertext and tag, into a caller's buffer; chunks
   are independent, so any number of threads call it in any order.

:func:`encode` runs all three in memory, for files small enough to hold twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import crypto
from ..errors import ConfigError, UnsupportedTensorError
from ..keys import ModelKey
from .header import AliasEntry, Header, TensorEntry
from .lazy import LazyTensor
from .spec import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_NAMES,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    FileKeys,
    Preamble,
    chunk_aad,
    chunks_of,
    file_digest,
    header_aad,
)

__all__ = ["Chunk", "Layout", "Prefix", "check_chunk_size", "encode", "encode_prefix",
           "lay_out", "seal_chunk_into"]


@dataclass(frozen=True)
class Chunk:
    """Data chunk ``index``: its plaintext and where its ciphertext goes.

    ``source`` is the plaintext itself (a slice of a tensor's memory) or, for a
    :class:`LazyTensor`, ``(tensor, start, length)`` still to be read from its file.
    ``position`` is the ciphertext's offset from the start of the data segment."""

    index: int
    source: memoryview | tuple[LazyTensor, int, int]
    position: int

    @property
    def length(self) -> int:
        return self.source[2] if isinstance(self.source, tuple) else len(self.source)


@dataclass(frozen=True)
class Layout:
    """Everything about a file that depends on the tensors alone (not on key or salt)."""

    header: Header
    header_plain: bytes
    chunks: tuple[Chunk, ...]
    data_length: int
    chunk_size: int

    @property
    def tensor_count(self) -> int:
        return len(self.header.tensors)

    @property
    def is_lazy(self) -> bool:
        return any(isinstance(c.source, tuple) for c in self.chunks)


@dataclass(frozen=True)
class Prefix:
    """Preamble and header ciphertext (``data``), with what sealing the chunks needs."""

    preamble: Preamble
    keys: FileKeys
    digest: bytes
    data: bytes
    chunk_count: int


def check_chunk_size(chunk_size: int) -> None:
    """Raises:
        ConfigError: ``chunk_size`` is not a multiple of 64 in the range the format allows.
    """
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % 64 == 0):
        raise ConfigError(f"chunk size must be a multiple of 64 in "
                          f"[{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size}")


def lay_out(state_dict: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
            chunk_size: int = DEFAULT_CHUNK_SIZE) -> Layout:
    """The tensor table and chunk list of ``state_dict`` (tensors or lazy tensors).

    Raises:
        ConfigError: a bad chunk size, or metadata that is not JSON-serialisable.
        UnsupportedTensorError: a value that cannot be sealed (see :func:`_table`).
    """
    check_chunk_size(chunk_size)
    entries, sources, data_length = _table(state_dict)
    header = Header(tuple(entries), dict(metadata or {}))
    try:
        header_plain = header.encode()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata must be JSON-serialisable: {exc}") from None
    # Chunks never span two tensors, so each is encrypted straight from that tensor's memory.
    chunks: list[Chunk] = []
    for off, src in sources:
        size = src.nbytes if isinstance(src, LazyTensor) else len(src)
        for k in range(chunks_of(size, chunk_size)):
            lo, hi = k * chunk_size, min((k + 1) * chunk_size, size)
            part = (src, lo, hi - lo) if isinstance(src, LazyTensor) else src[lo:hi]
            chunks.append(Chunk(len(chunks), part, off + lo + len(chunks) * TAG_SIZE))
    return Layout(header, header_plain, tuple(chunks), data_length, chunk_size)


def encode_prefix(layout: Layout, key: ModelKey, salt: bytes) -> Prefix:
    """Preamble and header ciphertext of ``layout`` under ``key`` and ``salt``."""
    if len(salt) != SALT_SIZE:
        raise ValueError(f"the salt is {SALT_SIZE} bytes, got {len(salt)}")
    keys = FileKeys.derive(key, salt)
    count = len(layout.chunks)
    preamble = Preamble(model_id=key.model_id, key_version=key.version, salt=salt,
                        key_check=keys.check, chunk_size=layout.chunk_size,
                        header_length=len(layout.header_plain) + TAG_SIZE,
                        data_length=layout.data_length, chunk_count=count)
    pre = preamble.encode()
    header_ct = keys.header.encrypt(crypto.counter_nonce(0), layout.header_plain,
                                    header_aad(pre))
    return Prefix(preamble, keys, file_digest(pre, header_ct), pre + header_ct, count)


def seal_chunk_into(prefix: Prefix, index: int, plaintext: memoryview | bytes,
                    out: memoryview) -> memoryview:
    """Encrypt chunk ``index`` into ``out`` (at least ``len(plaintext) + 16`` bytes);
    returns the part of ``out`` that holds ciphertext and tag."""
    sealed = out[:len(plaintext) + TAG_SIZE]
    prefix.keys.data.encrypt_into(crypto.counter_nonce(index), plaintext,
                                  chunk_aad(prefix.digest, index,
                                            index == prefix.chunk_count - 1), sealed)
    return sealed


def encode(state_dict: Mapping[str, torch.Tensor], key: ModelKey, salt: bytes, *,
           metadata: Mapping[str, Any] | None = None,
           chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """The complete ``.sealed`` file for in-memory tensors, as bytes.

    Raises:
        ConfigError: a bad chunk size or metadata that is not JSON-serialisable.
        UnsupportedTensorError: a value that cannot be sealed, or a lazy tensor (whose data
            would have to be read: :func:`sealedtorch.seal` seals those).
    """
    layout = lay_out(state_dict, metadata=metadata, chunk_size=chunk_size)
    if layout.is_lazy:
        raise UnsupportedTensorError("encode() takes tensors in memory; seal() reads lazy "
                                     "tensors from their files")
    prefix = encode_prefix(layout, key, salt)
    out = bytearray(prefix.preamble.file_size)
    out[:len(prefix.data)] = prefix.data
    view = memoryview(out)
    base = prefix.preamble.data_offset
    for chunk in layout.chunks:
        assert not isinstance(chunk.source, tuple)
        seal_chunk_into(prefix, chunk.index, chunk.source, view[base + chunk.position:])
    return bytes(out)


def _table(state_dict: Mapping[str, Any]) -> tuple[list[TensorEntry | AliasEntry],
                                                     list[tuple[int, memoryview | LazyTensor]],
                                                     int]:
    """Lay tensors out back to back; detect tied tensors; refuse what we cannot seal.

    Values are tensors, or :class:`~sealedtorch.format.lazy.LazyTensor` (data still in its
    file: read chunk by chunk while sealing, so memory stays bounded).  Returns the entries,
    (data offset, bytes) of each tensor with data, and the data length."""
    entries: list[TensorEntry | AliasEntry] = []
    sources: list[tuple[int, memoryview | LazyTensor]] = []
    ties = _Ties()
    offset = 0
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise UnsupportedTensorError(f"state_dict key {name!r} is not a string")
        if isinstance(t, LazyTensor):
            entries.append(TensorEntry(name, _dtype_name(name, t.dtype), t.shape, offset,
                                       t.nbytes))
            if t.nbytes:
                sources.append((offset, t))
            offset += t.nbytes
            continue
        t = _sealable(name, t)
        target = ties.target_of(name, t)
        if target is not None:
            entries.append(AliasEntry(name, target))
            continue
        flat = t.cpu().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        entries.append(TensorEntry(name, _dtype_name(name, t.dtype), tuple(t.shape), offset,
                                   nbytes))
        if nbytes:
            sources.append((offset, flat.view(torch.uint8).numpy().data))
        offset += nbytes
    return entries, sources, offset


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise UnsupportedTensorError(f"{name!r}: dtype {dtype} is not supported")
    return DTYPE_NAMES[dtype]


def _sealable(name: str, t: object) -> torch.Tensor:
    """``t`` detached, if it is a dense tensor with data of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise UnsupportedTensorError(
            f"{name!r} is a {type(t).__name__}, not a tensor; only tensors can be sealed")
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise UnsupportedTensorError(
            f"{name!r}: only dense (strided) tensors with data can be sealed "
            f"(got layout {t.layout}, device {t.device})")
    _dtype_name(name, t.dtype)
    return t.detach()


class _Ties:
    """Tied tensors: a name for the very same view of the same memory as an earlier name is
    an alias of it; a different view overlapping an earlier one is refused."""

    def __init__(self) -> None:
        self._views: dict[tuple[Any, ...], str] = {}
        self._ranges: dict[int, list[tuple[int, int, str]]] = {}

    def target_of(self, name: str, t: torch.Tensor) -> str | None:
        if t.numel() == 0:
            return None
        st = t.untyped_storage()
        storage_offset = int(t.storage_offset())
        view_key = (st.data_ptr(), t.device, storage_offset, tuple(t.shape), tuple(t.stride()),
                    t.dtype)
        if view_key in self._views:
            return self._views[view_key]
        begin = st.data_ptr() + storage_offset * t.element_size()
        end = begin + _byte_span(t)
        ranges = self._ranges.setdefault(st.data_ptr(), [])
        for (b, e, other) in ranges:
            if begin < e and b < end:
                raise UnsupportedTensorError(
                    f"{name!r} shares memory with {other!r} but is a different view; "
                    "tied weights are kept only when both names refer to the identical "
                    "tensor. Clone one of them before sealing.")
        ranges.append((begin, end, name))
        self._views[view_key] = name
        return None


def _byte_span(t: torch.Tensor) -> int:
    return (sum((int(s) - 1) * int(st) for s, st in zip(t.shape, t.stride(), strict=True))
            + 1) * t.element_size()
