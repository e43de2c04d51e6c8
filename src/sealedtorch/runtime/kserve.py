"""The Open Inference Protocol (KServe v2) REST wire format, both directions.

Server side: :func:`parse_infer_request` turns a request body into validated tensors (or a
:class:`InvalidRequest` / :class:`PayloadTooLarge` naming the problem), and
:func:`encode_infer_response` writes the answer.  Client side: :func:`encode_infer_request`
and :func:`decode_infer_response`.

Tensor data travels either as JSON (``"data"``: a flat row-major list, nested lists are
accepted too) or with the binary tensor data extension: the body is the JSON header followed
by the raw little-endian bytes of each tensor, the header's length is given in the
``Inference-Header-Content-Length`` HTTP header, and each binary tensor says its byte size
in ``parameters.binary_data_size``.  A client asks for binary outputs per output
(``outputs[i].parameters.binary_data``) or for all (``parameters.binary_data_output``).
``BYTES`` tensors (text) are served for transformers models by
:mod:`sealedtorch.runtime.text_kserve`; numeric models take numeric tensors.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InvalidRequest, PayloadTooLarge, RequestError  # noqa: F401 (re-exported)

__all__ = [
    "DATATYPES", "HEADER_LENGTH", "REQUEST_FIELDS", "InferRequest", "InvalidRequest",
    "PayloadTooLarge",
    "RequestedOutput", "TensorSpec", "check_version", "datatype_of", "decode_infer_response",
    "encode_infer_request", "encode_infer_request_parts", "encode_infer_response",
    "parse_infer_parts", "parse_infer_request",
]

#: The HTTP header of the binary tensor data extension.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: KServe v2 datatype -> torch dtype.
DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16,
    "UINT32": torch.uint32, "UINT64": torch.uint64, "INT8": torch.int8,
    "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64,
    "FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32,
    "FP64": torch.float64,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in DATATYPES.items()}
# JSON data: which numpy kinds each datatype accepts (b=bool, i/u=integer, f=float).
_KINDS = {"BOOL": "b", "FP16": "iuf", "BF16": "iuf", "FP32": "iuf", "FP64": "iuf"}
_LITTLE = sys.byteorder == "little"


_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_version(value: Any, where: str = "serving version") -> str:
    """A KServe model version as it appears in ``/v2/models/{m}/versions/{v}``: 1 to 64
    letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit (so it is one
    URL path segment as written)."""
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise ConfigError(f"{where} must be 1-64 letters, digits, '.', '_' or '-' (starting "
                          f"with a letter or digit), got {str(value)[:80]!r}")
    return value


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"no KServe v2 datatype for {dtype}") from None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, KServe datatype, shape (-1: any size).  The
    first dimension is always the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES and self.datatype != "BYTES":
            raise ValueError(f"{self.name}: unknown datatype {self.datatype!r}")
        if not self.shape or any(not isinstance(d, int) or d < -1 or d == 0
                                 for d in self.shape):
            raise ValueError(f"{self.name}: shape must be a non-empty list of -1 or "
                             f"positive integers, got {list(self.shape)}")

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (``BYTES``, text, has none: see runtime/text_kserve.py)."""
        if self.datatype == "BYTES":
            raise ValueError(f"{self.name}: BYTES tensors have no torch dtype")
        return DATATYPES[self.datatype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Any) -> TensorSpec:
        if not isinstance(data, Mapping):
            raise ValueError("a tensor spec is an object with name, datatype and shape")
        return cls(str(data["name"]), str(data["datatype"]),
                   tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A validated request: tensors in the model's input order, all with ``rows`` rows."""

    id: str | None
    inputs: dict[str, torch.Tensor]
    outputs: list[RequestedOutput]
    rows: int

    @property
    def shape_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can be concatenated along the first dimension."""
        return tuple((n, t.dtype, tuple(t.shape[1:])) for n, t in self.inputs.items())


# --- server: requests -----------------------------------------------------------------

def parse_infer_request(body: bytes | bytearray, header_length: str | None, *,
                        inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                        max_batch_size: int, max_elements: int,
                        model_name: str | None = None,
                        model_versions: Sequence[str] = ()) -> InferRequest:
    """Validate ``body`` against the model's signature; return tensors ready to batch."""
    header, binary = split_body(body, header_length)
    return parse_infer_parts(header, binary, inputs=inputs, outputs=outputs,
                             max_batch_size=max_batch_size, max_elements=max_elements,
                             model_name=model_name, model_versions=model_versions,
                             header_length_given=header_length is not None)


#: Top-level request fields: the Open Inference Protocol's (``id``, ``parameters``,
#: ``inputs``, ``outputs``), plus ``model_name``/``model_version``, which the kserve SDK's
#: ``InferRequest`` and Triton's examples send (checked against the URL path).
REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs", "model_name",
                            "model_version"})


