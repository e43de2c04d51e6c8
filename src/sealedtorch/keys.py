"""Model keys: the in-memory object and the owner's key file.

A model key is 32 random bytes identified by (model id, key version).  It exists in
plaintext only in the owner's key file (mode 0600, never overwritten), in the keyserver's
memory while wrapping/sealing, and inside the TEE.  ``repr`` never shows the secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from . import crypto, secretfile
from .errors import KeyFileError

KEY_FILE_TYPE = "sealedtorch-model-key"
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def validate_model_id(model_id: str) -> str:
    """Model ids are short printable names: they appear in URLs, logs and file preambles."""
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id):
        raise ValueError(
            f"invalid model id {model_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ : / -, "
            "starting with a letter or digit")
    return model_id


@dataclass(frozen=True)
class ModelKey:
    model_id: str
    version: int
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        validate_model_id(self.model_id)
        if not isinstance(self.version, int) or not 1 <= self.version < 2**32:
            raise ValueError("key version must be an integer in 1..2^32-1")
        if len(self.secret) != crypto.KEY_SIZE:
            raise ValueError(f"a model key is {crypto.KEY_SIZE} bytes, got {len(self.secret)}")

    @classmethod
    def generate(cls, model_id: str, version: int = 1) -> ModelKey:
        return cls(model_id, version, crypto.generate_key())

    def to_json(self) -> dict[str, Any]:
        """The key file's content.  Only the owner's tools ever serialise a key."""
        return {"type": KEY_FILE_TYPE, "model_id": self.model_id, "key_version": self.version,
                "key": base64.b64encode(self.secret).decode()}

    @classmethod
    def from_json(cls, data: Any, *, source: str = "key") -> ModelKey:
        if not isinstance(data, dict):
            raise KeyFileError(f"{source}: expected a JSON object")
        if data.get("type", KEY_FILE_TYPE) != KEY_FILE_TYPE:
            raise KeyFileError(f"{source}: not a sealedtorch model key (type {data.get('type')!r})")
        missing = [k for k in ("model_id", "key_version", "key") if k not in data]
        if missing:
            raise KeyFileError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            secret = base64.b64decode(data["key"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise KeyFileError(f"{source}: 'key' is not valid base64") from None
        try:
            return cls(data["model_id"], data["key_version"], secret)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{source}: {exc}") from None


@runtime_checkable
class KeySource(Protocol):
    """Anything that can hand out a model key: a key file, a keycache client, ..."""

    def get_key(self, model_id: str, version: int | None = None) -> ModelKey: ...


def write_key_file(path: str | os.PathLike[str], key: ModelKey) -> Path:
    """Write ``key`` to a new file with mode 0600.  Refuses to overwrite anything."""
    payload = (json.dumps(key.to_json(), indent=2) + "\n").encode()
    return secretfile.write_new(path, payload, what="a key file")


def read_key_file(path: str | os.PathLike[str]) -> ModelKey:
    """Read a key file; any problem is a :class:`KeyFileError` naming the file."""
    p = Path(path)
    raw = secretfile.read_private(p, what="key file")
    if len(raw) > 64 * 1024:
        raise KeyFileError(f"{p}: too large to be a key file")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeyFileError(f"{p}: not valid JSON (corrupt key file?)") from None
    return ModelKey.from_json(data, source=str(p))


class StaticKeys:
    """A :class:`KeySource` over keys already in memory (tests, owner tools)."""

    def __init__(self, *keys: ModelKey) -> None:
        self._keys = {(k.model_id, k.version): k for k in keys}

    def get_key(self, model_id: str, version: int | None = None) -> ModelKey:
        from .errors import KeyUnavailable

        if version is None:
            versions = [v for (m, v) in self._keys if m == model_id]
            if not versions:
                raise KeyUnavailable(f"no key for model {model_id!r}")
            version = max(versions)
        try:
            return self._keys[(model_id, version)]
        except KeyError:
            raise KeyUnavailable(f"no key for model {model_id!r} version {version}") from None


def resolve_key_source(key: str | os.PathLike[str] | ModelKey | KeySource) -> KeySource:
    """Accept what the public API accepts as ``key=`` and return a key source."""
    if isinstance(key, ModelKey):
        return StaticKeys(key)
    if isinstance(key, str | os.PathLike):
        return StaticKeys(read_key_file(key))
    if isinstance(key, KeySource):
        return key
    raise TypeError("key must be a key file path, a ModelKey or an object with get_key()")
