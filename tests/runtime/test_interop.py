"""What standard Open Inference Protocol clients send and expect, over real TLS on 127.0.0.1:
request fields the kserve SDK and Triton send, error bodies, version paths, compressed
bodies, the serving version across key rotation, and the certificate file."""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import pytest
import torch

from sealedtorch import crypto
from sealedtorch.errors import BindingError, ConfigError
from sealedtorch.format import seal
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.architectures import mlp
from sealedtorch.runtime.client import AttestedClient, pinned_ssl_context
from sealedtorch.runtime.config import RuntimeConfig
from sealedtorch.runtime.kserve import HEADER_LENGTH, decode_infer_response, encode_infer_request
from sealedtorch.runtime.loader import ModelSource
from sealedtorch.runtime.server import SubprocessServer, write_certificate

from .conftest import MLP_ARCH, MLP_KWARGS, sim_policy
from .test_with_keycache import _serve_args, allow, keycache, short_dir, trusting  # noqa: F401 (fixtures)

GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                    "data": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture
def tiny_client(start_server, tiny, tiny_source, raw_client) -> httpx.Client:
    srv = start_server([tiny_source], keys=tiny.keys)
    return raw_client(srv.url)


def _expected(tiny, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return tiny.module(x)


# --- request fields -----------------------------------------------------------------------

def test_body_naming_the_model_of_the_path_is_accepted(tiny_client, tiny):
    body = {**GOOD, "id": "r1", "model_name": "tiny", "model_version": "1",
            "parameters": {"binary_data_output": False},
            "outputs": [{"name": "output", "parameters": {"binary_data": False}}]}
    r = tiny_client.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["outputs"][0]["data"]).reshape(1, 3)
    assert torch.equal(got, _expected(tiny, torch.tensor([[1.0, 2.0, 3.0, 4.0]])))
    assert r.json()["id"] == "r1"


def test_body_naming_another_model_is_refused(tiny_client):
    r = tiny_client.post("/v2/models/tiny/infer", json={**GOOD, "model_name": "resnet50"})
    assert r.status_code == 400
    assert "'model_name' 'resnet50' does not match the model in the URL path ('tiny')" \
        in r.json()["error"]


def test_body_naming_a_version_not_served_is_refused(tiny_client):
    r = tiny_client.post("/v2/models/tiny/infer", json={**GOOD, "model_version": "7"})
    assert r.status_code == 400
    assert "'model_version' '7' is not a version of this model" in r.json()["error"]


def test_unknown_top_level_field_is_still_refused_and_the_allowed_ones_listed(tiny_client):
    r = tiny_client.post("/v2/models/tiny/infer", json={**GOOD, "modle_name": "tiny"})
    assert r.status_code == 400
    assert "unknown request field(s): modle_name" in r.json()["error"]
    assert "model_name" in r.json()["error"].split("allowed:")[1]


@pytest.mark.parametrize("where", ["request", "output"])
def test_binary_data_flag_given_as_a_string_is_refused(tiny_client, where):
    body: dict = dict(GOOD)
    if where == "request":
        body["parameters"] = {"binary_data_output": "false"}
    else:
        body["outputs"] = [{"name": "output", "parameters": {"binary_data": "false"}}]
    r = tiny_client.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 400
    assert "must be a JSON boolean (true or false), got \"false\"" in r.json()["error"]


def test_classification_extension_is_refused_by_name(tiny_client):
    r = tiny_client.post("/v2/models/tiny/infer", json={
        **GOOD, "outputs": [{"name": "output", "parameters": {"classification": 2}}]})
    assert r.status_code == 400
    assert "classification extension is not supported" in r.json()["error"]


def test_binary_body_without_header_length_gets_a_hint(tiny_client):
    payload, headers = encode_infer_request({"input": torch.ones(1, 4)}, binary=True)
    del headers[HEADER_LENGTH]
    r = tiny_client.post("/v2/models/tiny/infer", content=payload, headers=headers)
    assert r.status_code == 400
    assert f"needs the {HEADER_LENGTH} header" in r.json()["error"]


def test_binary_body_with_a_wrong_header_length_gets_a_hint(tiny_client):
    payload, headers = encode_infer_request({"input": torch.ones(1, 4)}, binary=True)
    headers[HEADER_LENGTH] = str(int(headers[HEADER_LENGTH]) + 3)
    r = tiny_client.post("/v2/models/tiny/infer", content=payload, headers=headers)
    assert r.status_code == 400
    assert f"is {HEADER_LENGTH} the byte length of the JSON part only?" in r.json()["error"]