def parse_infer_parts(header: bytes | bytearray | memoryview,
                      binary: memoryview | torch.Tensor, *, inputs: Sequence[TensorSpec],
                      outputs: Sequence[TensorSpec], max_batch_size: int,
                      max_elements: int, model_name: str | None = None,
                      model_versions: Sequence[str] = (),
                      header_length_given: bool = True) -> InferRequest:
    """Like :func:`parse_infer_request`, with the JSON header and the binary data already
    apart.  ``binary`` may be a uint8 tensor: inputs then become views of it, without a
    copy, wherever their offset suits their dtype's alignment.

    ``model_name``/``model_versions``: the model (and the versions it answers to) that the
    URL path names; a body that names another is refused, so a client that sends a body
    meant for one model to another's URL learns it instead of getting the wrong answer.
    ``header_length_given``: whether the binary extension's header length was sent; a body
    that is not JSON then gets a hint about it."""
    doc = _request_document(header, header_length_given)
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidRequest("'id' must be a string")
    _check_model_fields(doc, model_name, model_versions)
    params = _params(doc.get("parameters"), "parameters")
    _check_request_parameters(params)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest("'inputs' must be a non-empty list")
    specs = {s.name: s for s in inputs}
    seen: dict[str, torch.Tensor] = {}
    offset = 0
    for index, item in enumerate(raw_inputs):
        name, spec, where = _input_spec(item, index, specs, seen)
        shape, count = _input_shape(item, spec, where, max_elements)
        size = _binary_size(item, spec, shape, count, where)
        if size is None:
            seen[name] = _from_json(item["data"], spec, shape, count, where)
            continue
        if offset + size > len(binary):
            raise InvalidRequest(f"{where}: binary data ends after the body "
                                 f"({len(binary) - offset} bytes left, {size} needed)")
        seen[name] = _from_bytes(binary[offset:offset + size], spec.dtype, shape, where)
        offset += size
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data follow the last "
                             f"binary input (wrong {HEADER_LENGTH} or binary_data_size?)")
    batch = _batch_rows(seen, specs, max_batch_size)
    requested = _requested_outputs(doc.get("outputs"), outputs,
                                   _flag(params, "binary_data_output", "parameters", False))
    ordered = {s.name: seen[s.name] for s in inputs}
    return InferRequest(req_id, ordered, requested, batch)


def _request_document(header: bytes | bytearray | memoryview,
                      header_length_given: bool) -> dict[str, Any]:
    """The request's JSON header as an object with only the protocol's top-level fields."""
    try:
        doc = json.loads(bytes(header))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(_not_json(header, exc, header_length_given)) from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object with an 'inputs' list")
    unknown = set(doc) - REQUEST_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown request field(s): {', '.join(sorted(unknown))} "
                             f"(allowed: {', '.join(sorted(REQUEST_FIELDS))})")
    return doc


