"""Import checkpoints encrypted by Intel's sgx-pytorch (``to_secure_mkldnn``).

sgx-pytorch encrypts each converted tensor on its own with AES-128-GCM and no associated
data, and keeps the ciphertext in a 1-D ``torch.int32`` buffer ``P.encrypted_<field>``
beside the module's own (zeroed) parameter.  One buffer, as little-endian bytes::

    u32 ndim | u32 dims[ndim] | 100 reserved bytes | 12-byte IV | 16-byte tag | ciphertext

The reserved block holds a u32 dtype code at +0 (0 = float32, 1 = float16) and a 4-byte
model id at +4; the rest is zero.  Nothing follows the ciphertext.

Because nothing binds a buffer to its name, an attacker could have swapped two buffers of
the same shape; the importer cannot detect that (the format cannot), which is one reason to
re-seal under sealedtorch's format, where every chunk is bound to its file, tensor and
position.  What it does check, strictly, is everything the format does say: the header's
shape against the module's placeholder tensor, the buffer length against the header, the
dtype code, the reserved bytes, the model id (one per file), and the GCM tag of each buffer.

The rebuilt state dict uses the original names: ``P.weight``, ``P.bias``,
``P.running_mean``, ``P.running_var``.  Two things the conversion threw away are restored
and documented (docs/format.md): BatchNorm's ``num_batches_tracked`` comes back as 0 (it
only matters for training with ``momentum=None``), and the all-zero ``bias`` that
sgx-pytorch adds to a bias-less Conv2d is dropped (``keep_zero_conv_bias=True`` keeps it).
The plaintext BatchNorm statistics that the conversion left beside their encrypted copies
are not trusted: they must equal the decrypted values, or the import fails.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import crypto
from ...errors import FormatError, IntegrityError

__all__ = ["SGX_PYTORCH_FIELDS", "SgxPytorchImport", "import_sgx_pytorch"]

#: ``encrypted_<field>`` buffer suffix -> the state-dict name it decrypts to.
SGX_PYTORCH_FIELDS: Mapping[str, str] = {
    "encrypted_weight": "weight",
    "encrypted_bias": "bias",
    "encrypted_mean": "running_mean",
    "encrypted_var": "running_var",
}
_RESERVED = 100
_IV = crypto.LEGACY_SGX_PYTORCH_IV_SIZE
_TAG = crypto.TAG_SIZE
_DTYPES: Mapping[int, torch.dtype] = {0: torch.float32, 1: torch.float16}
_MAX_NDIM = 8


@dataclass(frozen=True)
class SgxPytorchImport:
    """The plaintext state dict rebuilt from an sgx-pytorch checkpoint, and what was done."""

    state_dict: dict[str, torch.Tensor]
    decrypted: tuple[str, ...]
    source_model_id: bytes
    dropped_zero_biases: tuple[str, ...]
    restored_counters: tuple[str, ...]


def _buffer_bytes(name: str, buf: torch.Tensor) -> bytes:
    if buf.dtype != torch.int32 or buf.dim() != 1:
        raise FormatError(f"{name}: an sgx-pytorch buffer is a 1-D int32 tensor, got "
                          f"{buf.dtype} with shape {tuple(buf.shape)}")
    return buf.contiguous().numpy().astype("<i4", copy=False).tobytes()


def _decrypt_buffer(name: str, raw: bytes, key: bytes) -> tuple[torch.Tensor, bytes]:
    """Parse and open one ``encrypted_*`` buffer; returns the tensor and its model id."""
    if len(raw) < 4:
        raise FormatError(f"{name}: truncated buffer ({len(raw)} bytes, no header)")
    (ndim,) = struct.unpack_from("<I", raw, 0)
    if ndim > _MAX_NDIM:
        raise FormatError(f"{name}: header says {ndim} dimensions (at most {_MAX_NDIM})")
    head = 4 + 4 * ndim
    if len(raw) < head + _RESERVED + _IV + _TAG:
        raise FormatError(f"{name}: truncated buffer ({len(raw)} bytes, header needs "
                          f"{head + _RESERVED + _IV + _TAG})")
    dims = struct.unpack_from(f"<{ndim}I", raw, 4)
    reserved = raw[head:head + _RESERVED]
    (code,) = struct.unpack_from("<I", reserved, 0)
    model_id = reserved[4:8]
    if code not in _DTYPES:
        raise FormatError(f"{name}: unknown dtype code {code} (0 = float32, 1 = float16)")
    if any(reserved[8:]):
        raise FormatError(f"{name}: reserved header bytes are not zero")
    dtype = _DTYPES[code]
    numel = 1
    for d in dims:
        numel *= d
    body = numel * torch.empty((), dtype=dtype).element_size()
    start = head + _RESERVED
    expected = start + _IV + _TAG + body
    # The buffer is whole int32 words: at most 3 bytes of zero padding after the ciphertext.
    if not expected <= len(raw) < expected + 4 or any(raw[expected:]):
        raise FormatError(
            f"{name}: header says {tuple(dims)} {str(dtype).removeprefix('torch.')} "
            f"({body} bytes of ciphertext) but the buffer holds "
            f"{len(raw) - start - _IV - _TAG} bytes after its header")
    iv = raw[start:start + _IV]
    tag = raw[start + _IV:start + _IV + _TAG]
    ciphertext = raw[start + _IV + _TAG:expected]
    plain = crypto.legacy_sgx_pytorch_decrypt(key, iv, ciphertext, tag, what=name)
    tensor = torch.frombuffer(bytearray(plain), dtype=dtype).reshape(dims) if body else \
        torch.empty(dims, dtype=dtype)
    return tensor, model_id


def _load(path: Path) -> dict[str, torch.Tensor]:
    from ..plainfiles import load_plain

    if path.suffix not in {".pt", ".pth"}:
        raise FormatError(f"{path}: expected the .pt/.pth file that sgx-pytorch saved")
    state, _ = load_plain(path)  # weights_only=True: nothing in the file can run code
    return state


def import_sgx_pytorch(path: str | os.PathLike[str], key: bytes, *,
                       expect_model_id: bytes | None = None,
                       keep_zero_conv_bias: bool = False) -> SgxPytorchImport:
    """Decrypt every ``encrypted_*`` buffer of an sgx-pytorch checkpoint.

    Raises:
        FormatError: the file is not a state dict, a buffer's header disagrees with its
            length or with the module's placeholder tensor, or buffers name different
            model ids (or not ``expect_model_id``).
        IntegrityError: a buffer's GCM tag does not verify (wrong key, modified byte), or a
            plaintext BatchNorm statistic differs from its encrypted copy.
    """
    p = Path(path)
    if len(key) != crypto.LEGACY_SGX_PYTORCH_KEY_SIZE:
        raise FormatError(f"an sgx-pytorch key is {crypto.LEGACY_SGX_PYTORCH_KEY_SIZE} bytes "
                          f"(32 hex digits), got {len(key)}")
    state = _load(p)
    buffers = {k: v for k, v in state.items()
               if k.rpartition(".")[2] in SGX_PYTORCH_FIELDS}
    if not buffers:
        raise FormatError(f"{p}: no encrypted_* buffers: not a checkpoint converted by "
                          "sgx-pytorch's to_secure_mkldnn")
    out = {k: v for k, v in state.items() if k not in buffers}
    model_ids: set[bytes] = set()
    decrypted: list[str] = []
    bn_prefixes: list[str] = []
    for name in sorted(buffers):
        prefix, _, field_name = name.rpartition(".")
        target = f"{prefix}.{SGX_PYTORCH_FIELDS[field_name]}" if prefix else \
            SGX_PYTORCH_FIELDS[field_name]
        tensor, model_id = _decrypt_buffer(name, _buffer_bytes(name, buffers[name]), key)
        model_ids.add(model_id)
        placeholder = state.get(target)
        if placeholder is not None and tuple(placeholder.shape) != tuple(tensor.shape):
            raise FormatError(f"{name}: header shape {tuple(tensor.shape)} disagrees with "
                              f"{target} {tuple(placeholder.shape)}")
        if field_name in {"encrypted_mean", "encrypted_var"}:
            if placeholder is not None and not torch.equal(
                    placeholder.to(tensor.dtype), tensor):
                raise IntegrityError(
                    f"{target}: the plaintext copy left beside {name} differs from the "
                    "authenticated value (modified file?)")
            if field_name == "encrypted_mean":
                bn_prefixes.append(prefix)
        out[target] = tensor
        decrypted.append(target)
    if len(model_ids) != 1:
        raise FormatError(f"{p}: buffers name {len(model_ids)} different model ids "
                          f"({', '.join(sorted(m.hex() for m in model_ids))})")
    (source_id,) = model_ids
    if expect_model_id is not None and source_id != expect_model_id:
        raise FormatError(f"{p}: buffers are for sgx-pytorch model id {source_id.hex()}, "
                          f"not {expect_model_id.hex()}")
    dropped: list[str] = []
    if not keep_zero_conv_bias:
        for name in list(decrypted):
            prefix, _, leaf = name.rpartition(".")
            weight = out.get(f"{prefix}.weight" if prefix else "weight")
            if leaf == "bias" and weight is not None and weight.dim() == 4 \
                    and not out[name].any():
                del out[name]
                dropped.append(name)
    restored: list[str] = []
    for prefix in bn_prefixes:
        counter = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
        if counter not in out:
            out[counter] = torch.tensor(0, dtype=torch.int64)
            restored.append(counter)
    return SgxPytorchImport(out, tuple(decrypted), source_id, tuple(dropped), tuple(restored))