# --- error bodies and version paths ---------------------------------------------------------

def test_unknown_route_answers_the_protocols_error_body(tiny_client):
    r = tiny_client.get("/v2/modelz")
    assert r.status_code == 404
    assert r.json() == {"error": "no such endpoint: /v2/modelz"}


def test_wrong_method_answers_the_protocols_error_body(tiny_client):
    r = tiny_client.get("/v2/models/tiny/infer")
    assert r.status_code == 405
    assert r.json() == {"error": "method GET is not allowed on /v2/models/tiny/infer"}


def test_ready_for_a_version_that_does_not_exist_is_404(tiny_client):
    assert tiny_client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    r = tiny_client.get("/v2/models/tiny/versions/2/ready")
    assert r.status_code == 404
    assert "has no version '2'" in r.json()["error"]


# --- compressed bodies ----------------------------------------------------------------------

@pytest.mark.parametrize("encoding,compress", [("gzip", gzip.compress),
                                                ("deflate", zlib.compress)])
def test_compressed_binary_body_is_decompressed(tiny_client, tiny, encoding, compress):
    x = torch.randn(4, 4)
    payload, headers = encode_infer_request({"input": x}, binary=True)
    headers["content-encoding"] = encoding  # header length counts the decompressed JSON
    r = tiny_client.post("/v2/models/tiny/infer", content=compress(payload), headers=headers)
    assert r.status_code == 200, r.text
    out = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))
    assert torch.equal(out["output"], _expected(tiny, x))


def test_gzip_bomb_is_refused_after_the_size_limit(start_server, tiny, tiny_source,
                                                   raw_client):
    limit = 64 * 1024
    srv = start_server([tiny_source], keys=tiny.keys,
                       config=RuntimeConfig(max_request_bytes=limit))
    c = raw_client(srv.url)
    bomb = gzip.compress(b"{" + b" " * (48 << 20), compresslevel=9)  # 48 MiB inflated
    assert len(bomb) < limit
    r = c.post("/v2/models/tiny/infer", content=bomb,
               headers={"content-encoding": "gzip", "content-type": "application/json"})
    assert r.status_code == 413
    assert f"decompresses to more than the limit of {limit} bytes" in r.json()["error"]
    assert c.post("/v2/models/tiny/infer", json=GOOD).status_code == 200


def test_truncated_gzip_body_is_refused(tiny_client):
    data = gzip.compress(json.dumps(GOOD).encode())[:-12]
    r = tiny_client.post("/v2/models/tiny/infer", content=data,
                         headers={"content-encoding": "gzip"})
    assert r.status_code == 400
    assert "gzip request body is truncated" in r.json()["error"]


def test_gzip_body_without_content_encoding_gets_a_hint(tiny_client):
    r = tiny_client.post("/v2/models/tiny/infer", content=gzip.compress(b"{}"))
    assert r.status_code == 400
    assert "looks gzip-compressed: send it with 'Content-Encoding: gzip'" in r.json()["error"]


def test_unsupported_content_encoding_is_refused_by_name(tiny_client):
    r = tiny_client.post("/v2/models/tiny/infer", content=b"xx",
                         headers={"content-encoding": "br"})
    assert r.status_code == 400
    assert "Content-Encoding 'br' is not supported" in r.json()["error"]


# --- the served version across key rotation -------------------------------------------------

def _seal_version(tmp_path, module, key_version: int, **metadata: object) -> tuple:
    key = ModelKey.generate("tiny-mlp", version=key_version)
    path = tmp_path / f"tiny-v{key_version}.sealed"
    seal(module, path, key=key, metadata={"arch": MLP_ARCH, "arch_kwargs": MLP_KWARGS,
                                          **metadata})
    return path, key


def test_rotating_the_key_keeps_the_served_version_path(start_server, raw_client, tmp_path):
    torch.manual_seed(1)
    module = mlp(**MLP_KWARGS).eval()
    old_path, old_key = _seal_version(tmp_path, module, 1)
    new_path, new_key = _seal_version(tmp_path, module, 2)
    for path, key, key_version in ((old_path, old_key, 1), (new_path, new_key, 2)):
        srv = start_server([ModelSource("tiny", path)], keys=StaticKeys(key))
        c = raw_client(srv.url)
        meta = c.get("/v2/models/tiny").json()
        assert meta["versions"] == ["1"]
        assert meta["parameters"]["key_version"] == key_version
        assert c.get("/v2/models/tiny/versions/1/ready").status_code == 200
        r = c.post("/v2/models/tiny/versions/1/infer", json=GOOD)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1"
        srv.stop()


