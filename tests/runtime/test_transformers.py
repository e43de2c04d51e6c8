"""Hugging Face transformers models: sealed as directories, loaded once, served as text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hf_models import make_model_dir

import sealedtorch
from sealedtorch.cli import main
from sealedtorch.errors import ConfigError, FormatError
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.loader import ModelSource


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": make_model_dir(root / "llama", "llama"),
        "llama-sharded": make_model_dir(root / "llama-sharded", "llama", shard="20KB"),
        "gpt2": make_model_dir(root / "gpt2", "gpt2", seed=1),
        "gpt2-bin": make_model_dir(root / "gpt2-bin", "gpt2", seed=1, bin_weights=True),
        "bert": make_model_dir(root / "bert", "bert", seed=2),
        "bert-cls": make_model_dir(root / "bert-cls", "bert-cls", seed=3),
    }


def _sealed(model_dirs, kind: str, tmp_path: Path) -> tuple[Path, ModelKey]:
    key = ModelKey.generate(kind.replace("-", "_"))
    out = tmp_path / f"{kind}.sealed"
    sealedtorch.seal(model_dirs[kind], out, key=key, progress=False)
    return out, key


def _plain_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("kind", ["llama", "llama-sharded", "gpt2", "gpt2-bin"])
def test_greedy_generation_is_token_identical_to_plaintext_transformers(model_dirs, tmp_path,
                                                                        kind):
    sealed, key = _sealed(model_dirs, kind, tmp_path)
    model, tokenizer = sealedtorch.load_pretrained(sealed, key=key)
    plain, plain_tok = _plain_causal_lm(model_dirs[kind])
    ids = plain_tok("hello sealed model", return_tensors="pt").input_ids
    assert tokenizer("hello sealed model")["input_ids"] == ids[0].tolist()
    want = plain.generate(ids, max_new_tokens=16, do_sample=False)
    got = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)


def test_loaded_weights_are_the_plaintext_weights_and_tied_weights_are_one_tensor(
        model_dirs, tmp_path):
    sealed, key = _sealed(model_dirs, "llama", tmp_path)
    model, _ = sealedtorch.load_pretrained(sealed, key=key)
    plain, _ = _plain_causal_lm(model_dirs["llama"])
    for (name, got), (_, want) in zip(model.state_dict().items(), plain.state_dict().items(),
                                      strict=True):
        assert torch.equal(got, want), name
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


@pytest.mark.parametrize("kind, cls_name", [("bert", "BertModel"),
                                            ("bert-cls", "BertForSequenceClassification")])
def test_encoder_and_classifier_outputs_equal_plaintext(model_dirs, tmp_path, kind, cls_name):
    import transformers

    sealed, key = _sealed(model_dirs, kind, tmp_path)
    model, tokenizer = sealedtorch.load_pretrained(sealed, key=key)
    plain = getattr(transformers, cls_name).from_pretrained(model_dirs[kind]).eval()
    batch = tokenizer(["hello world", "sealed weights are decrypted"], padding=True,
                      return_tensors="pt")
    with torch.inference_mode():
        got, want = model(**batch), plain(**batch)
    field = "last_hidden_state" if kind == "bert" else "logits"
    assert torch.equal(getattr(got, field), getattr(want, field))


def test_config_tokenizer_and_names_are_encrypted(model_dirs, tmp_path):
    sealed, _ = _sealed(model_dirs, "llama", tmp_path)
    raw = sealed.read_bytes()
    for plaintext in (b"LlamaForCausalLM", b"num_key_value_heads", b"<|assistant|>",
                      b"embed_tokens", b"confidential"):
        assert plaintext not in raw


def test_cli_seal_accepts_a_model_directory(model_dirs, tmp_path, capsys):
    out, key = tmp_path / "m.sealed", tmp_path / "m.key"
    assert main(["seal", str(model_dirs["gpt2"]), "-o", str(out), "--model-id", "gpt2",
                 "--key-out", str(key), "-q"]) == 0
    info = sealedtorch.format.inspect_file(out, key)
    assert info["metadata"]["arch"] == "transformers:GPT2LMHeadModel"
    assert "tokenizer.json" in info["metadata"]["transformers"]["files"]


# --- bad model directories ------------------------------------------------------------

def _copy(model_dirs, kind: str, tmp_path: Path) -> Path:
    d = tmp_path / f"copy-{kind}"
    shutil.copytree(model_dirs[kind], d)
    return d


def test_directory_without_weights_is_refused_naming_it(model_dirs, tmp_path):
    d = _copy(model_dirs, "llama", tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FormatError, match=rf"{d}: no weights"):
        sealedtorch.seal(d, tmp_path / "x.sealed", model_id="x")
    assert not (tmp_path / "x.sealed").exists()


def test_index_naming_a_missing_shard_is_refused_naming_the_index(model_dirs, tmp_path):
    d = _copy(model_dirs, "llama-sharded", tmp_path)
    (d / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(FormatError, match=r"model\.safetensors\.index\.json: names shard "
                                          r"'model-00002-of-00006\.safetensors'"):
        sealedtorch.seal(d, tmp_path / "x.sealed", model_id="x")


def test_shards_without_their_index_are_refused(model_dirs, tmp_path):
    d = _copy(model_dirs, "llama-sharded", tmp_path)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(FormatError, match="without their index"):
        sealedtorch.seal(d, tmp_path / "x.sealed", model_id="x")


def test_shard_whose_tensor_disagrees_with_the_config_is_refused_naming_the_shard(
        model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(model_dirs, "llama", tmp_path)
    state = load_file(str(d / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(33)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"model\.safetensors: tensor 'model\.norm\.weight' "
                                          r"has shape \(33,\), config\.json implies \(32,\)"):
        sealedtorch.seal(d, tmp_path / "x.sealed", model_id="x")


def test_shard_missing_a_tensor_the_config_needs_is_refused(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(model_dirs, "llama", tmp_path)
    state = load_file(str(d / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"lack 1 tensors LlamaForCausalLM needs "
                                          r"\(model\.norm\.weight\)"):
        sealedtorch.seal(d, tmp_path / "x.sealed", model_id="x")


def test_remote_code_model_is_refused_naming_config_json(model_dirs, tmp_path):
    d = _copy(model_dirs, "llama", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(FormatError, match=r"config\.json has 'auto_map'.*remote code"):
        sealedtorch.seal(d, tmp_path / "x.sealed", model_id="x")


def test_remote_code_named_in_sealed_metadata_is_refused_at_load(model_dirs, tmp_path):
    """An owner-crafted file (not made by `seal DIR`) that smuggles auto_map is refused too."""
    from sealedtorch.format.importers.hf import read_hf_directory

    found = read_hf_directory(model_dirs["llama"])
    found.metadata["transformers"]["config"]["auto_map"] = {"AutoModel": "x.Y"}
    key = ModelKey.generate("crafted")
    sealedtorch.seal(found.state_dict, tmp_path / "c.sealed", key=key,
                     metadata=found.metadata, progress=False)
    with pytest.raises(FormatError, match="auto_map"):
        sealedtorch.load_pretrained(tmp_path / "c.sealed", key=key)


def test_pickled_pytorch_model_bin_never_runs(model_dirs, tmp_path):
    d = _copy(model_dirs, "gpt2-bin", tmp_path)
    sentinel = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {sentinel}",))

    torch.save({"wte.weight": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(FormatError, match="never unpickles"):
        sealedtorch.seal(d, tmp_path / "x.sealed", model_id="x")
    assert not sentinel.exists()


def test_class_not_on_the_runtime_allow_list_is_refused_before_building(model_dirs, tmp_path):
    from sealedtorch.runtime.config import RuntimeConfig
    from sealedtorch.runtime.loader import load_sealed

    sealed, key = _sealed(model_dirs, "gpt2", tmp_path)
    config = RuntimeConfig(architectures=("transformers:LlamaForCausalLM",))
    with pytest.raises(ConfigError, match="not on this runtime's allow-list"):
        load_sealed(ModelSource("gpt2", sealed), StaticKeys(key), config)


def test_every_default_transformers_class_exists_in_the_installed_transformers():
    import transformers

    from sealedtorch.runtime.config import DEFAULT_ARCHITECTURES

    names = [a.removeprefix("transformers:") for a in DEFAULT_ARCHITECTURES
             if a.startswith("transformers:")]
    assert names and all(isinstance(getattr(transformers, n, None), type) for n in names)


# --- served: the OpenAI-compatible API with the official client -----------------------

@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory, sim_dir):
    from sealedtorch.runtime.server import RuntimeServer

    tmp = tmp_path_factory.mktemp("served")
    models, keys = [], []
    for kind in ("llama", "gpt2", "bert"):
        key = ModelKey.generate(kind)
        path = tmp / f"{kind}.sealed"
        sealedtorch.seal(model_dirs[kind], path, key=key, progress=False)
        models.append(ModelSource(kind, path))
        keys.append(key)
    srv = RuntimeServer.start(models, keys=StaticKeys(*keys), tee="sim", sim_platform=sim_dir)
    srv.wait_ready(120)
    yield srv
    srv.stop()


@pytest.fixture
def client(served):
    http = httpx.Client(verify=False, timeout=60)  # TLS pinning is tested in test_client.py
    c = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", http_client=http,
                      max_retries=0)
    yield c
    http.close()


def _plain_greedy(model_dirs, kind: str, prompt_ids: list[int], n: int) -> list[int]:
    plain, _ = _plain_causal_lm(model_dirs[kind])
    ids = torch.tensor([prompt_ids])
    out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_openai_completion_greedy_equals_plaintext_generate(model_dirs, client, kind):
    _, tok = _plain_causal_lm(model_dirs[kind])
    prompt = "the quick brown"
    answer = client.completions.create(model=kind, prompt=prompt, max_tokens=12,
                                       temperature=0)
    want = _plain_greedy(model_dirs, kind, tok(prompt)["input_ids"], 12)
    assert answer.choices[0].text == tok.decode(want, skip_special_tokens=True)
    assert answer.usage.completion_tokens == len(want)
    assert answer.choices[0].finish_reason in ("length", "stop")


def test_openai_chat_uses_the_sealed_chat_template(model_dirs, client):
    _, tok = _plain_causal_lm(model_dirs["llama"])
    messages = [{"role": "user", "content": "hello world"}]
    answer = client.chat.completions.create(model="llama", messages=messages, max_tokens=8,
                                            temperature=0)
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    want = _plain_greedy(model_dirs, "llama", list(prompt_ids), 8)
    assert answer.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(prompt_ids)


def test_streamed_completion_concatenates_to_the_whole_answer(client):
    whole = client.completions.create(model="gpt2", prompt="hello", max_tokens=10,
                                      temperature=0).choices[0].text
    parts = list(client.completions.create(model="gpt2", prompt="hello", max_tokens=10,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole
    assert parts[-1].choices[0].finish_reason in ("length", "stop")


def test_streamed_chat_sends_role_then_content_deltas(client):
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="llama", messages=messages, max_tokens=6,
                                           temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(model="llama", messages=messages,
                                                 max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_stop_string_truncates_the_completion(client):
    whole = client.completions.create(model="gpt2", prompt="hello", max_tokens=12,
                                      temperature=0).choices[0].text
    assert len(whole) > 3
    stop = whole[2:4]
    cut = client.completions.create(model="gpt2", prompt="hello", max_tokens=12,
                                    temperature=0, stop=[stop]).choices[0]
    assert cut.text == whole[:whole.find(stop)]
    assert cut.finish_reason == "stop"


def test_same_seed_samples_the_same_text_and_another_seed_may_differ(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="llama", prompt="the", max_tokens=12,
                                         temperature=1.5, top_p=0.95,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_models_lists_only_text_generation_models(client):
    assert sorted(m.id for m in client.models.list()) == ["gpt2", "llama"]


def test_unknown_model_is_openai_not_found(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_encoder_model_is_refused_by_the_text_api(client):
    with pytest.raises(openai.BadRequestError, match="does not generate text"):
        client.completions.create(model="bert", prompt="x", max_tokens=1)


@pytest.mark.parametrize("field, value", [("logprobs", 2), ("echo", True), ("n", 2)])
def test_unsupported_options_are_refused_not_ignored(client, field, value):
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="gpt2", prompt="x", max_tokens=1,
                                  extra_body={field: value})


def test_malformed_requests_get_openai_errors(served):
    with httpx.Client(base_url=served.url, verify=False, timeout=30) as c:
        r = c.post("/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/completions", json={"model": "gpt2", "prompt": "x",
                                            "temperature": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        r = c.post("/v1/chat/completions", json={"model": "gpt2", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def _kserve(served, name: str, body: bytes | dict, headers: dict | None = None):
    with httpx.Client(base_url=served.url, verify=False, timeout=60) as c:
        if isinstance(body, dict):
            return c.post(f"/v2/models/{name}/infer", json=body)
        return c.post(f"/v2/models/{name}/infer", content=body, headers=headers)


def _text_input(texts: list[str]) -> dict:
    return {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}


def test_kserve_generates_text_from_text_equal_to_plaintext(model_dirs, served):
    _, tok = _plain_causal_lm(model_dirs["llama"])
    prompts = ["the quick brown", "hello world"]
    r = _kserve(served, "llama", {"inputs": [_text_input(prompts)],
                                  "parameters": {"max_tokens": 10}})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "text_output" and out["datatype"] == "BYTES" and out["shape"] == [2]
    for prompt, text in zip(prompts, out["data"], strict=True):
        want = _plain_greedy(model_dirs, "llama", tok(prompt)["input_ids"], 10)
        assert text == tok.decode(want, skip_special_tokens=True)


def test_kserve_binary_bytes_in_and_out(served):
    from sealedtorch.runtime.kserve import decode_infer_response
    from sealedtorch.runtime.text_kserve import encode_bytes

    texts = ["héllo wörld", "sealed"]
    raw = encode_bytes([t.encode() for t in texts])
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                       "parameters": {"binary_data_size": len(raw)}}],
           "parameters": {"binary_data_output": True, "max_tokens": 4}}
    header = json.dumps(doc).encode()
    r = _kserve(served, "gpt2", header + raw,
                {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    json_answer = _kserve(served, "gpt2", {"inputs": [_text_input(texts)],
                                           "parameters": {"max_tokens": 4}}).json()
    decoded = decode_infer_response(r.content, r.headers["inference-header-content-length"])
    assert decoded["text_output"] == json_answer["outputs"][0]["data"]


def test_kserve_embeds_text_like_the_plaintext_encoder(model_dirs, served):
    from transformers import AutoTokenizer, BertModel

    texts = ["hello world", "sealed weights are decrypted only inside the enclave"]
    r = _kserve(served, "bert", {"inputs": [_text_input(texts)]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "embedding" and out["shape"] == [2, 32]
    plain = BertModel.from_pretrained(model_dirs["bert"]).eval()
    batch = AutoTokenizer.from_pretrained(model_dirs["bert"])(texts, padding=True,
                                                               return_tensors="pt")
    with torch.inference_mode():
        hidden = plain(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.equal(torch.tensor(out["data"]).reshape(2, 32), want)


def test_kserve_model_metadata_declares_bytes_text(served):
    with httpx.Client(base_url=served.url, verify=False, timeout=30) as c:
        meta = c.get("/v2/models/llama").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize("inputs, expect", [
    ([{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}], "BYTES"),
    ([{"name": "input_ids", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "no input"),
    ([{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x"]}], "needs 2"),
    ([{"name": "text", "datatype": "BYTES", "shape": [1], "data": [3]}], "list of strings"),
])
def test_kserve_malformed_text_requests_are_400(served, inputs, expect):
    r = _kserve(served, "gpt2", {"inputs": inputs})
    assert r.status_code == 400 and expect in r.json()["error"]


def test_kserve_non_utf8_text_is_refused(served):
    from sealedtorch.runtime.text_kserve import encode_bytes

    raw = encode_bytes([b"\xff\xfe"])
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    r = _kserve(served, "gpt2", header + raw,
                {"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]


def test_kserve_generation_parameters_are_typed(served):
    r = _kserve(served, "gpt2", {"inputs": [_text_input(["x"])],
                                 "parameters": {"max_tokens": "5"}})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]


def test_tritonclient_sends_and_receives_text(served, tmp_path):
    import numpy as np
    import tritonclient.http as triton

    cert = tmp_path / "runtime.pem"
    cert.write_bytes(served.runtime.tls.trust_pem)
    client = triton.InferenceServerClient(served.url.removeprefix("https://"), ssl=True,
                                          ssl_options={"ca_certs": str(cert)})
    try:
        inp = triton.InferInput("text", [2], "BYTES")
        inp.set_data_from_numpy(np.array(["hello", "world"], dtype=np.object_))
        got = client.infer("gpt2", [inp], parameters={"max_tokens": 3})
        answer = [b.decode() for b in got.as_numpy("text_output")]
    finally:
        client.close()
    expected = _kserve(served, "gpt2", {"inputs": [_text_input(["hello", "world"])],
                                        "parameters": {"max_tokens": 3}}).json()
    assert answer == expected["outputs"][0]["data"]


def test_oversized_text_requests_are_refused_before_they_are_read(served):
    from sealedtorch.runtime.openai_api import MAX_TEXT_REQUEST_BYTES

    big = b'{"model": "gpt2", "prompt": "' + b"x" * (MAX_TEXT_REQUEST_BYTES + 1) + b'"}'
    with httpx.Client(base_url=served.url, verify=False, timeout=60) as c:
        declared = c.post("/v1/completions", content=big)

        def chunks():
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        streamed = c.post("/v1/completions", content=chunks())  # chunked: no length given
        after = c.post("/v1/completions", json={"model": "gpt2", "prompt": "hi",
                                                "max_tokens": 1, "temperature": 0})
    assert declared.status_code == 413 and "larger than the limit" in declared.text
    assert streamed.status_code == 413 and "larger than the limit" in streamed.text
    assert after.status_code == 200
