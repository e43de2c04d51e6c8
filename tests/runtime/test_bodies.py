"""Large JSON bodies: declared names, datatypes, shapes and sizes are checked before any
tensor data is parsed, and the data then parses to exactly what the ordinary path gives."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from sealedtorch.runtime.bodies import (
    LARGE_JSON_BYTES,
    BudgetTimeout,
    ByteBudget,
    prevalidate_json,
)
from sealedtorch.runtime.kserve import (
    InvalidRequest,
    PayloadTooLarge,
    TensorSpec,
    parse_infer_parts,
)

N = LARGE_JSON_BYTES // 2 + 1000   # enough elements for a large body ("d, " per element)


def _both_paths(doc: dict, specs: list[TensorSpec], **limits: int) -> tuple[dict, dict]:
    limits = {"max_batch_size": 64, "max_elements": 1 << 25, **limits}
    text = bytearray(json.dumps(doc).encode())
    assert len(text) > LARGE_JSON_BYTES
    plain = parse_infer_parts(text, memoryview(b""), inputs=specs, outputs=[], **limits)
    header, binary = prevalidate_json(text, inputs=specs, **limits)
    fast = parse_infer_parts(header, binary, inputs=specs, outputs=[], **limits)
    return plain.inputs, fast.inputs


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "BF16", "INT64", "INT8",
                                      "UINT8", "INT32"])
def test_the_prevalidated_path_gives_the_same_tensors_as_the_json_path(datatype):
    rng = np.random.default_rng(0)
    if datatype.startswith(("INT", "UINT")):
        lo = 0 if datatype.startswith("U") else -100
        values = rng.integers(lo, 100, size=N).tolist()
    else:
        values = (rng.standard_normal(N) * 1e3).tolist()
    spec = TensorSpec("x", datatype, (-1, -1))
    rows = 2
    cols = N // rows
    nested = [values[i * cols:(i + 1) * cols] for i in range(rows)]
    plain, fast = _both_paths(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": [rows, cols],
                     "data": nested}]}, [spec])
    assert fast["x"].dtype == plain["x"].dtype
    assert torch.equal(fast["x"], plain["x"])


def test_several_inputs_keep_their_own_data():
    specs = [TensorSpec("a", "FP32", (-1, -1)), TensorSpec("b", "INT64", (-1, 3))]
    doc = {"id": 'has "data": [9] in a string', "inputs": [
        {"name": "b", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
        {"name": "a", "datatype": "FP32", "shape": [1, N], "data": [0.25] * N}]}
    plain, fast = _both_paths(doc, specs)
    assert torch.equal(fast["a"], plain["a"]) and torch.equal(fast["b"], plain["b"])


def _large(shape: list[int], datatype: str = "FP32", data: bytes = b"1", name: str = "x"
           ) -> bytearray:
    filler = b",".join([data] * (LARGE_JSON_BYTES // 2))
    return bytearray(b'{"inputs":[{"name":"%s","datatype":"%s","shape":%s,"data":[%s]}]}'
                     % (name.encode(), datatype.encode(), json.dumps(shape).encode(), filler))


SPEC = [TensorSpec("x", "FP32", (-1, -1))]


def test_a_declared_batch_over_the_limit_is_refused_before_the_data_is_parsed():
    # the numbers would not even parse: the declared shape is refused first
    body = _large([65, 10], data=b"1.5.5")
    with pytest.raises(PayloadTooLarge, match="max_batch_size 64"):
        prevalidate_json(body, inputs=SPEC, max_batch_size=64, max_elements=1 << 25)


def test_declared_elements_over_the_limit_are_refused_before_the_data_is_parsed():
    with pytest.raises(PayloadTooLarge, match="more than the limit of 1000"):
        prevalidate_json(_large([1, 5000], data=b"1.5.5"), inputs=SPEC, max_batch_size=64,
                         max_elements=1000)


def test_a_wrong_datatype_or_name_is_refused_before_the_data_is_parsed():
    with pytest.raises(InvalidRequest, match="does not match the model's FP32"):
        prevalidate_json(_large([1, 10], datatype="FP64"), inputs=SPEC, max_batch_size=64,
                         max_elements=1 << 25)
    with pytest.raises(InvalidRequest, match="no input named 'y'"):
        prevalidate_json(_large([1, 10], name="y"), inputs=SPEC, max_batch_size=64,
                         max_elements=1 << 25)


def test_data_that_disagrees_with_the_declared_shape_is_refused():
    count = LARGE_JSON_BYTES // 2
    with pytest.raises(InvalidRequest, match="elements"):
        prevalidate_json(_large([1, count + 1]), inputs=SPEC, max_batch_size=64,
                         max_elements=1 << 25)
    with pytest.raises(InvalidRequest, match="more than the"):
        prevalidate_json(_large([1, count - 1]), inputs=SPEC, max_batch_size=64,
                         max_elements=1 << 25)


def test_garbage_numbers_in_a_large_body_are_refused():
    with pytest.raises(InvalidRequest, match="not a regular array of numbers"):
        prevalidate_json(_large([1, LARGE_JSON_BYTES // 2], data=b"1.5.5"), inputs=SPEC,
                         max_batch_size=64, max_elements=1 << 25)


def test_integers_beyond_64_bits_are_refused_not_clamped():
    spec = [TensorSpec("x", "INT64", (-1, -1))]
    with pytest.raises(InvalidRequest, match="integers within range"):
        prevalidate_json(_large([1, LARGE_JSON_BYTES // 2], "INT64",
                                data=b"99999999999999999999"),
                         inputs=spec, max_batch_size=64, max_elements=1 << 25)


def test_large_non_numeric_data_must_use_the_binary_extension():
    with pytest.raises(PayloadTooLarge, match="binary tensor extension"):
        prevalidate_json(_large([1, LARGE_JSON_BYTES // 2], "BOOL", data=b"true"),
                         inputs=[TensorSpec("x", "BOOL", (-1, -1))], max_batch_size=64,
                         max_elements=1 << 25)


def test_the_byte_budget_makes_a_request_wait_then_time_out():
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        events = []
        first = await budget.acquire(80, 1)
        with pytest.raises(BudgetTimeout, match="80 of 100 bytes"):
            await budget.acquire(30, 0.05)
        events.append("timed out")

        async def later() -> None:
            got = await budget.acquire(30, 5)
            events.append("second in")
            await budget.release(got)

        task = asyncio.create_task(later())
        await asyncio.sleep(0.05)
        events.append("releasing")
        await budget.release(first)
        await task
        assert budget.used == 0
        assert await budget.acquire(10**9, 1) == 100  # never more than the capacity
        return events

    assert asyncio.run(scenario()) == ["timed out", "releasing", "second in"]


@pytest.mark.parametrize("tail", [b"1.5.5", b"1 2", b"1e", b"", b"-"])
def test_a_malformed_last_number_is_refused(tail):
    body = _large([1, LARGE_JSON_BYTES // 2 + 1])
    end = body.rindex(b"]}]}")
    body[end:end] = b"," + tail
    with pytest.raises(InvalidRequest, match="not a regular array of numbers"):
        prevalidate_json(body, inputs=SPEC, max_batch_size=64, max_elements=1 << 25)
