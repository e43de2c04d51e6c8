"""The ``.sealed`` file: seal a state_dict, load it back inside the TEE.

See docs/format.md for the byte-level specification.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..keys import KeySource, ModelKey, read_key_file, resolve_key_source
from .header import AliasEntry, Header, TensorEntry
from .plainfiles import load_plain, save_safetensors
from .reader import SealedReader
from .spec import DEFAULT_CHUNK_SIZE, Preamble
from .writer import SealResult, seal_state_dict

KeyArg = str | os.PathLike[str] | ModelKey | KeySource

__all__ = [
    "Header", "KeyArg", "Preamble", "SealResult", "SealedReader", "inspect_file", "load_model",
    "load_plain", "load_state_dict", "load_with_header", "read_preamble", "seal", "unseal",
]


def seal(state_dict_or_module: Mapping[str, torch.Tensor] | torch.nn.Module | str
         | os.PathLike[str],
         path: str | os.PathLike[str], *, model_id: str | None = None,
         key: str | os.PathLike[str] | ModelKey | None = None,
         metadata: Mapping[str, Any] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
         workers: int | None = None, overwrite: bool = False,
         progress: bool | None = None) -> SealResult:
    """Seal a state_dict (or a module's, or a plaintext file's) into ``path``, atomically.

    Without ``key`` a fresh model key is generated for ``model_id`` and returned as the
    result's ``key``: store it (:func:`sealedtorch.write_key_file`) or register it, or the
    file can never be opened.

    Raises:
        ConfigError: no ``key`` and no ``model_id``; a key for another model; an existing
            ``path`` without ``overwrite``; a bad chunk size; metadata that is not JSON.
        KeyFileError: the key file cannot be read.
        UnsupportedTensorError: a value that is not a dense tensor, or tensors that
            overlap without being the identical view (tied weights are kept).
        FormatError: a plaintext input file that cannot be read safely.
    """
    state: Mapping[str, Any]
    if isinstance(state_dict_or_module, str | os.PathLike):
        # A plaintext file or a Hugging Face model directory: read as `sealedtorch seal`
        # reads it (weights_only, nothing runs); its own metadata comes first.
        state, stored = load_plain(state_dict_or_module)
        metadata = {**stored, **(metadata or {})}
    elif isinstance(state_dict_or_module, torch.nn.Module):
        state = state_dict_or_module.state_dict(keep_vars=False)
    else:
        state = state_dict_or_module
    if key is None:
        if model_id is None:
            raise ConfigError("seal() needs model_id when no key is given")
        model_key = ModelKey.generate(model_id)
    else:
        model_key = key if isinstance(key, ModelKey) else read_key_file(key)
        if model_id is not None and model_key.model_id != model_id:
            raise ConfigError(f"the key is for model {model_key.model_id!r}, not {model_id!r}")
    return seal_state_dict(state, path, model_key, metadata=metadata, chunk_size=chunk_size,
                           workers=workers, overwrite=overwrite, progress=progress)


def _key_for(f: SealedReader, key: KeyArg) -> ModelKey:
    """An explicit key (object or file) is used as given, so a mismatch is reported as
    "this key does not match this file"; a key source is asked for the file's model id and
    key version from the preamble."""
    if isinstance(key, ModelKey):
        return key
    if isinstance(key, str | os.PathLike):
        return read_key_file(key)
    return f.key_from(resolve_key_source(key))


def read_preamble(path: str | os.PathLike[str]) -> Preamble:
    """The plaintext preamble: model id, key version, sizes.  Needs no key.

    Raises:
        FormatError: no such file, or not a sealed file this version reads.
        IntegrityError: the preamble is corrupt or truncated.
    """
    with SealedReader(path) as f:
        return f.preamble


def load_state_dict(path: str | os.PathLike[str], *, key: KeyArg,
                    device: str | torch.device = "cpu", workers: int | None = None,
                    progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Decrypt a sealed file into tensors on ``device``.

    ``key`` is a key file, a :class:`ModelKey`, or a key source such as the keycache client;
    the model id and key version are taken from the file's preamble.  Tensors come back as
    views of one buffer that the weights were decrypted into; tied tensors come back as the
    very same tensor object.

    Raises:
        FormatError: no such file, not a sealed file, or a malformed (authentic) header.
        IntegrityError: the file was modified, truncated or extended, or the key is not
            this file's; nothing decrypted is returned.
        KeyFileError: the key file cannot be read.
        KeyUnavailable: the key source has no key for this file.
    """
    tensors, _ = load_with_header(path, key=key, device=device, workers=workers,
                                  progress=progress)
    return tensors


