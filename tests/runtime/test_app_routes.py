"""The runtime's HTTP app in-process (no TLS, no sockets): refusals answered with their
class's status, and every answer of the infer routes counted, dependencies' refusals too."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from fastapi.testclient import TestClient

from sealedtorch.errors import (
    ConfigError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    QueueFull,
)
from sealedtorch.runtime.app import create_app
from sealedtorch.runtime.kserve import TensorSpec
from sealedtorch.runtime.loader import LoadedModel
from sealedtorch.runtime.responses import response_for
from sealedtorch.runtime.serving import build_runtime
from sealedtorch.runtime.state import Runtime

GOOD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                    "data": [1, 2, 3, 4]}]}


@dataclass(frozen=True)
class _Missing:
    """A source whose file is gone: its slot fails to load."""

    name: str

    def load(self, keys: object, config: object, device: object = None) -> LoadedModel:
        raise ConfigError("no such file")


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    linear = LoadedModel.from_module("tiny", torch.nn.Linear(4, 3),
                                     inputs=[TensorSpec("input", "FP32", (-1, 4))],
                                     outputs=[TensorSpec("output", "FP32", (-1, 3))])
    rt = build_runtime([linear, _Missing("gone")], tee=None)
    rt.load_all()
    yield rt
    rt.close()


def _count(runtime: Runtime, model: str, code: int) -> float:
    return runtime.metrics.requests.value(model=model, code=str(code))


def test_a_load_refusal_is_answered_with_its_class_status_and_retry_after():
    response = response_for(QueueFull("model 'm' has 5 requests waiting"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.body == b'{"error":"model \'m\' has 5 requests waiting"}'


def test_a_bad_request_is_answered_with_its_class_status_and_no_retry_after():
    assert response_for(PayloadTooLarge("too big")).status_code == 413
    assert response_for(InvalidRequest("bad")).status_code == 400
    assert "retry-after" not in response_for(InvalidRequest("bad")).headers


def test_the_lookup_refusals_have_their_own_statuses():
    assert response_for(ModelNotFound("unknown model 'x'")).status_code == 404
    assert response_for(ModelNotReady("model 'x' is not ready")).status_code == 503


def test_an_infer_for_a_model_that_failed_to_load_is_refused_and_counted(runtime):
    with TestClient(create_app(runtime)) as client:
        r = client.post("/v2/models/gone/infer", json=GOOD)
    assert r.status_code == 503
    assert r.json() == {"error": "model 'gone' is not ready (failed: ConfigError: no such file)"}
    assert _count(runtime, "gone", 503) == 1


def test_an_infer_for_a_version_not_served_is_a_counted_404(runtime):
    with TestClient(create_app(runtime)) as client:
        r = client.post("/v2/models/tiny/versions/7/infer", json=GOOD)
    assert r.status_code == 404
    assert r.json() == {"error": "model 'tiny' has no version '7' (served: 1)"}
    assert _count(runtime, "tiny", 404) == 1


def test_an_infer_for_an_unknown_model_is_a_404_that_adds_no_metric_label(runtime):
    with TestClient(create_app(runtime)) as client:
        r = client.post("/v2/models/nope/infer", json=GOOD)
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'nope' (served: tiny, gone)"}
    assert 'model="nope"' not in runtime.metrics.render()


def test_a_bad_infer_body_is_counted_as_rejected_by_its_class_name(runtime):
    with TestClient(create_app(runtime)) as client:
        r = client.post("/v2/models/tiny/infer", content=b"{")
    assert r.status_code == 400
    assert runtime.metrics.rejected.value(model="tiny", reason="InvalidRequest") == 1
    assert _count(runtime, "tiny", 400) == 1


def test_model_metadata_of_a_model_that_failed_to_load_is_a_503_error(runtime):
    with TestClient(create_app(runtime)) as client:
        r = client.get("/v2/models/gone")
    assert r.status_code == 503
    assert r.json() == {"error": "model 'gone' is not ready (failed: ConfigError: no such file)"}


def test_two_apps_in_one_process_serve_their_own_runtime(runtime):
    other = build_runtime([LoadedModel.from_module(
        "other", torch.nn.Linear(4, 3), inputs=[TensorSpec("input", "FP32", (-1, 4))],
        outputs=[TensorSpec("output", "FP32", (-1, 3))])], tee=None)
    try:
        with TestClient(create_app(runtime)) as first, \
                TestClient(create_app(other)) as second:
            assert first.get("/v2/models/other").status_code == 404
            assert second.get("/v2/models/other").status_code == 200
    finally:
        other.close()
