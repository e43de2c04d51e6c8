"""Write the known-answer vectors in tests/format/vectors/ (run once; commit the output).

    PYTHONPATH=src:tests python tests/format/make_vectors.py

The keys are TEST keys, derived from their names, published here: never seal anything real
under them.  The expected values are whatever this sealedtorch's encoder produced when the
vectors were made; from then on tests/format/test_vectors.py holds every later version (and
an encoder written from docs/format.md alone) to exactly those bytes.  Rerunning this
script after a format change is a format break and needs a new format version.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from format_vectors import VECTORS_DIR, key_of, state_dict_of

from sealedtorch.format.encode import encode

FIRST_BYTES = 128


def _test_key(model_id: str) -> dict[str, Any]:
    secret = hashlib.sha256(f"sealedtorch TEST key for {model_id}".encode()).hexdigest()
    return {"note": "TEST KEY, public: never seal real weights under it",
            "model_id": model_id, "key_version": 1, "secret_hex": secret}


def _pattern(n: int, seed: int) -> str:
    """``n`` deterministic bytes as hex (SHA-256 in counter mode)."""
    out = b"".join(hashlib.sha256(struct.pack("<II", seed, i)).digest()
                   for i in range(-(-n // 32)))
    return out[:n].hex()


def _tensor(name: str, dtype: str, shape: list[int], itemsize: int, seed: int
            ) -> dict[str, Any]:
    n = itemsize
    for d in shape:
        n *= d
    return {"name": name, "dtype": dtype, "shape": shape, "data_hex": _pattern(n, seed)}


INPUTS: dict[str, dict[str, Any]] = {
    "one_tensor": {
        "description": "one float32 tensor in one chunk, empty metadata",
        "test_key": _test_key("vector-one"), "salt_hex": "00" * 32, "chunk_size": 4096,
        "metadata": {},
        "tensors": [_tensor("w", "float32", [2, 3], 4, 1)],
    },
    "chunks_aliases_metadata": {
        "description": "a tensor over three chunks (last one short), a tied alias, a 0-d "
                       "bool, an empty tensor (no chunk), bfloat16, non-ASCII names and "
                       "metadata, key version 7",
        "test_key": {**_test_key("vector-multi"), "key_version": 7},
        "salt_hex": _pattern(32, 99), "chunk_size": 4096,
        "metadata": {"arch": "tests:mlp", "arch_kwargs": {"width": 3}, "note": "gewicht \u00e4"},
        "tensors": [
            _tensor("embed.weight", "uint8", [10000], 1, 2),
            {"name": "lm_head.weight", "alias_of": "embed.weight"},
            _tensor("flag", "bool", [], 1, 3) | {"data_hex": "01"},
            _tensor("empty", "int64", [0, 4], 8, 4),
            _tensor("schicht.\u00fc", "bfloat16", [3, 5], 2, 5),
        ],
    },
    "no_tensors": {
        "description": "an empty state_dict: header only, no chunks",
        "test_key": _test_key("vector-empty"), "salt_hex": "ff" * 32, "chunk_size": 1 << 20,
        "metadata": {"arch": "nothing"}, "tensors": [],
    },
}


def main() -> None:
    VECTORS_DIR.mkdir(parents=True, exist_ok=True)
    for name, vector in INPUTS.items():
        data = encode(state_dict_of(vector), key_of(vector), bytes.fromhex(vector["salt_hex"]),
                      metadata=vector["metadata"], chunk_size=vector["chunk_size"])
        vector["expected"] = {"file_size": len(data),
                              "sha256": hashlib.sha256(data).hexdigest(),
                              "first_bytes_hex": data[:FIRST_BYTES].hex()}
        (VECTORS_DIR / f"{name}.json").write_text(
            json.dumps(vector, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: {len(data)} bytes, sha256 {vector['expected']['sha256']}")


if __name__ == "__main__":
    main()