def _input_spec(item: Any, index: int, specs: Mapping[str, TensorSpec],
                seen: Mapping[str, torch.Tensor]) -> tuple[str, TensorSpec, str]:
    """(name, the model's spec for it, where: the label errors name) of ``inputs[index]``;
    an input the model lacks, or one given twice, is refused."""
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be an object")
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidRequest(f"{where}: 'name' must be a string")
    where = f"{where} ({name!r})"
    if name not in specs:
        raise InvalidRequest(f"{where}: the model has no input named {name!r} (inputs: "
                             f"{', '.join(specs)})")
    if name in seen:
        raise InvalidRequest(f"{where}: input given twice")
    return name, specs[name], where


def _input_shape(item: Mapping[str, Any], spec: TensorSpec, where: str,
                 max_elements: int) -> tuple[list[int], int]:
    """(shape, element count) of one input, checked against the model's datatype and shape
    and the element limit."""
    shape = _shape(item.get("shape"), where)
    datatype = item.get("datatype")
    if datatype != spec.datatype:
        raise InvalidRequest(f"{where}: datatype {datatype!r} does not match the "
                             f"model's {spec.datatype}")
    _check_shape(shape, spec, where)
    count = math.prod(shape)
    if count > max_elements:
        raise PayloadTooLarge(f"{where}: {count} elements, more than the limit of "
                              f"{max_elements}")
    return shape, count


def _binary_size(item: Mapping[str, Any], spec: TensorSpec, shape: list[int], count: int,
                 where: str) -> int | None:
    """The byte size of an input sent with the binary extension (exactly what its shape
    and datatype need), or None when it carries JSON ``data``."""
    item_params = _params(item.get("parameters"), f"{where}.parameters")
    size = item_params.get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise InvalidRequest(f"{where}: no 'data' and no binary_data_size")
        return None
    if "data" in item:
        raise InvalidRequest(f"{where}: has both 'data' and binary_data_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequest(f"{where}: binary_data_size must be a non-negative "
                             f"integer")
    expected = count * spec.dtype.itemsize
    if size != expected:
        raise InvalidRequest(f"{where}: binary_data_size is {size} bytes, but shape "
                             f"{shape} of {spec.datatype} needs {expected}")
    return size


def _batch_rows(seen: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec],
                max_batch_size: int) -> int:
    """The request's batch size: every input given, all with the same first dimension,
    within ``max_batch_size``."""
    missing = [n for n in specs if n not in seen]
    if missing:
        raise InvalidRequest(f"missing input(s): {', '.join(missing)}")
    rows = {t.shape[0] for t in seen.values()}
    if len(rows) != 1:
        raise InvalidRequest(f"inputs disagree on the batch (first) dimension: "
                             f"{sorted(rows)}")
    batch = rows.pop()
    if batch > max_batch_size:
        raise PayloadTooLarge(f"batch of {batch} rows is more than max_batch_size "
                              f"{max_batch_size}")
    return batch


