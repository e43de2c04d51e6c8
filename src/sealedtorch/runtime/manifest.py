"""Owner-signed manifests: the owner vouches for one sealed file, so a runtime can pin the
*owner* instead of one file's digest (new files and key versions without a new measurement).

A manifest sits next to the sealed file (``model.sealed.manifest``)::

    {"type": "sealedtorch-manifest", "version": 1, "model_id": "resnet50", "key_version": 2,
     "sha256": "<hex SHA-256 of the .sealed file>", "signer": "<hex Ed25519 public key>",
     "signature": "<base64 Ed25519 signature>"}

The signature is over :func:`sealedtorch.crypto.transcript` (``"sealedtorch/model-manifest/
v1"``, model id, u32be(key version), the 32-byte digest).  A runtime configuration whose
``models.NAME.manifest_keys`` lists the owner's public key(s) refuses a file without a
manifest, with a manifest signed by another key, or whose manifest names another model,
version or digest — all before any key is requested (:class:`ModelMismatch`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import crypto, secretfile
from ..errors import FormatError, KeyFileError, ModelMismatch

__all__ = ["MANIFEST_LABEL", "MANIFEST_SUFFIX", "Manifest", "generate_signing_key",
           "load_signing_key", "manifest_path", "read_manifest", "sign_manifest",
           "verify_manifest"]

MANIFEST_LABEL = b"sealedtorch/model-manifest/v1"
MANIFEST_SUFFIX = ".manifest"
_TYPE = "sealedtorch-manifest"


@dataclass(frozen=True)
class Manifest:
    model_id: str
    key_version: int
    sha256: str
    signer: bytes
    signature: bytes

    def signed_parts(self) -> tuple[bytes, ...]:
        return (self.model_id.encode(), self.key_version.to_bytes(4, "big"),
                bytes.fromhex(self.sha256))

    def to_json(self) -> dict[str, object]:
        return {"type": _TYPE, "version": 1, "model_id": self.model_id,
                "key_version": self.key_version, "sha256": self.sha256,
                "signer": self.signer.hex(),
                "signature": base64.b64encode(self.signature).decode()}


def manifest_path(sealed: str | os.PathLike[str]) -> Path:
    """Where the manifest of ``sealed`` lives: the same path plus ``.manifest``."""
    p = Path(sealed)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def generate_signing_key(path: str | os.PathLike[str]) -> crypto.SigningKey:
    """A new owner signing key, written to ``path`` (mode 0600, never overwritten)."""
    key = crypto.SigningKey.generate()
    secretfile.write_new(path, key.to_pem(), what="manifest signing key")
    return key


def load_signing_key(path: str | os.PathLike[str]) -> crypto.SigningKey:
    raw = secretfile.read_private(path, what="manifest signing key")
    try:
        return crypto.SigningKey.from_pem(raw)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not an Ed25519 private key (PEM): {exc}") from None


def sign_manifest(sealed: str | os.PathLike[str], key: crypto.SigningKey, *,
                  overwrite: bool = False) -> Path:
    """Sign the manifest of the sealed file ``sealed`` (model id and key version from its
    preamble, digest of its bytes) and write it next to it; returns the manifest's path."""
    from ..format import read_preamble

    preamble = read_preamble(sealed)
    digest = crypto.sha256_file(sealed)
    unsigned = Manifest(preamble.model_id, preamble.key_version, digest.hex(),
                        key.public_bytes, b"")
    signature = crypto.sign_transcript(key, MANIFEST_LABEL, *unsigned.signed_parts())
    manifest = Manifest(unsigned.model_id, unsigned.key_version, unsigned.sha256,
                        key.public_bytes, signature)
    out = manifest_path(sealed)
    if out.exists() and not overwrite:
        raise KeyFileError(f"{out}: already exists; refusing to overwrite the manifest "
                           f"(pass overwrite=True / --force)")
    out.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return out


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse a manifest; :class:`FormatError` naming what is wrong."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{p}: no manifest (the configuration requires an owner-signed "
                          f"manifest next to the sealed file)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{p}: not a readable JSON manifest: {exc}") from None
    if not isinstance(doc, dict) or doc.get("type") != _TYPE or doc.get("version") != 1:
        raise FormatError(f"{p}: not a sealedtorch manifest (type/version)")
    try:
        model_id, version, digest = doc["model_id"], doc["key_version"], doc["sha256"]
        signer = bytes.fromhex(doc["signer"])
        signature = base64.b64decode(doc["signature"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise FormatError(f"{p}: malformed manifest field: {exc}") from None
    if not isinstance(model_id, str) or isinstance(version, bool) or \
            not isinstance(version, int) or not 1 <= version < 2**32 or \
            not isinstance(digest, str) or len(digest) != 64 or len(signer) != 32:
        raise FormatError(f"{p}: malformed manifest (model_id, key_version, sha256, signer)")
    try:
        bytes.fromhex(digest)
    except ValueError:
        raise FormatError(f"{p}: manifest sha256 is not hex") from None
    return Manifest(model_id, version, digest.lower(), signer, signature)


def verify_manifest(manifest: Manifest, trusted: Sequence[bytes], *, model_id: str,
                    key_version: int, file_sha256: str, label: str) -> None:
    """Raise :class:`ModelMismatch` unless a ``trusted`` key signed ``manifest`` and it
    names exactly this model id, key version and file digest."""
    if manifest.signer not in trusted:
        raise ModelMismatch(f"{label}: the manifest is signed by {manifest.signer.hex()}, "
                            f"not by an owner key the configuration trusts; nothing decrypted")
    if not crypto.verify_transcript(manifest.signer, manifest.signature, MANIFEST_LABEL,
                                    *manifest.signed_parts()):
        raise ModelMismatch(f"{label}: the manifest's signature does not verify (forged or "
                            f"modified manifest); nothing decrypted")
    if (manifest.model_id, manifest.key_version) != (model_id, key_version):
        raise ModelMismatch(f"{label}: the manifest vouches for {manifest.model_id!r} version "
                            f"{manifest.key_version}, the file is {model_id!r} version "
                            f"{key_version}; nothing decrypted")
    if manifest.sha256 != file_sha256:
        raise ModelMismatch(f"{label}: the file's SHA-256 is {file_sha256}, the owner's "
                            f"manifest vouches for {manifest.sha256}; nothing decrypted")
