"""Receiving an inference request body: bounded, with as few copies as possible.

Invariants:

- never more than ``limit`` bytes are held for one body (``max_request_bytes``), whether the
  length is declared, undeclared or the body is gzip/deflate-compressed (decompression stops
  after ``limit`` bytes of output: a "zip bomb" is refused, never inflated whole);
- a declared ``Content-Length`` is exact: a body longer or shorter than it is refused;
- with the binary extension (``Inference-Header-Content-Length``) and a known length, the
  binary part is received straight into one fresh uint8 tensor, so input tensors can be views
  of it (no further copy).

The result is always ``(JSON header, binary data)``.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

import anyio
import torch
from fastapi import Request

from ..errors import InvalidRequest, PayloadTooLarge
from .kserve import HEADER_LENGTH, split_body

__all__ = ["Body", "content_encoding", "read_request_body"]

#: (JSON header, binary data) of one request.
Body = tuple[bytearray, memoryview | torch.Tensor]

#: Content-Encodings a request body may use (tritonclient's request_compression_algorithm).
_ENCODINGS = ("gzip", "deflate")


async def read_request_body(request: Request, limit: int) -> Body:
    """The body of ``request``, at most ``limit`` bytes (decompressed), as (JSON header,
    binary data)."""
    if content_encoding(request) is not None:
        return await _read_encoded_body(request, limit)
    return await _read_plain_body(request, limit)


def content_encoding(request: Request) -> str | None:
    """The body's Content-Encoding (None for identity); 400 for one we cannot decode."""
    value = request.headers.get("content-encoding", "").strip().lower()
    if value in ("", "identity"):
        return None
    if value not in _ENCODINGS:
        raise InvalidRequest(f"Content-Encoding {value[:40]!r} is not supported (use gzip, "
                             f"deflate or none)")
    return value


# --- identity bodies ----------------------------------------------------------------------

async def _read_plain_body(request: Request, limit: int) -> Body:
    size = _declared_length(request, limit)
    split = request.headers.get(HEADER_LENGTH)
    if size is None:
        header, binary = split_body(await _receive_bounded(request.stream(), limit), split)
        return bytearray(header), binary
    if split is None:
        # JSON only, length known: received into one buffer of that size, returned as is
        # (no growing copies, no second copy of the header).
        return await _receive_exact(request.stream(), size), memoryview(b"")
    return await _receive_split(request.stream(), size, _header_length(split, size))


def _declared_length(request: Request, limit: int) -> int | None:
    """The Content-Length (None when not given); 413 above ``limit`` before reading any."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        raise InvalidRequest("Content-Length is not an integer") from None
    if size > limit:
        raise PayloadTooLarge(f"request body of {size} bytes is larger than the limit "
                              f"of {limit} bytes (max_request_bytes)")
    return size


def _header_length(split: str, size: int) -> int:
    """``Inference-Header-Content-Length``: an integer within the declared body."""
    try:
        n = int(split)
    except ValueError:
        raise InvalidRequest(f"{HEADER_LENGTH} must be an integer") from None
    if not 0 < n <= size:
        raise InvalidRequest(f"{HEADER_LENGTH} {n} is outside the body of {size} bytes")
    return n


async def _receive_bounded(chunks: AsyncIterator[bytes], limit: int) -> bytearray:
    """A body of unknown length, refused as soon as it grows past ``limit``."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} "
                                  f"bytes (max_request_bytes)")
    return body


async def _receive_exact(chunks: AsyncIterator[bytes], size: int) -> bytearray:
    """A body of declared length ``size``, into one buffer of that size."""
    body = bytearray(size)
    pos = 0
    async for chunk in chunks:
        end = pos + len(chunk)
        if end > size:
            raise InvalidRequest("request body is longer than its Content-Length")
        body[pos:end] = chunk
        pos = end
    _check_complete(pos, size)
    return body


async def _receive_split(chunks: AsyncIterator[bytes], size: int, n: int
                         ) -> tuple[bytearray, torch.Tensor]:
    """A body of declared length ``size`` whose first ``n`` bytes are the JSON header: the
    header into a bytearray, the rest straight into a uint8 tensor."""
    header = bytearray(n)
    data = torch.empty(size - n, dtype=torch.uint8)
    # ndarray.data: a writable memoryview of the tensor's own memory
    target = data.numpy().data if size > n else memoryview(bytearray())
    pos = 0
    async for chunk in chunks:
        end = pos + len(chunk)
        if end > size:
            raise InvalidRequest("request body is longer than its Content-Length")
        if pos < n:
            k = min(n, end) - pos
            header[pos:pos + k] = chunk[:k]
            if k < len(chunk):
                target[0:end - n] = chunk[k:]
        else:
            target[pos - n:end - n] = chunk
        pos = end
    _check_complete(pos, size)
    return header, data


def _check_complete(received: int, size: int) -> None:
    if received != size:
        raise InvalidRequest(f"request body ended after {received} of {size} bytes")


# --- compressed bodies --------------------------------------------------------------------

async def _read_encoded_body(request: Request, limit: int) -> Body:
    """A gzip/deflate body, decompressed to at most ``limit`` bytes, as (JSON header,
    binary data).  ``Inference-Header-Content-Length`` counts the decompressed JSON part,
    as tritonclient sends it.  Decompression is bounded: a small body that inflates past
    ``limit`` (a "zip bomb") is refused after ``limit`` bytes of output, never held whole."""
    encoding = content_encoding(request)
    compressed = await _receive_bounded(request.stream(), limit)
    body = await anyio.to_thread.run_sync(
        lambda: _inflate(bytes(compressed), encoding or "gzip", limit))
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    return bytearray(header), binary


def _inflate(data: bytes, encoding: str, limit: int) -> bytearray:
    # wbits: 16+15 reads a gzip wrapper; 15 a zlib stream (HTTP "deflate" is zlib-wrapped)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else
                                  zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while pending:
            out += inflater.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise PayloadTooLarge(f"the {encoding} request body decompresses to more than "
                                      f"the limit of {limit} bytes (max_request_bytes)")
            pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        if not inflater.eof:
            raise InvalidRequest(f"the {encoding} request body is truncated")
        if inflater.unused_data:
            raise InvalidRequest(f"{len(inflater.unused_data)} bytes follow the end of the "
                                 f"{encoding} stream")
    except zlib.error as exc:
        raise InvalidRequest(f"the request body is not valid {encoding} data: {exc}") \
            from None
    return out