def split_body(body: bytes | bytearray, header_length: str | None
               ) -> tuple[memoryview, memoryview]:
    """(JSON header, binary data) of a body, by the binary extension's header length."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view):]
    try:
        n = int(header_length)
    except ValueError:
        raise InvalidRequest(f"{HEADER_LENGTH} must be an integer, got "
                             f"{header_length[:40]!r}") from None
    if not 0 < n <= len(view):
        raise InvalidRequest(f"{HEADER_LENGTH} {n} is outside the body of {len(view)} bytes")
    return view[:n], view[n:]


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be an object")
    return value


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise InvalidRequest(f"{where}: 'shape' must be a non-empty list of non-negative "
                             f"integers, got {str(value)[:80]}")
    return value


def _check_shape(shape: list[int], spec: TensorSpec, where: str) -> None:
    if len(shape) != len(spec.shape):
        raise InvalidRequest(f"{where}: shape {shape} has {len(shape)} dimensions, the model "
                             f"expects {len(spec.shape)} ({list(spec.shape)})")
    bad = [i for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True))
           if want != -1 and got != want]
    if bad:
        raise InvalidRequest(f"{where}: shape {shape} does not match the model's "
                             f"{list(spec.shape)} (-1 is any size) in dimension(s) "
                             f"{', '.join(map(str, bad))}")
    if shape[0] < 1:
        raise InvalidRequest(f"{where}: the first (batch) dimension must be at least 1")


def _from_bytes(data: memoryview | torch.Tensor, dtype: torch.dtype, shape: list[int],
                where: str = "tensor") -> torch.Tensor:
    """Raw little-endian bytes as a tensor: a view of ``data`` when it is a suitably aligned
    uint8 tensor, else a copy into fresh, aligned memory."""
    if dtype == torch.bool:
        raw = data if isinstance(data, torch.Tensor) else torch.from_numpy(
            np.frombuffer(data, dtype=np.uint8).copy())
        if raw.numel() and int(raw.max()) > 1:
            raise InvalidRequest(f"{where}: BOOL data must be bytes 0 or 1")
    if isinstance(data, torch.Tensor) and _LITTLE and (
            data.storage_offset() % dtype.itemsize == 0):
        return data.view(dtype).reshape(shape)
    out = torch.empty(shape, dtype=dtype)
    size = data.numel() if isinstance(data, torch.Tensor) else data.nbytes
    if size:
        dest = out.view(-1).view(torch.uint8)
        if isinstance(data, torch.Tensor):
            dest.copy_(data)
        else:
            dest.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        if not _LITTLE and dtype.itemsize > 1:  # pragma: no cover (big-endian hosts)
            out = torch.from_numpy(out.numpy().byteswap())
    return out


def _from_json(data: Any, spec: TensorSpec, shape: list[int], count: int,
               where: str) -> torch.Tensor:
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(f"{where}: 'data' is not a regular array of numbers: "
                             f"{exc}") from None
    if arr.size != count:
        raise InvalidRequest(f"{where}: 'data' has {arr.size} elements, shape {shape} needs "
                             f"{count}")
    kinds = _KINDS.get(spec.datatype, "iu")
    if arr.size and arr.dtype.kind not in kinds:
        what = {"b": "booleans", "iu": "integers", "iuf": "numbers"}[kinds]
        raise InvalidRequest(f"{where}: {spec.datatype} data must be {what}, got "
                             f"{_kind_name(arr.dtype)}")
    if arr.size and kinds == "iu":
        info = torch.iinfo(spec.dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise InvalidRequest(f"{where}: values outside the range of {spec.datatype} "
                                 f"({info.min}..{info.max})")
    if spec.datatype == "BF16":
        return torch.from_numpy(arr.astype(np.float32).reshape(shape)).to(torch.bfloat16)
    target = torch.empty(0, dtype=spec.dtype).numpy().dtype
    return torch.from_numpy(np.ascontiguousarray(arr.astype(target).reshape(shape)))


def _kind_name(dtype: np.dtype) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats",
            "U": "strings", "O": "mixed values"}.get(dtype.kind, str(dtype))


def _requested_outputs(value: Any, specs: Sequence[TensorSpec],
                       binary_default: bool) -> list[RequestedOutput]:
    names = [s.name for s in specs]
    if value is None:
        return [RequestedOutput(n, binary_default) for n in names]
    if not isinstance(value, list):
        raise InvalidRequest("'outputs' must be a list")
    out: list[RequestedOutput] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest(f"outputs[{index}] must be an object with a 'name'")
        name = item["name"]
        if name not in names:
            raise InvalidRequest(f"outputs[{index}]: the model has no output named {name!r} "
                                 f"(outputs: {', '.join(names)})")
        where = f"outputs[{index}].parameters"
        params = _params(item.get("parameters"), where)
        if params.get("classification") not in (None, 0):
            raise InvalidRequest(f"{where}: the classification extension is not supported "
                                 f"(ask for the raw output and rank it on the client)")
        out.append(RequestedOutput(name, _flag(params, "binary_data", where, binary_default)))
    return out


def _flag(params: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    """A boolean parameter: JSON true/false only.  The string "false" is truthy in Python,
    so accepting it would silently do the opposite of what the client asked."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{where}: {key!r} must be a JSON boolean (true or false), got "
                             f"{json.dumps(value)[:40]}")
    return value


