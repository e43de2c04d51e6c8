"""Large request bodies: bounded memory before and while they are parsed.

Python's ``json`` turns every number of a tensor's ``data`` into an object (about 32 bytes
for 2-4 bytes of text), so a 64 MiB JSON body used to cost ~900 MiB before anything was
validated, and four at once 3.6 GiB.  Two measures keep that bounded:

- :class:`ByteBudget`: the bytes of large request bodies in flight (read, parsed, queued)
  are capped; a request reserves its declared Content-Length (or ``max_request_bytes``
  when it is streamed without one) before its body is read and releases it when it has
  been answered.  A request that cannot get its reservation within the request timeout
  gets 503 with ``Retry-After``.  Bodies declared at most :data:`SMALL_BODY_BYTES` skip the
  budget, so ordinary requests never queue behind large ones.
- :func:`prevalidate_json`: a JSON-only body over :data:`LARGE_JSON_BYTES` is not handed to
  ``json.loads`` whole.  Each input's numeric ``data`` array is cut out of the text first;
  the small remainder (names, datatypes, shapes, parameters) is parsed and checked against
  the model's signature, ``max_elements`` and ``max_batch_size`` *before* any tensor data
  is parsed; only then are the numbers parsed, in bounded chunks, straight into one buffer
  of the declared datatype.  The result is the same request in the binary-extension form
  (``binary_data_size`` + one uint8 tensor), which the ordinary parser then reads, so every
  check of the protocol applies unchanged.  Large bodies whose ``data`` is not a plain
  array of numbers (booleans, strings, ``NaN``) are refused with 413: send them with the
  binary extension.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import BudgetTimeout
from .kserve import InvalidRequest, PayloadTooLarge, TensorSpec

__all__ = ["LARGE_JSON_BYTES", "SMALL_BODY_BYTES", "BudgetTimeout", "ByteBudget",
           "prevalidate_json"]

#: JSON-only bodies above this size take the pre-validating path.
LARGE_JSON_BYTES = 1 << 20
#: Bodies declared (Content-Length) at most this large do not reserve from the budget.
SMALL_BODY_BYTES = 1 << 20
#: Text parsed per step (each step holds one copy of at most this much).
_CHUNK_BYTES = 4 << 20
_DATA_KEY = re.compile(rb'"data"\s*:\s*\[')
_NUMERIC_SPAN = re.compile(rb"[\s0-9.eE+\-,\[\]]*")
_LONG_INTEGER = re.compile(rb"\d{19,}")
_NOT_INTEGER = re.compile(rb"[.eE]")
_BRACKETS = bytes.maketrans(b"[]", b"  ")
_FLOAT = rb"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?"
_INT = rb"-?(?:0|[1-9]\d*)"
#: numpy stops at the first malformed token, which the element count then catches, except
#: in a chunk's last token: that one is checked on its own.
_FLOAT_TOKEN = re.compile(_FLOAT)
_INT_TOKEN = re.compile(_INT)
_INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_FLOAT_TYPES = {"FP16", "BF16", "FP32", "FP64"}


class ByteBudget:
    """A semaphore counted in bytes (asyncio; one per server's event loop)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, n: int, timeout: float) -> int:
        """Reserve ``n`` bytes (at most the capacity), waiting up to ``timeout`` seconds;
        returns what was reserved (give it back to :meth:`release`)."""
        n = min(max(int(n), 0), self.capacity)
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.used + n <= self.capacity), timeout)
            except TimeoutError:
                raise BudgetTimeout(
                    f"{self.used} of {self.capacity} bytes of request bodies are in flight; "
                    f"retry later") from None
            self.used += n
        return n

    async def release(self, n: int) -> None:
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


def _array_end(header: bytearray, start: int) -> int:
    """End (exclusive) of the numeric JSON array that opens at ``header[start]``, or -1
    when the array holds anything but numbers and brackets."""
    match = _NUMERIC_SPAN.match(header, start)
    assert match is not None  # the pattern matches the empty string
    end = header.rfind(b"]", start, match.end())
    if end < 0:
        return -1
    if header.count(b"[", start, end + 1) != header.count(b"]", start, end + 1):
        return -1
    return end + 1


def _escaped(header: bytearray, quote: int) -> bool:
    """Whether the quote at ``header[quote]`` is escaped (so inside a string)."""
    slashes = 0
    while quote - slashes - 1 >= 0 and header[quote - slashes - 1] == 0x5C:
        slashes += 1
    return slashes % 2 == 1


