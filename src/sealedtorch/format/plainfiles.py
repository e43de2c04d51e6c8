"""Plaintext model files on the owner's side: what ``seal`` reads and ``unseal`` writes.

``.pt``/``.pth`` files are loaded with ``torch.load(weights_only=True)``: arbitrary pickled
objects are refused, never executed.  ``.safetensors`` round-trips our metadata and tied
tensors through two reserved ``__metadata__`` keys.
"""

from __future__ import annotations

import json
import os
import pickle
import re
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
        raise FormatError(f"{p}: is a directory, but not a Hugging Face model directory "
                          "(no config.json); expected a .pt, .pth or .safetensors file or a "
                          "transformers model directory")
    if not p.is_file():
        raise FormatError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    if not _looks_like_torch_save(p):
        raise FormatError(f"{p}: not a torch.save file (neither a zip archive nor a pickle); "
                          "expected a state_dict saved with torch.save, or .safetensors")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _GLOBAL.search(str(exc)) is None:  # garbage, not a refused object
            raise FormatError(f"{p}: not a readable torch.save file "
                              f"({_first_line(exc)})") from None
        raise FormatError(_refusal(p, exc)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError,
            OverflowError, MemoryError) as exc:
        raise FormatError(f"{p}: not a readable torch.save file "
                          f"({_first_line(exc)})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise FormatError(f"{p}: expected a state_dict (a dict of name -> tensor), got "
                          f"{type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UnsupportedTensorError(
            f"{p}: entries {bad[:5]} are not tensors; save model.state_dict() only")
    return dict(obj), {}


def _looks_like_torch_save(p: Path) -> bool:
    """torch.save writes a zip archive (since 1.6) or, legacy, a pickle (opcode 0x80)."""
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise FormatError(f"{p}: cannot read: {exc.strerror}") from None
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


_GLOBAL = re.compile(r"(?:GLOBAL|global) ([\w.]+)")


def _first_line(exc: BaseException) -> str:
    """torch's own messages run to paragraphs with ANSI codes: keep their first line."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip()
    inner = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if inner:  # the unpickler's own reason, without torch's weights_only essay
        return inner.group(1).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refusal(p: Path, exc: BaseException) -> str:
    found = _GLOBAL.search(str(exc))
    what = f" (it holds a pickled {found.group(1)})" if found else ""
    return (f"{p}: refusing to load: the file contains objects other than tensors and plain "
            f"containers{what}, and sealedtorch never unpickles arbitrary code; save "
            "model.state_dict() instead of the model")


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
    """Write atomically (mode 0600: it is plaintext): a locked temporary file renamed into
    place only when complete, so an interrupted export leaves nothing under ``path``.

    Raises:
        FormatError: ``path`` exists and ``overwrite`` is false.
        UnsupportedTensorError: safetensors cannot store one of the tensors.
        OSError: the file cannot be written.
    """
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise FormatError(f"{target}: already exists (use --force to replace)")
    own = {k: v.clone() for k, v in tensors.items() if k not in aliases}
    meta = {META_KEY: json.dumps(metadata), ALIAS_KEY: json.dumps(aliases)}
    from .writer import replace_output

    try:
        with replace_output(target, mode=0o600) as (_fd, tmp):
            try:
                save_file(own, tmp, metadata=meta)
            except (ValueError, TypeError, KeyError) as exc:
                raise UnsupportedTensorError(f"cannot export to safetensors: {exc}") from None
    finally:
        for t in own.values():
            t.zero_()
    return target
