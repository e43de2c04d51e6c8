"""Owner side: a Hugging Face transformers model directory as (state dict, metadata).

A model directory holds ``config.json``, optionally ``generation_config.json``, tokenizer
files, and the weights as one ``model.safetensors``, as shards named by
``model.safetensors.index.json``, or as ``pytorch_model*.bin`` (read with
``torch.load(weights_only=True)``: nothing in a model directory ever runs).  Everything
goes into *one* sealed file: the tensors as tensors, and the configuration and tokenizer
inside the encrypted header's metadata (``metadata["transformers"]``), so names, shapes,
configuration and vocabulary are as confidential as the weights.  docs/format.md says why
one file rather than sealed shards.

The directory is checked before anything is written: every shard the index names exists
and holds exactly the tensors the index says, the tensors fit the architecture that
``config.json`` names (names and shapes, checked against a meta-device build: no memory),
and a model that needs remote code (``auto_map``) is refused, because that code would run
inside the TEE without being part of the measurement.  Each failure is a
:class:`~sealedtorch.errors.FormatError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import FormatError

__all__ = ["HF_METADATA_KEY", "HfDirectory", "is_hf_directory", "read_hf_directory"]

#: The metadata key that holds the configuration and tokenizer of a sealed HF model.
HF_METADATA_KEY = "transformers"
#: Text files copied (encrypted) into the sealed header when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class HfDirectory:
    """What :func:`read_hf_directory` found: tensors, metadata to seal, and where from."""

    #: tensors (``.bin``) or lazy tensors (safetensors shards, read while sealing)
    state_dict: dict[str, Any]
    metadata: dict[str, Any]
    weight_files: tuple[str, ...]
    architecture: str


def is_hf_directory(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: not readable JSON ({exc})") from None


def _weight_index(root: Path) -> tuple[str, dict[str, list[str]]] | None:
    """The index file's name and its shard -> tensor names, if the weights are sharded."""
    for name in (_SAFETENSORS_INDEX, _BIN_INDEX):
        if (root / name).is_file():
            index = _read_json(root / name)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise FormatError(f"{root / name}: no 'weight_map' of tensor -> shard names")
            shards: dict[str, list[str]] = {}
            for tensor, shard in weight_map.items():
                if Path(shard).name != shard:
                    raise FormatError(f"{root / name}: shard name {shard!r} is not a file "
                                      "name in the model directory")
                shards.setdefault(shard, []).append(tensor)
            return name, shards
    return None


def _weight_files(root: Path) -> tuple[list[Path], dict[str, list[str]] | None, str | None]:
    indexed = _weight_index(root)
    if indexed is not None:
        index_name, shards = indexed
        for shard in shards:
            if not (root / shard).is_file():
                raise FormatError(f"{root / index_name}: names shard {shard!r}, which is not "
                                  f"in {root}")
        return [root / s for s in sorted(shards)], shards, index_name
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return [root / name], None, None
    singles = sorted(root.glob("model-*-of-*.safetensors")) or \
        sorted(root.glob("pytorch_model-*-of-*.bin"))
    if singles:
        raise FormatError(f"{root}: sharded weights ({singles[0].name}, ...) without their "
                          f"index ({_SAFETENSORS_INDEX})")
    raise FormatError(f"{root}: no weights (model.safetensors, sharded model-*.safetensors "
                      f"with {_SAFETENSORS_INDEX}, or pytorch_model*.bin)")


def _read_shard(path: Path) -> dict[str, Any]:
    """A shard's tensors: safetensors shards as :class:`~sealedtorch.format.lazy.LazyTensor`
    (nothing read until the writer encrypts it, chunk by chunk: sealing an 8 GiB checkpoint
    holds a few chunks in memory, not the checkpoint), ``.bin`` shards memory-mapped."""
    if path.suffix == ".safetensors":
        from ..lazy import read_safetensors_lazily

        return read_safetensors_lazily(path)
    from ..plainfiles import load_plain

    state, _ = load_plain(path)  # weights_only=True
    return state