def _store_dtype(datatype: str) -> type[np.generic]:
    if datatype in _INTEGER_TYPES:
        return np.int64
    return np.float32 if datatype in ("FP32", "BF16") else np.float64


def _parse_numbers(header: bytearray, start: int, end: int, datatype: str, count: int,
                   where: str, out: np.ndarray) -> None:
    """Parse the numbers of ``header[start:end]`` (a JSON array, brackets and all) into
    ``out`` (``count`` values of :func:`_store_dtype`), in chunks of bounded size."""
    integer = datatype in _INTEGER_TYPES
    parse_as = np.int64 if integer else np.float64
    filled, pos = 0, start
    while pos < end:
        stop = end if end - pos <= _CHUNK_BYTES else header.rfind(b",", pos, pos + _CHUNK_BYTES)
        if stop <= pos:
            raise InvalidRequest(f"{where}: 'data' holds a number longer than "
                                 f"{_CHUNK_BYTES} bytes")
        chunk = bytes(header[pos:stop]).translate(_BRACKETS)
        pos = stop + 1 if stop < end else end
        if not chunk.strip(b" ,\t\r\n"):
            continue
        if integer and (_NOT_INTEGER.search(chunk) or _LONG_INTEGER.search(chunk)):
            raise InvalidRequest(f"{where}: {datatype} data must be integers within range")
        last = chunk[chunk.rfind(b",") + 1:].strip()
        if not (_INT_TOKEN if integer else _FLOAT_TOKEN).fullmatch(last):
            raise InvalidRequest(f"{where}: 'data' is not a regular array of numbers")
        expected = chunk.count(b",") + 1
        if filled + expected > count:
            raise InvalidRequest(f"{where}: 'data' has more than the {count} elements its "
                                 f"shape needs")
        try:
            values = np.fromstring(chunk, dtype=parse_as, sep=",")
        except ValueError:  # a malformed token, where warnings are errors
            values = np.empty(0)
        if values.size != expected:
            raise InvalidRequest(f"{where}: 'data' is not a regular array of numbers")
        out[filled:filled + expected] = values
        filled += expected
    if filled != count:
        raise InvalidRequest(f"{where}: 'data' has {filled} elements, its shape needs {count}")


def _check_range(values: np.ndarray, spec: TensorSpec, where: str) -> None:
    if spec.datatype in _INTEGER_TYPES and values.size:
        info = torch.iinfo(spec.dtype)
        lo, hi = int(values.min()), int(values.max())
        if lo < info.min or hi > info.max:
            raise InvalidRequest(f"{where}: values outside the range of {spec.datatype} "
                                 f"({info.min}..{info.max})")


def _fill(header: bytearray, span: tuple[int, int], spec: TensorSpec, count: int,
          where: str, dest: torch.Tensor) -> None:
    """Parse one input's numbers into ``dest`` (its raw bytes in the binary part), converted
    the way the ordinary JSON path converts them; straight into ``dest`` when the parse
    type is the wire type (FP32, FP64, INT64), through one temporary array otherwise."""
    store = _store_dtype(spec.datatype)
    target = torch.empty(0, dtype=spec.dtype)
    if spec.datatype != "BF16" and target.numpy().dtype == np.dtype(store) \
            and dest.storage_offset() % spec.dtype.itemsize == 0:
        values = dest.view(spec.dtype).numpy()
        _parse_numbers(header, span[0], span[1], spec.datatype, count, where, values)
        _check_range(values, spec, where)
        return
    values = np.empty(count, dtype=store)
    _parse_numbers(header, span[0], span[1], spec.datatype, count, where, values)
    _check_range(values, spec, where)
    if spec.datatype == "BF16":
        converted = torch.from_numpy(values).to(torch.bfloat16)
    else:
        converted = torch.from_numpy(values.astype(target.numpy().dtype))
    dest.copy_(converted.view(torch.uint8))


#: One input of a large JSON body, checked, whose numbers are still text: the input's JSON
#: object, its spec, shape, element count, the index of its ``data`` span, and ``where``.
_Planned = tuple[dict[str, Any], TensorSpec, list[int], int, int, str]


