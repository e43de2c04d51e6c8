"""The known-answer vectors in tests/format/vectors/: reading them back into inputs.

A vector is the complete input of :func:`sealedtorch.format.encode.encode` (a TEST model
key, the salt, the chunk size, the metadata, and every tensor as dtype, shape and raw
little-endian bytes) plus what the file must be: its size, SHA-256 and first bytes.
Shared by tests/format/make_vectors.py (which writes them) and tests/format/test_vectors.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sealedtorch.format.spec import DTYPES
from sealedtorch.keys import ModelKey

VECTORS_DIR = Path(__file__).parent / "format" / "vectors"


def load_vectors() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(VECTORS_DIR.glob("*.json"))]


def key_of(vector: dict[str, Any]) -> ModelKey:
    k = vector["test_key"]
    return ModelKey(k["model_id"], k["key_version"], bytes.fromhex(k["secret_hex"]))


def state_dict_of(vector: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The vector's tensors, aliases as the very same tensor object (tied weights)."""
    out: dict[str, torch.Tensor] = {}
    for t in vector["tensors"]:
        if "alias_of" in t:
            out[t["name"]] = out[t["alias_of"]]
            continue
        raw = bytearray.fromhex(t["data_hex"])
        flat = (torch.frombuffer(raw, dtype=torch.uint8) if raw
                else torch.empty(0, dtype=torch.uint8))
        out[t["name"]] = flat.view(DTYPES[t["dtype"]]).reshape(t["shape"]).clone()
    return out