def _check_model_fields(doc: Mapping[str, Any], model_name: str | None,
                        model_versions: Sequence[str]) -> None:
    name, version = doc.get("model_name"), doc.get("model_version")
    if name is not None:
        if not isinstance(name, str):
            raise InvalidRequest("'model_name' must be a string")
        if model_name is not None and name != model_name:
            raise InvalidRequest(f"'model_name' {name[:80]!r} does not match the model in the "
                                 f"URL path ({model_name!r})")
    if version is not None:
        if not isinstance(version, str):
            raise InvalidRequest("'model_version' must be a string")
        if version and model_versions and version not in model_versions:
            raise InvalidRequest(f"'model_version' {version[:40]!r} is not a version of this "
                                 f"model (versions: {', '.join(model_versions)})")


def _check_request_parameters(params: Mapping[str, Any]) -> None:
    if "binary_data_output" in params:
        _flag(params, "binary_data_output", "parameters", False)


def _not_json(header: bytes | bytearray | memoryview, exc: Exception,
              header_length_given: bool) -> str:
    """Why a request header is not JSON, with a hint where the body looks like the binary
    tensor data extension sent without (or with a wrong) header length."""
    message = f"request body is not valid JSON: {exc}"
    raw = bytes(header[:2])
    if raw[:2] == b"\x1f\x8b":
        return (f"{message}; the body looks gzip-compressed: send it with "
                f"'Content-Encoding: gzip'")
    looks_binary = isinstance(exc, UnicodeDecodeError) or (
        isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data")
    if looks_binary:
        if header_length_given:
            return (f"{message}; is {HEADER_LENGTH} the byte length of the JSON part only?")
        return (f"{message}; a body with binary tensor data needs the {HEADER_LENGTH} "
                f"header (the byte length of the JSON part before the raw tensor bytes)")
    return message


# --- BYTES (text) ---------------------------------------------------------------------

def encode_bytes(items: Sequence[bytes]) -> bytes:
    """The binary extension's BYTES encoding: u32le length ‖ bytes, per element."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_bytes(raw: memoryview | bytes | torch.Tensor, count: int,
                 where: str = "tensor") -> list[bytes]:
    """Split the BYTES encoding into ``count`` elements; anything else is refused."""
    if isinstance(raw, torch.Tensor):  # the server may hand the body over as uint8 tensor
        raw = raw.numpy().tobytes()
    view = memoryview(raw).cast("B")
    out: list[bytes] = []
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise InvalidRequest(f"{where}: BYTES element {i} has no length prefix")
        (n,) = struct.unpack_from("<I", view, pos)
        if pos + 4 + n > len(view):
            raise InvalidRequest(f"{where}: BYTES element {i} says {n} bytes, "
                                 f"{len(view) - pos - 4} remain")
        out.append(bytes(view[pos + 4:pos + 4 + n]))
        pos += 4 + n
    if pos != len(view):
        raise InvalidRequest(f"{where}: {len(view) - pos} bytes follow the last BYTES element")
    return out


# --- server: responses ----------------------------------------------------------------

def encode_infer_response(model_name: str, model_version: str | None, request_id: str | None,
                          tensors: Mapping[str, torch.Tensor | list[str]],
                          requested: Sequence[RequestedOutput]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs set the header length).
    A list of strings is a ``BYTES`` output of shape ``[len]`` (text models)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for r in requested:
        value = tensors[r.name]
        if isinstance(value, list):
            text: dict[str, Any] = {"name": r.name, "datatype": "BYTES", "shape": [len(value)]}
            if r.binary:
                raw = encode_bytes([v.encode() for v in value])
                text["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                text["data"] = value
            outputs.append(text)
            continue
        t = value.detach().cpu().contiguous()
        entry: dict[str, Any] = {"name": r.name, "datatype": datatype_of(t.dtype),
                                 "shape": list(t.shape)}
        if r.binary:
            raw = _to_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _to_list(t)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "outputs": outputs}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {"content-type": "application/octet-stream",
                                        HEADER_LENGTH: str(len(header))}


def _to_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _to_list(t: torch.Tensor) -> list[Any]:
    flat = t.reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    if flat.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return flat.numpy().tolist()
    return flat.tolist()


# --- client ---------------------------------------------------------------------------

def encode_infer_request(inputs: Mapping[str, Any], *, binary: bool = True,
                         binary_outputs: bool = True, outputs: Sequence[str] | None = None,
                         request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """Encode named tensors (torch or numpy) as a request body and its headers."""
    parts, headers = encode_infer_request_parts(
        inputs, binary=binary, binary_outputs=binary_outputs, outputs=outputs,
        request_id=request_id)
    del headers["content-length"]
    return b"".join(parts), headers


def encode_infer_request_parts(inputs: Mapping[str, Any], *, binary: bool = True,
                               binary_outputs: bool = True,
                               outputs: Sequence[str] | None = None,
                               request_id: str | None = None
                               ) -> tuple[list[bytes | memoryview], dict[str, str]]:
    """The body as a list of buffers (the tensors' own memory, not copies) and headers
    including ``content-length``: for streaming large inputs without joining them."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for name, value in inputs.items():
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        t = t.detach().cpu().contiguous()
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(t.dtype),
                                 "shape": list(t.shape)}
        if binary:
            raw = _memory_of(t)
            entry["parameters"] = {"binary_data_size": raw.nbytes}
            blobs.append(raw)
        else:
            entry["data"] = _to_list(t)
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}}
                          for n in outputs]
    elif binary_outputs:
        doc["parameters"] = {"binary_data_output": True}
    header = json.dumps(doc, separators=(",", ":")).encode()
    size = str(len(header) + sum(b.nbytes if isinstance(b, memoryview) else len(b)
                                 for b in blobs))
    if not blobs:
        return [header], {"content-type": "application/json", "content-length": size}
    return [header, *blobs], {"content-type": "application/octet-stream",
                              HEADER_LENGTH: str(len(header)), "content-length": size}


