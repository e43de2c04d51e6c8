"""The ``.sealed`` file layout: constants, the preamble, key derivation and AAD.

This module is the executable form of docs/format.md; writer and reader share it so they
cannot drift apart.  See that document for the byte-level specification.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from .. import crypto
from ..errors import FormatError, IntegrityError
from ..keys import ModelKey

MAGIC = b"\x89STSEAL\n"
FORMAT_VERSION = 1
CIPHER_AES256GCM_HKDF_SHA256 = 1
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 64 << 20
MAX_HEADER_SIZE = 64 << 20
TAG_SIZE = crypto.TAG_SIZE
SALT_SIZE = 32

# magic, version, cipher, flags, key_version, salt, key_check, chunk_size, header_len,
# data_len, chunk_count, model_id_len
_FIXED = struct.Struct("<8sHBBI32s16sIIQQH")
FIXED_SIZE = _FIXED.size  # 90
_IDENT_SIZE = 12  # magic + version + cipher + flags: what FormatError (not IntegrityError) covers

_INFO_HEADER = b"sealedtorch/format/v1/header-key"
_INFO_DATA = b"sealedtorch/format/v1/data-key"
_INFO_CHECK = b"sealedtorch/format/v1/key-check"
_AAD_HEADER = b"sealedtorch/format/v1/header"
_AAD_CHUNK = b"sealedtorch/format/v1/chunk"

# Every dtype a state_dict may hold, by its stable on-disk name.
_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
]
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Preamble:
    """The plaintext part: enough to route the file to its key, nothing about the model."""

    model_id: str
    key_version: int
    salt: bytes
    key_check: bytes
    chunk_size: int
    header_length: int
    data_length: int
    chunk_count: int
    format_version: int = FORMAT_VERSION
    cipher: int = CIPHER_AES256GCM_HKDF_SHA256
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def size(self) -> int:
        return FIXED_SIZE + len(self.model_id.encode())

    @property
    def data_offset(self) -> int:
        return self.size + self.header_length

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_length + self.chunk_count * TAG_SIZE

    def encode(self) -> bytes:
        mid = self.model_id.encode()
        return _FIXED.pack(MAGIC, self.format_version, self.cipher, 0, self.key_version,
                           self.salt, self.key_check, self.chunk_size, self.header_length,
                           self.data_length, self.chunk_count, len(mid)) + mid

    def to_json(self) -> dict[str, object]:
        return {"format_version": self.format_version, "cipher": "AES-256-GCM/HKDF-SHA256",
                "model_id": self.model_id, "key_version": self.key_version,
                "chunk_size": self.chunk_size, "chunk_count": self.chunk_count,
                "header_length": self.header_length, "data_length": self.data_length,
                "file_size": self.file_size, "salt": self.salt.hex()}


def parse_preamble(head: bytes, *, source: str) -> Preamble:
    """Parse the preamble from the first bytes of a file.

    The identification fields (magic, version, cipher, flags) raise :class:`FormatError`;
    once a file is identified, any other inconsistency is an :class:`IntegrityError`,
    because it can only come from corruption or tampering.
    """
    if len(head) < _IDENT_SIZE or head[:8] != MAGIC:
        raise FormatError(f"{source}: not a sealedtorch file (bad magic)")
    version, cipher, flags = struct.unpack_from("<HBB", head, 8)
    if version != FORMAT_VERSION:
        raise FormatError(f"{source}: unsupported format version {version} "
                          f"(this sealedtorch reads version {FORMAT_VERSION})")
    if cipher != CIPHER_AES256GCM_HKDF_SHA256:
        raise FormatError(f"{source}: unsupported cipher id {cipher}")
    if flags != 0:
        raise FormatError(f"{source}: unsupported flags {flags:#x}")
    if len(head) < FIXED_SIZE:
        raise IntegrityError(f"{source}: file is truncated inside the preamble")
    (_, _, _, _, key_version, salt, key_check, chunk_size, header_length, data_length,
     chunk_count, mid_len) = _FIXED.unpack_from(head)
    if len(head) < FIXED_SIZE + mid_len:
        raise IntegrityError(f"{source}: file is truncated inside the preamble")
    try:
        model_id = head[FIXED_SIZE:FIXED_SIZE + mid_len].decode()
    except UnicodeDecodeError:
        raise IntegrityError(f"{source}: preamble is corrupt (model id is not UTF-8)") from None
    problems = []
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % 64 == 0):
        problems.append(f"chunk size {chunk_size}")
    if not TAG_SIZE < header_length <= MAX_HEADER_SIZE:
        problems.append(f"header length {header_length}")
    if key_version == 0 or mid_len == 0:
        problems.append("key version or model id")
    if not problems and not chunks_of(data_length, chunk_size) <= chunk_count <= data_length:
        problems.append(f"chunk count {chunk_count}")
    if problems:
        raise IntegrityError(f"{source}: preamble is corrupt ({', '.join(problems)})")
    return Preamble(model_id=model_id, key_version=key_version, salt=salt, key_check=key_check,
                    chunk_size=chunk_size, header_length=header_length,
                    data_length=data_length, chunk_count=chunk_count,
                    raw=bytes(head[:FIXED_SIZE + mid_len]))


@dataclass(frozen=True)
class FileKeys:
    """Per-file keys derived from the model key and the file's random salt."""

    header: crypto.Aead
    data: crypto.Aead
    check: bytes = field(repr=False)

    @classmethod
    def derive(cls, key: ModelKey, salt: bytes) -> FileKeys:
        return cls(
            header=crypto.Aead(crypto.hkdf_sha256(key.secret, salt=salt, info=_INFO_HEADER)),
            data=crypto.Aead(crypto.hkdf_sha256(key.secret, salt=salt, info=_INFO_DATA)),
            check=crypto.hkdf_sha256(key.secret, salt=salt, info=_INFO_CHECK, length=16),
        )


def header_aad(preamble_raw: bytes) -> bytes:
    return _AAD_HEADER + preamble_raw


def file_digest(preamble_raw: bytes, header_ciphertext: bytes) -> bytes:
    """SHA-256 over preamble and encrypted header: every chunk's AAD carries it."""
    return crypto.sha256(preamble_raw, header_ciphertext)


def chunk_aad(digest: bytes, index: int, last: bool) -> bytes:
    return _AAD_CHUNK + digest + struct.pack("<QB", index, 1 if last else 0)


def chunks_of(nbytes: int, chunk_size: int) -> int:
    """Chunks a tensor of ``nbytes`` occupies: chunks never span two tensors."""
    return -(-nbytes // chunk_size)