def prevalidate_json(header: bytearray, *, inputs: Sequence[TensorSpec], max_batch_size: int,
                     max_elements: int) -> tuple[bytearray, torch.Tensor]:
    """A large JSON-only body as (small JSON header, binary data), checking every declared
    name, datatype, shape and size before any tensor data is parsed (see the module
    docstring).  Raises :class:`InvalidRequest` / :class:`PayloadTooLarge`."""
    skeleton, spans = _cut_data_arrays(header)
    try:
        doc = json.loads(bytes(skeleton))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    raw_inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest("'inputs' must be a non-empty list")
    specs = {s.name: s for s in inputs}
    planned: list[_Planned] = []
    used: set[int] = set()
    for index, item in enumerate(raw_inputs):
        plan = _plan_input(item, index, specs, max_batch_size, max_elements, len(spans), used)
        used.add(plan[4])
        planned.append(plan)
    if len(used) != len(spans):
        raise InvalidRequest("a large JSON body may have 'data' arrays only as inputs' data")
    total = sum(count * spec.dtype.itemsize for _, spec, _, count, _, _ in planned)
    binary = torch.empty(total, dtype=torch.uint8)
    offset = 0
    for item, spec, _shape, count, span, where in planned:
        size = count * spec.dtype.itemsize
        _fill(header, spans[span], spec, count, where, binary[offset:offset + size])
        offset += size
        del item["data"]
        item["parameters"] = {**item.get("parameters", {}), "binary_data_size": size}
    return bytearray(json.dumps(doc).encode()), binary


def _cut_data_arrays(header: bytearray) -> tuple[bytearray, list[tuple[int, int]]]:
    """The body with each ``"data": [...]`` array replaced by its index in the returned
    spans ((start, end) of the array in ``header``): small enough to parse whole."""
    spans: list[tuple[int, int]] = []
    skeleton = bytearray()
    pos = 0
    for match in _DATA_KEY.finditer(header):
        if match.start() < pos or _escaped(header, match.start()):
            continue
        start = match.end() - 1
        end = _array_end(header, start)
        if end < 0:
            raise PayloadTooLarge(
                f"a JSON request body over {LARGE_JSON_BYTES} bytes must carry its tensors "
                f"as plain arrays of numbers; send booleans, strings or large data with the "
                f"binary tensor extension")
        skeleton += header[pos:start]
        skeleton += str(len(spans)).encode()
        spans.append((start, end))
        pos = end
    skeleton += header[pos:]
    return skeleton, spans


def _plan_input(item: Any, index: int, specs: Mapping[str, TensorSpec], max_batch_size: int,
                max_elements: int, span_count: int, used: set[int]) -> _Planned:
    """Check ``inputs[index]`` of the skeleton against the model's signature and the limits
    (its ``data`` must be the index of a span not used by another input)."""
    where = f"inputs[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidRequest(f"{where} must be an object with a string 'name'")
    name = item["name"]
    where = f"{where} ({name!r})"
    spec = specs.get(name)
    if spec is None:
        raise InvalidRequest(f"{where}: the model has no input named {name!r} (inputs: "
                             f"{', '.join(specs)})")
    if item.get("datatype") != spec.datatype:
        raise InvalidRequest(f"{where}: datatype {item.get('datatype')!r} does not match "
                             f"the model's {spec.datatype}")
    shape = _checked_shape(item.get("shape"), spec, where, max_batch_size)
    count = math.prod(shape)
    if count > max_elements:
        raise PayloadTooLarge(f"{where}: {count} elements, more than the limit of "
                              f"{max_elements}")
    if not isinstance(item.get("parameters", {}), dict):
        raise InvalidRequest(f"{where}.parameters must be an object")
    span = item.get("data")
    if type(span) is not int or span in used or not 0 <= span < span_count:
        raise InvalidRequest(f"{where}: a large JSON body needs 'data' as a plain array "
                             f"of numbers")
    if spec.datatype not in _INTEGER_TYPES | _FLOAT_TYPES:
        raise PayloadTooLarge(f"{where}: {spec.datatype} data over {LARGE_JSON_BYTES} "
                              f"bytes of JSON must use the binary tensor extension")
    return item, spec, shape, count, span, where


def _checked_shape(shape: Any, spec: TensorSpec, where: str, max_batch_size: int) -> list[int]:
    """``shape`` when it fits the model's (-1: any size) and ``max_batch_size``."""
    if not isinstance(shape, list) or len(shape) != len(spec.shape) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) \
            or any(w != -1 and g != w for g, w in zip(shape, spec.shape, strict=True)):
        raise InvalidRequest(f"{where}: shape {str(shape)[:80]} does not match the "
                             f"model's {list(spec.shape)} (-1 is any size)")
    if shape[0] > max_batch_size:
        raise PayloadTooLarge(f"{where}: batch of {shape[0]} rows is more than "
                              f"max_batch_size {max_batch_size}")
    return shape
