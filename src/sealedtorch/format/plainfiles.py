"""Plaintext model files on the owner's side: what ``seal`` reads and ``unseal`` writes.

``.pt``/``.pth`` files are loaded with ``torch.load(weights_only=True)``: arbitrary pickled
objects are refused, never executed.  ``.safetensors`` round-trips our metadata and tied
tensors through two reserved ``__metadata__`` keys.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, UnsupportedTensorError

META_KEY = "sealedtorch.metadata"
ALIAS_KEY = "sealedtorch.aliases"


def load_plain(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a plaintext state_dict and its metadata from ``.pt``/``.pth``/``.safetensors``."""
    p = Path(path)
    if p.is_dir():
        from .importers.hf import is_hf_directory, read_hf_directory

        if is_hf_directory(p):
            found = read_hf_directory(p)
            return found.state_dict, found.metadata
        raise FormatError(f"{p}: a directory, but not a Hugging Face model directory (no "
                          "config.json); seal a .pt, .pth or .safetensors file or a "
                          "transformers model directory")
    if not p.is_file():
        raise FormatError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"{p}: refusing to load: the file contains objects other than tensors and plain "
            f"containers, and sealedtorch never unpickles arbitrary code ({exc})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise FormatError(f"{p}: not a readable torch.save file ({exc})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise FormatError(f"{p}: expected a state_dict (a dict of name -> tensor), got "
                          f"{type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UnsupportedTensorError(
            f"{p}: entries {bad[:5]} are not tensors; save model.state_dict() only")
    return dict(obj), {}


def _load_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{p}: not a readable safetensors file ({exc})") from None
    metadata = json.loads(meta[META_KEY]) if META_KEY in meta else {
        k: v for k, v in meta.items() if k != ALIAS_KEY}
    aliases = json.loads(meta.get(ALIAS_KEY, "{}"))
    ordered: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        ordered[name] = t
    for name, target in aliases.items():
        ordered[name] = ordered[target]
    return ordered, metadata


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
                     aliases: dict[str, str], path: str | os.PathLike[str], *,
                     overwrite: bool = False) -> Path:
    """Write atomically: a temporary file renamed into place only when complete."""
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise FormatError(f"{target}: already exists (use --force to replace)")
    own = {k: v.clone() for k, v in tensors.items() if k not in aliases}
    meta = {META_KEY: json.dumps(metadata), ALIAS_KEY: json.dumps(aliases)}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        try:
            save_file(own, tmp, metadata=meta)
        except (ValueError, TypeError, KeyError) as exc:
            raise UnsupportedTensorError(f"cannot export to safetensors: {exc}") from None
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        for t in own.values():
            t.zero_()
    return target
