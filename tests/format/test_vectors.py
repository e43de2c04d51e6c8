"""Known-answer vectors: the encoder's bytes are pinned, and docs/format.md suffices.

Each vector in tests/format/vectors/ (made once by make_vectors.py, TEST keys only) fixes
the complete input and the file that must come out.  ``_encode_from_spec`` below is a second
encoder written from docs/format.md alone, with nothing but ``cryptography``, ``struct``,
``json`` and ``hashlib``: if it and sealedtorch agree byte for byte, the document is a
complete specification and the implementation follows it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from format_vectors import key_of, load_vectors, state_dict_of

import sealedtorch
from sealedtorch.format import writer
from sealedtorch.format.encode import encode

VECTORS = load_vectors()
IDS = [v["description"].split(",")[0] for v in VECTORS]


def _encode_from_spec(v: dict[str, Any]) -> bytes:
    """A ``.sealed`` file built from docs/format.md alone (no sealedtorch code)."""
    secret = bytes.fromhex(v["test_key"]["secret_hex"])
    salt, chunk_size = bytes.fromhex(v["salt_hex"]), v["chunk_size"]

    def derive(info: str, length: int) -> bytes:
        return HKDF(SHA256(), length, salt, info.encode()).derive(secret)

    header_key = derive("sealedtorch/format/v1/header-key", 32)
    data_key = derive("sealedtorch/format/v1/data-key", 32)
    key_check = derive("sealedtorch/format/v1/key-check", 16)
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for t in v["tensors"]:
        if "alias_of" in t:
            entries.append({"name": t["name"], "alias_of": t["alias_of"]})
            continue
        data = bytes.fromhex(t["data_hex"])
        entries.append({"name": t["name"], "dtype": t["dtype"], "shape": t["shape"],
                        "offset": offset, "nbytes": len(data)})
        chunks += [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
        offset += len(data)
    header_json = json.dumps({"tensors": entries, "metadata": v["metadata"]},
                             separators=(",", ":"), ensure_ascii=False).encode()
    model_id = v["test_key"]["model_id"].encode()
    preamble = struct.pack("<8sHBBI32s16sIIQQH", b"\x89STSEAL\n", 1, 1, 0,
                           v["test_key"]["key_version"], salt, key_check, chunk_size,
                           len(header_json) + 16, offset, len(chunks), len(model_id)) + model_id
    header_ct = AESGCM(header_key).encrypt(bytes(12), header_json,
                                           b"sealedtorch/format/v1/header" + preamble)
    digest = hashlib.sha256(preamble + header_ct).digest()
    out = [preamble, header_ct]
    for i, plain in enumerate(chunks):
        aad = b"sealedtorch/format/v1/chunk" + digest + struct.pack(
            "<QB", i, 1 if i == len(chunks) - 1 else 0)
        out.append(AESGCM(data_key).encrypt(i.to_bytes(12, "big"), plain, aad))
    return b"".join(out)


def _encoded(v: dict[str, Any]) -> bytes:
    return encode(state_dict_of(v), key_of(v), bytes.fromhex(v["salt_hex"]),
                  metadata=v["metadata"], chunk_size=v["chunk_size"])


def test_there_are_vectors_to_check():
    assert len(VECTORS) >= 3


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_encode_reproduces_the_vector_file_exactly(v):
    data = _encoded(v)
    assert len(data) == v["expected"]["file_size"]
    assert data[:len(v["expected"]["first_bytes_hex"]) // 2].hex() == \
        v["expected"]["first_bytes_hex"]
    assert hashlib.sha256(data).hexdigest() == v["expected"]["sha256"]


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_an_encoder_written_from_the_spec_alone_produces_the_same_bytes(v):
    data = _encode_from_spec(v)
    assert hashlib.sha256(data).hexdigest() == v["expected"]["sha256"]
    assert data == _encoded(v)


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_the_reader_opens_the_spec_encoders_file_and_returns_the_vector_tensors(tmp_path, v):
    path = tmp_path / "v.sealed"
    path.write_bytes(_encode_from_spec(v))
    got = sealedtorch.load_state_dict(path, key=key_of(v))
    want = state_dict_of(v)
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8),
                           t.reshape(-1).view(torch.uint8))
    for e in v["tensors"]:
        if "alias_of" in e:
            assert got[e["name"]] is got[e["alias_of"]]


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_the_parallel_writer_writes_the_encoders_bytes_for_the_same_salt(tmp_path, v,
                                                                         monkeypatch):
    salt = bytes.fromhex(v["salt_hex"])
    monkeypatch.setattr(writer.crypto, "random_bytes", lambda n: salt)
    path = tmp_path / "w.sealed"
    result = sealedtorch.seal(state_dict_of(v), path, key=key_of(v), metadata=v["metadata"],
                              chunk_size=v["chunk_size"], workers=3, progress=False)
    assert result.file_size == v["expected"]["file_size"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == v["expected"]["sha256"]


def test_encode_is_pure_the_same_inputs_give_the_same_bytes():
    v = VECTORS[0]
    assert _encoded(v) == _encoded(v)
