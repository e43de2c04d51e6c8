"""The clients KServe users already have — tritonclient.http and the kserve SDK — against a
real runtime over TLS, pinned to the attested key with the client's helper: JSON and binary
tensors, batch 1 and 4, outputs bit-identical to the plaintext model."""

from __future__ import annotations

import asyncio

import httpx
import kserve
import numpy as np
import pytest
import torch
import tritonclient.http as tritonclient_http
from kserve.protocol.infer_type import RequestedOutput

from sealedtorch.runtime.client import AttestedClient

from .conftest import sim_policy


@pytest.fixture
def served(start_server, tiny, tiny_source):
    return start_server([tiny_source], keys=tiny.keys)


@pytest.fixture
def attested(served, sim_dir):
    with AttestedClient(served.url, policy=sim_policy(),
                        sim_roots=[sim_dir / "platform.pub"]) as client:
        client.attest()
        yield client


def _expected(tiny, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return tiny.module(torch.from_numpy(x)).numpy()


def _triton(url: str, factory) -> object:
    return tritonclient_http.InferenceServerClient(
        url.removeprefix("https://"), ssl=True, ssl_context_factory=factory, insecure=True)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 4])
def test_tritonclient_infers_over_the_pinned_context(served, attested, tiny, binary, batch):
    x = np.random.default_rng(batch).standard_normal((batch, 4), dtype=np.float32)
    client = _triton(served.url, attested.ssl_context_factory())
    try:
        assert client.is_server_ready()
        assert client.is_model_ready("tiny", "1")
        assert not client.is_model_ready("tiny", "9")
        meta = client.get_model_metadata("tiny")
        assert meta["versions"] == ["1"]
        inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = tritonclient_http.InferRequestedOutput("output", binary_data=binary)
        result = client.infer("tiny", [inp], outputs=[out], model_version="1",
                              request_id="t1")
        assert np.array_equal(result.as_numpy("output"), _expected(tiny, x))
        assert result.get_response()["model_name"] == "tiny"
    finally:
        client.close()


def test_tritonclient_gzip_request_is_served(served, attested, tiny):
    x = np.ones((4, 4), dtype=np.float32)
    client = _triton(served.url, attested.ssl_context_factory())
    try:
        inp = tritonclient_http.InferInput("input", [4, 4], "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer("tiny", [inp], request_compression_algorithm="gzip")
        assert np.array_equal(result.as_numpy("output"), _expected(tiny, x))
    finally:
        client.close()


def test_tritonclient_pinned_to_one_runtime_refuses_another(served, attested, start_server,
                                                           recorder):
    other = start_server([recorder("rec")])
    client = _triton(other.url, attested.ssl_context_factory())
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            client.is_server_live()
    finally:
        client.close()


async def _kserve_infer(url: str, ctx, x: np.ndarray, binary: bool):
    config = kserve.RESTConfig(protocol="v2", verify=ctx, timeout=60)
    client = kserve.InferenceRESTClient(config)
    try:
        ready = await client.is_model_ready(url, "tiny")
        inp = kserve.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [RequestedOutput("output", parameters={"binary_data": binary})]
        request = kserve.InferRequest(model_name="tiny", infer_inputs=[inp],
                                      request_outputs=outputs)
        response = await client.infer(url, request, model_name="tiny")
        return ready, response
    finally:
        await client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 4])
def test_kserve_sdk_infers_over_the_pinned_context(served, attested, tiny, binary, batch):
    x = np.random.default_rng(10 + batch).standard_normal((batch, 4), dtype=np.float32)
    ready, response = asyncio.run(_kserve_infer(served.url, attested.ssl_context(), x,
                                                binary))
    assert ready is True
    assert response.model_name == "tiny"
    assert np.array_equal(response.outputs[0].as_numpy(), _expected(tiny, x))


def test_kserve_sdk_pinned_to_one_runtime_refuses_another(served, attested, start_server,
                                                         recorder):
    other = start_server([recorder("rec")])
    x = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(httpx.ConnectError):
        asyncio.run(_kserve_infer(other.url, attested.ssl_context(), x, True))


def test_tritonclient_with_the_written_certificate_file_as_ca(served, attested, tmp_path,
                                                             tiny):
    from sealedtorch.runtime.client import pinned_ssl_context
    from sealedtorch.runtime.server import write_certificate

    path = write_certificate(served.runtime.tls, tmp_path / "runtime.pem")
    pinned_ssl_context(path.read_bytes(), attested.pinned_spki)  # the documented check
    client = tritonclient_http.InferenceServerClient(
        served.url.removeprefix("https://"), ssl=True, ssl_options={"ca_certs": str(path)})
    try:
        x = np.ones((1, 4), dtype=np.float32)
        inp = tritonclient_http.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert np.array_equal(client.infer("tiny", [inp]).as_numpy("output"),
                              _expected(tiny, x))
    finally:
        client.close()
