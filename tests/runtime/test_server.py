"""The server over real TLS on 127.0.0.1: protocol endpoints, validation, batching, queueing,
health under load, metrics and graceful shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import ssl
import threading
import time

import httpx
import pytest
import torch

from sealedtorch import crypto
from sealedtorch.runtime.config import RuntimeConfig
from sealedtorch.runtime.kserve import HEADER_LENGTH, decode_infer_response, encode_infer_request


def test_tls_endpoints_metadata_and_exact_inference(start_server, tiny, tiny_source, raw_client,
                                                    body):
    srv = start_server([tiny_source], keys=tiny.keys)
    assert srv.url.startswith("https://127.0.0.1:")
    # the certificate served on the wire is the one whose key the runtime attests
    host, port = srv.url.removeprefix("https://").split(":")
    served = ssl.get_server_certificate((host, int(port)))
    assert crypto.tls_certificate_spki(served.encode()) == srv.spki
    c = raw_client(srv.url)
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").status_code == 200
    assert "binary_tensor_data" in c.get("/v2").json()["extensions"]
    meta = c.get("/v2/models/tiny").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["model_id"] == "tiny-mlp"
    assert meta["versions"] == ["1"]
    assert c.get("/v2/models/tiny/versions/1").status_code == 200
    assert c.get("/v2/models/tiny/ready").json()["ready"] is True

    x = torch.randn(5, 4)
    with torch.inference_mode():
        expected = tiny.module(x)
    r = c.post("/v2/models/tiny/infer", json={
        "id": "abc", "inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 4],
                                 "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "abc" and doc["model_name"] == "tiny" and doc["model_version"] == "1"
    got = torch.tensor(doc["outputs"][0]["data"], dtype=torch.float32).reshape(5, 3)
    assert torch.equal(got, expected)  # JSON floats round-trip float32 exactly

    payload, headers = encode_infer_request({"input": x}, binary=True)
    r = c.post("/v2/models/tiny/versions/1/infer", content=payload, headers=headers)
    assert r.status_code == 200 and HEADER_LENGTH in r.headers
    out = decode_infer_response(r.content, r.headers[HEADER_LENGTH])
    assert torch.equal(out["output"], expected)


def test_bad_requests_get_4xx_with_reasons_and_the_server_keeps_serving(
        start_server, tiny, tiny_source, raw_client):
    config = RuntimeConfig(max_request_bytes=4096, max_batch_size=4)
    srv = start_server([tiny_source], keys=tiny.keys, config=config)
    c = raw_client(srv.url)
    good = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                        "data": [1, 2, 3, 4]}]}
    cases = [
        (b"{", 400, "not valid JSON"),
        (json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 4],
                                 "data": [1, 2, 3, 4]}]}).encode(), 400, "datatype"),
        (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 5],
                                 "data": [1, 2, 3, 4, 5]}]}).encode(), 400, "shape [1, 5]"),
        (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 4],
                                 "data": [0] * 20}]}).encode(), 413, "max_batch_size"),
        (b"[" + b"0," * 5000 + b"0]", 413, "max_request_bytes"),
    ]
    for payload, status, reason in cases:
        r = c.post("/v2/models/tiny/infer", content=payload,
                   headers={"content-type": "application/json"})
        assert r.status_code == status, (reason, r.text)
        assert reason in r.json()["error"]
    # chunked upload without Content-Length is limited too
    r = c.post("/v2/models/tiny/infer", content=iter([b"x" * 3000, b"x" * 3000]))
    assert r.status_code == 413
    assert c.post("/v2/models/nope/infer", json=good).status_code == 404
    assert c.post("/v2/models/tiny/versions/9/infer", json=good).status_code == 404
    assert c.get("/v2/models/nope").status_code == 404
    r = c.post("/v2/models/tiny/infer", json=good)
    assert r.status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    metrics = c.get("/metrics").text
    assert 'sealedtorch_runtime_requests_total{model="tiny",code="400"} 3' in metrics
    assert 'sealedtorch_runtime_requests_total{model="tiny",code="413"} 3' in metrics
    assert 'sealedtorch_runtime_requests_total{model="tiny",code="200"} 1' in metrics


def test_concurrent_requests_are_batched_and_split_back(start_server, recorder, raw_client):
    model = recorder()
    srv = start_server([model], config=RuntimeConfig(batch_delay_ms=150, max_batch_size=64))
    c = raw_client(srv.url)

    def call(i: int) -> list[list[float]]:
        r = c.post("/v2/models/rec/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [i, i, i, i]}]})
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    assert results == [[2.0 * i] * 4 for i in range(8)]
    assert sum(model.module.calls) == 16
    assert len(model.module.calls) < 8  # at least two requests shared a forward pass
    text = c.get("/metrics").text
    assert 'sealedtorch_runtime_batch_requests_count{model="rec"}' in text


def test_one_bad_request_in_a_batch_fails_alone(start_server, recorder, raw_client, body):
    srv = start_server([recorder()], config=RuntimeConfig(batch_delay_ms=150))
    c = raw_client(srv.url)
    values = [[[1.0, 1.0]], [[-1.0, 1.0]], [[3.0, 3.0]]]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda v: c.post("/v2/models/rec/infer", json=body(v)),
                                  values))
    assert [r.status_code for r in responses] == [200, 400, 200]
    assert "ValueError: negative input" in responses[1].json()["error"]
    assert responses[2].json()["outputs"][0]["data"] == [6.0, 6.0]


def test_slow_inference_never_blocks_health_and_full_queue_is_503(
        start_server, recorder, raw_client, body):
    srv = start_server([recorder(delay=1.0)], config=RuntimeConfig(max_queue=1))
    url = srv.url
    results: dict[str, int] = {}

    def call(tag: str) -> None:
        with httpx.Client(base_url=url, verify=False, timeout=30) as c:
            results[tag] = c.post("/v2/models/rec/infer", json=body([[1.0, 2.0]])).status_code

    first = threading.Thread(target=call, args=("first",))
    first.start()
    c = raw_client(url)
    deadline = time.monotonic() + 5
    while srv.runtime.slots["rec"].model.module.calls == [] and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    while srv.runtime.slots["rec"].batcher.depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    t = time.perf_counter()
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    assert time.perf_counter() - t < 0.5  # answered while a forward pass is running
    third = c.post("/v2/models/rec/infer", json=body([[1.0, 2.0]]))
    assert third.status_code == 503 and "max_queue" in third.json()["error"]
    assert third.headers["retry-after"] == "1"
    first.join()
    second.join()
    assert results == {"first": 200, "second": 200}
    assert 'reason="queue_full"} 1' in c.get("/metrics").text


def test_graceful_shutdown_finishes_requests_in_flight(start_server, recorder, body):
    srv = start_server([recorder(delay=0.8)])
    model = srv.runtime.slots["rec"].model
    status: list[int] = []

    def call() -> None:
        with httpx.Client(base_url=srv.url, verify=False, timeout=30) as c:
            status.append(c.post("/v2/models/rec/infer", json=body([[1.0, 2.0]])).status_code)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 5
    while not model.module.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.stop()
    t.join()
    assert status == [200]
    assert srv.runtime.slots["rec"].state == "stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/v2/health/live", verify=False, timeout=2)


def test_shutdown_zeroes_the_weights(start_server, tiny, tiny_source):
    srv = start_server([tiny_source], keys=tiny.keys)
    module = srv.runtime.slots["tiny"].model.module
    assert any(bool(p.abs().sum() > 0) for p in module.parameters())
    srv.stop()
    assert all(bool(p.abs().sum() == 0) for p in module.parameters())


def test_metrics_exposition(start_server, tiny, tiny_source, raw_client, body):
    srv = start_server([tiny_source], keys=tiny.keys)
    c = raw_client(srv.url)
    c.post("/v2/models/tiny/infer", json=body([[1, 2, 3, 4]], name="input"))
    r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for needle in ("# TYPE sealedtorch_runtime_requests_total counter",
                   "# TYPE sealedtorch_runtime_request_duration_seconds histogram",
                   'sealedtorch_runtime_request_duration_seconds_bucket{model="tiny",le="+Inf"} 1',
                   'sealedtorch_runtime_batch_size_count{model="tiny"} 1',
                   'sealedtorch_runtime_model_ready{model="tiny"} 1',
                   'sealedtorch_runtime_model_load_seconds{model="tiny"}',
                   "sealedtorch_runtime_start_time_seconds"):
        assert needle in text, needle
    for line in text.splitlines():  # every sample line is NAME{LABELS} VALUE
        if not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            float(value.replace("+Inf", "inf"))
            assert name_labels.startswith("sealedtorch_runtime_")


def test_binary_body_in_odd_chunks_lands_in_the_right_tensors(start_server, raw_client):
    """The binary part is received straight into tensor memory; chunk boundaries that cut
    the JSON header or the data anywhere change nothing."""
    from sealedtorch.runtime.kserve import TensorSpec, encode_infer_request_parts
    from sealedtorch.runtime.loader import LoadedModel

    class Pair(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return a + 1, b.to(torch.int64) * 2

    model = LoadedModel.from_module(
        "pair", Pair(),
        inputs=[TensorSpec("a", "FP64", (-1, 3)), TensorSpec("b", "INT8", (-1, 5))],
        outputs=[TensorSpec("a1", "FP64", (-1, 3)), TensorSpec("b2", "INT64", (-1, 5))])
    srv = start_server([model])
    c = raw_client(srv.url)
    a = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randint(-100, 100, (2, 5), dtype=torch.int8)
    for order in (("a", "b"), ("b", "a")):  # the FP64 tensor is misaligned when b goes first
        named = {k: {"a": a, "b": b}[k] for k in order}
        parts, headers = encode_infer_request_parts(named)
        blob = b"".join(bytes(p) for p in parts)
        for size in (1, 7, 50, len(blob)):
            chunks = (blob[i:i + size] for i in range(0, len(blob), size))
            r = c.post("/v2/models/pair/infer", content=chunks, headers=headers)
            assert r.status_code == 200, r.text
            out = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))
            assert torch.equal(out["a1"], a + 1)
            assert torch.equal(out["b2"], b.to(torch.int64) * 2)
    bad = {**headers, HEADER_LENGTH: str(len(blob) + 1)}
    r = c.post("/v2/models/pair/infer", content=iter([blob]), headers=bad)
    assert r.status_code == 400 and "outside the body" in r.json()["error"]


def test_unexpected_errors_are_json_500_and_logged(start_server, recorder, raw_client, caplog,
                                                   body):
    srv = start_server([recorder()])
    srv.runtime.slots["rec"].batcher.submit = None  # break the worker hand-off
    r = raw_client(srv.url).post("/v2/models/rec/infer", json=body([[1.0, 2.0]]))
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (TypeError); see the server log"}
    assert any("internal error on POST /v2/models/rec/infer" in m for m in caplog.messages)
    assert raw_client(srv.url).get("/v2/health/live").status_code == 200