def _memory_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (little-endian hosts)."""
    if not _LITTLE:  # pragma: no cover (big-endian hosts)
        return memoryview(_to_bytes(t))
    flat = t.reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    return flat.view(torch.uint8).numpy().data.cast("B")  # ndarray.data: its own memory


def decode_infer_response(body: bytes, header_length: str | None) -> dict[str, Any]:
    """Named outputs from a response body (JSON or binary extension): tensors, and lists of
    strings for ``BYTES`` outputs (text)."""
    header, binary = split_body(body, header_length)
    doc = json.loads(bytes(header))
    out: dict[str, Any] = {}
    offset = 0
    for entry in doc.get("outputs", []):
        shape = [int(d) for d in entry["shape"]]
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if entry["datatype"] == "BYTES":
            if size is None:
                out[entry["name"]] = [str(v) for v in entry["data"]]
            else:
                out[entry["name"]] = [b.decode() for b in decode_bytes(
                    binary[offset:offset + size], math.prod(shape), entry["name"])]
                offset += size
            continue
        dtype = DATATYPES[entry["datatype"]]
        if size is not None:
            out[entry["name"]] = _from_bytes(binary[offset:offset + size], dtype, shape)
            offset += size
        else:
            data = np.asarray(entry["data"])
            if dtype == torch.bfloat16:
                out[entry["name"]] = torch.from_numpy(
                    data.astype(np.float32).reshape(shape)).to(dtype)
            else:
                np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
                out[entry["name"]] = torch.from_numpy(
                    np.ascontiguousarray(data.astype(np_dtype).reshape(shape)))
    return out