def _iter_shards(files: list[Path], shards: Mapping[str, list[str]] | None,
                 index_name: str | None) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in files:
        tensors = _read_shard(path)
        if shards is not None:
            want = set(shards[path.name])
            if set(tensors) != want:
                extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
                raise FormatError(
                    f"{path}: holds other tensors than {index_name} says"
                    + (f"; missing {missing[:3]}" if missing else "")
                    + (f"; not in the index {extra[:3]}" if extra else ""))
        yield path, tensors


def _tokenizer_files(root: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for name in TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            try:
                files[name] = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise FormatError(f"{p}: not a readable text file ({exc})") from None
    if "tokenizer.json" not in files and any(
            (root / n).is_file() for n in ("vocab.txt", "vocab.json", "tokenizer.model")):
        files["tokenizer.json"] = _convert_slow_tokenizer(root)
    return files


def _convert_slow_tokenizer(root: Path) -> str:
    """A directory with only a slow tokenizer: convert it here, on the owner's machine, so
    the TEE only ever parses ``tokenizer.json`` (no sentencepiece, no code)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(root), use_fast=True, local_files_only=True,
                                            trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise FormatError(f"{root}: the tokenizer files cannot be read ({exc})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise FormatError(f"{root}: the tokenizer has no fast (tokenizer.json) form")
    return str(backend.to_str())


def check_config(config: Any, where: str) -> str:
    """The architecture class name that ``config`` names; refuse remote code."""
    if not isinstance(config, dict):
        raise FormatError(f"{where}: config.json is not a JSON object")
    if config.get("auto_map"):
        raise FormatError(
            f"{where}: config.json has 'auto_map' ({', '.join(sorted(config['auto_map']))}): "
            "the model needs remote code, which would run inside the TEE without being part "
            "of the measurement; package that code as an allow-listed architecture instead "
            "(docs/runtime.md, 'Custom models')")
    archs = config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise FormatError(f"{where}: config.json must name exactly one class in "
                          "'architectures' (e.g. [\"LlamaForCausalLM\"])")
    if not isinstance(config.get("model_type"), str):
        raise FormatError(f"{where}: config.json has no 'model_type'")
    return archs[0]


def read_hf_directory(path: str | os.PathLike[str]) -> HfDirectory:
    """Read a transformers model directory for :func:`sealedtorch.seal`.

    Raises:
        FormatError: no ``config.json`` or no weights, an index naming a missing shard, a
            shard holding other tensors than its index says, tensors that disagree with the
            configured architecture, a remote-code model, an unreadable file.
    """
    root = Path(path)
    if not is_hf_directory(root):
        raise FormatError(f"{root}: not a Hugging Face model directory (no config.json)")
    config = _read_json(root / "config.json")
    arch = check_config(config, str(root / "config.json"))
    generation = _read_json(root / "generation_config.json") \
        if (root / "generation_config.json").is_file() else None
    files, shards, index_name = _weight_files(root)
    state: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for shard, tensors in _iter_shards(files, shards, index_name):
        for name, tensor in tensors.items():
            if name in state:
                raise FormatError(f"{shard}: tensor {name!r} is also in {origin[name].name}")
            state[name] = tensor
            origin[name] = shard
    from ...runtime.hf import expected_tensors

    expected = expected_tensors(config)
    for name, tensor in state.items():
        if name not in expected.shapes:
            if name in expected.ignorable:
                continue
            raise FormatError(f"{origin[name]}: tensor {name!r} is not part of {arch} as "
                              "config.json describes it")
        if tuple(tensor.shape) != expected.shapes[name]:
            raise FormatError(f"{origin[name]}: tensor {name!r} has shape "
                              f"{tuple(tensor.shape)}, config.json implies "
                              f"{expected.shapes[name]}")
    missing = sorted(set(expected.shapes) - set(state) - set(expected.tied))
    if missing:
        raise FormatError(f"{root}: the weights lack {len(missing)} tensors {arch} needs "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    state = {k: v for k, v in state.items() if k in expected.shapes}
    metadata = {
        "arch": f"transformers:{arch}",
        HF_METADATA_KEY: {"config": config, "generation_config": generation,
                          "files": _tokenizer_files(root)},
    }
    return HfDirectory(state, metadata, tuple(str(f) for f in files), arch)