def test_serving_version_comes_from_the_sealed_metadata(start_server, raw_client, tmp_path):
    module = mlp(**MLP_KWARGS).eval()
    path, key = _seal_version(tmp_path, module, 1, serving_version="2")
    srv = start_server([ModelSource("tiny", path)], keys=StaticKeys(key))
    c = raw_client(srv.url)
    assert c.get("/v2/models/tiny").json()["versions"] == ["2"]
    assert c.post("/v2/models/tiny/versions/2/infer", json=GOOD).status_code == 200
    assert c.post("/v2/models/tiny/versions/1/infer", json=GOOD).status_code == 404


def test_invalid_serving_version_in_metadata_fails_the_load(start_server, tmp_path):
    module = mlp(**MLP_KWARGS).eval()
    path, key = _seal_version(tmp_path, module, 1, serving_version="../2")
    srv = start_server([ModelSource("tiny", path)], keys=StaticKeys(key))
    with pytest.raises(ConfigError, match="serving_version must be 1-64 letters"):
        srv.wait_ready(30)


# --- the certificate file and pinned contexts -----------------------------------------------

def test_written_certificate_pins_the_attested_key_for_httpx(start_server, tiny, tiny_source,
                                                             tmp_path):
    srv = start_server([tiny_source], keys=tiny.keys)
    path = write_certificate(srv.runtime.tls, tmp_path / "runtime.pem")
    pem = path.read_bytes()
    assert pem.count(b"BEGIN CERTIFICATE") == 2  # the leaf, then its throwaway CA
    assert crypto.tls_certificate_spki(pem) == srv.spki
    ctx = pinned_ssl_context(pem, srv.spki)
    with httpx.Client(base_url=srv.url, verify=ctx) as c:
        assert c.get("/v2/health/ready").status_code == 200


def test_pinned_context_refuses_another_runtime(start_server, tiny, tiny_source, recorder):
    pinned = start_server([tiny_source], keys=tiny.keys)
    other = start_server([recorder("rec")])
    ctx = pinned_ssl_context(pinned.cert_pem, pinned.spki)
    with httpx.Client(base_url=other.url, verify=ctx) as c, pytest.raises(httpx.ConnectError):
        c.get("/v2/health/ready")
    # the standard chain check alone (no SPKI hook) refuses it too: gevent/tritonclient path
    plain = pinned_ssl_context(pinned.cert_pem)
    with httpx.Client(base_url=other.url, verify=plain) as c, \
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        c.get("/v2/health/ready")


def test_pinned_context_refuses_a_certificate_whose_key_was_not_attested(start_server, tiny,
                                                                         tiny_source,
                                                                         recorder):
    one = start_server([tiny_source], keys=tiny.keys)
    two = start_server([recorder("rec")])
    with pytest.raises(BindingError, match="not the attested TLS key"):
        pinned_ssl_context(one.cert_pem, two.spki)


# --- serve --write-cert, as a real process ------------------------------------------------

@pytest.mark.slow
def test_serve_writes_its_certificate_and_it_pins_the_attested_key(
        keycache, tiny, sim_dir, tmp_path):  # noqa: F811
    config = trusting(sim_dir)
    sock = keycache([(tiny.key, allow(config))])
    cert = tmp_path / "runtime-cert.pem"
    args = [*_serve_args(tmp_path, sim_dir, tiny.path, sock, config), "--write-cert", str(cert)]
    with SubprocessServer.start(args) as srv:
        assert cert.stat().st_mode & 0o777 == 0o644  # public, written before listening
        with AttestedClient(srv.url, policy=sim_policy(config),
                            sim_roots=[sim_dir / "platform.pub"]) as client:
            client.attest()
            # the documented check: the file's key is the attested one, then pin the file
            ctx = pinned_ssl_context(cert.read_bytes(), client.pinned_spki)
        with httpx.Client(base_url=srv.url, verify=ctx) as c:
            assert c.get("/v2/health/live").json() == {"live": True}
        assert srv.stop() == 0


def test_serve_refuses_a_certificate_path_it_cannot_write(tmp_path, start_server, tiny,
                                                           tiny_source):
    srv = start_server([tiny_source], keys=tiny.keys)
    with pytest.raises(ConfigError, match="--write-cert: cannot write"):
        write_certificate(srv.runtime.tls, tmp_path / "missing-dir" / "cert.pem")
