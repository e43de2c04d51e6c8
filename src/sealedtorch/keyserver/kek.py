"""Key-encryption-key (KEK) providers: what wraps model keys at rest.

The store only ever holds *wrapped* model keys.  A :class:`KekProvider` wraps and unwraps
them; the associated data binds each wrapped key to its model id and version, so a wrapped
key copied onto another record (or another version) fails to unwrap instead of releasing
the wrong key.  :class:`FileKek` keeps a 256-bit KEK in a 0600 file; an HSM provider
(PKCS#11, a later issue) implements the same protocol without ever exposing its KEK.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from .. import crypto
from ..errors import ConfigError, KeyFileError

KEK_FILE_TYPE = "sealedtorch-keyserver-kek"
_AAD_LABEL = b"sealedtorch/model-key/v1\x00"


def key_aad(model_id: str, version: int) -> bytes:
    """AES-GCM associated data for a wrapped model key: label ‖ model id ‖ 0 ‖ u32be(version).
    Model ids never contain NUL (see :func:`sealedtorch.keys.validate_model_id`)."""
    return _AAD_LABEL + model_id.encode() + b"\x00" + version.to_bytes(4, "big")


@runtime_checkable
class KekProvider(Protocol):
    """Wraps model keys for storage.  ``kek_id`` names the KEK a record was wrapped under
    (stored beside it, so a KEK rotation can find what still needs re-wrapping)."""

    kek_id: str

    def wrap(self, key: bytes, *, model_id: str, version: int) -> bytes: ...

    def unwrap(self, wrapped: bytes, *, model_id: str, version: int) -> bytes: ...


class FileKek:
    """A KEK held in a local file (JSON, mode 0600).  Suitable for one keyserver on a host
    the owner controls; use an HSM provider where the KEK must not exist in host memory."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != crypto.KEY_SIZE:
            raise ValueError("a KEK is 32 bytes")
        self._kek = kek
        self.kek_id = "file:" + crypto.sha256(b"sealedtorch/kek-id/v1\x00", kek)[:8].hex()

    def __repr__(self) -> str:
        return f"FileKek(kek_id={self.kek_id!r})"

    @classmethod
    def load(cls, path: Path | str) -> FileKek:
        p = Path(path)
        try:
            st = p.stat()
            raw = p.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"KEK file not found: {p}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read KEK file {p}: {exc.strerror}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyFileError(f"{p}: KEK file is readable by group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {p}`")
        try:
            data = json.loads(raw)
            if data.get("type") != KEK_FILE_TYPE:
                raise ValueError("wrong type")
            kek = base64.b64decode(data["kek"], validate=True)
            return cls(kek)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise KeyFileError(f"{p}: not a sealedtorch KEK file") from None

    @classmethod
    def create(cls, path: Path | str) -> FileKek:
        """Generate a KEK and write it to a new 0600 file (never overwrites)."""
        p = Path(path)
        kek = crypto.generate_key()
        payload = json.dumps({"type": KEK_FILE_TYPE,
                              "kek": base64.b64encode(kek).decode()}).encode() + b"\n"
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(f"{p}: already exists; refusing to overwrite a KEK") from None
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(kek)

    def wrap(self, key: bytes, *, model_id: str, version: int) -> bytes:
        return crypto.wrap_key(self._kek, key, key_aad(model_id, version))

    def unwrap(self, wrapped: bytes, *, model_id: str, version: int) -> bytes:
        return crypto.unwrap_key(self._kek, wrapped, key_aad(model_id, version))