def load_with_header(path: str | os.PathLike[str], *, key: KeyArg,
                     device: str | torch.device = "cpu", workers: int | None = None,
                     progress: bool | None = None) -> tuple[dict[str, torch.Tensor], Header]:
    """Like :func:`load_state_dict`, also returning the decrypted header (metadata).

    Raises:
        The same as :func:`load_state_dict`.
    """
    with SealedReader(path) as f:
        model_key = _key_for(f, key)
        return f.read_tensors(model_key, device=device, workers=workers, progress=progress)


def load_model(path: str | os.PathLike[str], module: torch.nn.Module, *, key: KeyArg,
               device: str | torch.device | None = None, strict: bool = True,
               workers: int | None = None, progress: bool | None = None) -> torch.nn.Module:
    """Load sealed weights into ``module`` without a second copy.

    The decrypted tensors *become* the module's parameters (``assign=True``), so the weights
    are in memory once.  ``module`` may be built on the ``meta`` device to skip allocating
    its random initial weights at all.

    Raises:
        The errors of :func:`load_state_dict`, and ``RuntimeError`` (from
        ``Module.load_state_dict``) when ``strict`` and the names or shapes do not fit.
    """
    if device is None:
        device = next((p.device for p in module.parameters() if p.device.type != "meta"), "cpu")
    state = load_state_dict(path, key=key, device=device, workers=workers, progress=progress)
    module.load_state_dict(state, strict=strict, assign=True)
    return module


def inspect_file(path: str | os.PathLike[str], key: KeyArg | None = None) -> dict[str, Any]:
    """Describe a sealed file: the preamble, and with a key the tensor table and metadata.

    Raises:
        FormatError: no such file, or not a sealed file.
        IntegrityError: a corrupt preamble, a wrong size (even without a key), and with a key
            a key that does not match or a modified header.
    """
    with SealedReader(path) as f:
        f.check_size()  # even without a key: a truncated copy must not look fine
        info: dict[str, Any] = {"path": str(f.path), "preamble": f.preamble.to_json()}
        if key is None:
            return info
        opened = f.open(_key_for(f, key))
    info["metadata"] = opened.header.metadata
    info["tensors"] = [
        {"name": e.name, "alias_of": e.target} if isinstance(e, AliasEntry)
        else {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.offset,
              "nbytes": e.nbytes}
        for e in opened.header.entries]
    return info


def unseal(path: str | os.PathLike[str], *, key: KeyArg, out: str | os.PathLike[str],
           overwrite: bool = False, progress: bool | None = None) -> Path:
    """Owner-side: decrypt to a ``.safetensors`` file.  Writes nothing on any failure.

    Raises:
        The errors of :func:`load_state_dict`; FormatError when ``out`` exists and not
        ``overwrite``; ConfigError when its directory does not exist.
    """
    tensors, header = load_with_header(path, key=key, progress=progress)
    aliases = {e.name: e.target for e in header.entries if isinstance(e, AliasEntry)}
    try:
        return save_safetensors(tensors, header.metadata, aliases, out, overwrite=overwrite)
    finally:
        for e in header.entries:
            if isinstance(e, TensorEntry):
                tensors[e.name].zero_()
