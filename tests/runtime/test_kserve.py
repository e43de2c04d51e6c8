"""The KServe v2 wire format: requests validated with precise reasons, exact round trips."""

from __future__ import annotations

import json

import pytest
import torch

from sealedtorch.runtime.kserve import (
    HEADER_LENGTH,
    InvalidRequest,
    PayloadTooLarge,
    TensorSpec,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
)

IN = (TensorSpec("x", "FP32", (-1, 3)),)
OUT = (TensorSpec("y", "FP32", (-1, 3)),)


def parse(body, header=None, inputs=IN, outputs=OUT, max_batch_size=8, max_elements=1000):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return parse_infer_request(bytearray(body), header, inputs=inputs, outputs=outputs,
                               max_batch_size=max_batch_size, max_elements=max_elements)


def req(data, shape, datatype="FP32", name="x", **extra):
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}],
            **extra}


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.uint8, torch.bool, torch.float64, torch.int8])
def test_request_round_trip_is_exact(binary, dtype):
    t = (torch.randn(2, 3) * 100).to(dtype)
    spec = (TensorSpec("x", {torch.float32: "FP32", torch.float16: "FP16",
                             torch.bfloat16: "BF16", torch.int64: "INT64",
                             torch.uint8: "UINT8", torch.bool: "BOOL", torch.float64: "FP64",
                             torch.int8: "INT8"}[dtype], (-1, 3)),)
    body, headers = encode_infer_request({"x": t}, binary=binary)
    parsed = parse(body, headers.get(HEADER_LENGTH), inputs=spec)
    assert parsed.rows == 2
    assert parsed.inputs["x"].dtype == dtype
    assert torch.equal(parsed.inputs["x"], t)


@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trip_is_exact(binary):
    y = torch.randn(4, 3)
    parsed = parse(req([0.0] * 12, [4, 3], parameters={"binary_data_output": binary}))
    body, headers = encode_infer_response("m", "1", "req-7", {"y": y}, parsed.outputs)
    assert (HEADER_LENGTH in headers) is binary
    out = decode_infer_response(body, headers.get(HEADER_LENGTH))
    assert torch.equal(out["y"], y)
    header = json.loads(body[:int(headers.get(HEADER_LENGTH, len(body)))])
    assert header["model_name"] == "m" and header["id"] == "req-7"


def test_nested_json_data_is_accepted():
    parsed = parse(req([[1, 2, 3], [4, 5, 6]], [2, 3]))
    assert parsed.inputs["x"].tolist() == [[1, 2, 3], [4, 5, 6]]


def test_per_output_binary_choice():
    parsed = parse(req([0.0] * 3, [1, 3],
                       outputs=[{"name": "y", "parameters": {"binary_data": True}}]))
    assert parsed.outputs[0].binary


@pytest.mark.parametrize(("body", "reason"), [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"inputs": []}, "non-empty list"),
    ({"inputs": [], "extra": 1}, "unknown request field"),
    (req([0.0] * 3, [1, 3], name="nope"), "no input named 'nope'"),
    (req([0.0] * 3, [1, 3], datatype="FP64"), "datatype 'FP64' does not match"),
    (req([0.0] * 3, [3]), "1 dimensions"),
    (req([0.0] * 4, [1, 4]), "does not match the model's [-1, 3]"),
    (req([0.0] * 4, [1, 3]), "has 4 elements"),
    (req(["a", "b", "c"], [1, 3]), "must be numbers, got strings"),
    (req([[1, 2], [3]], [2, 3]), "not a regular array"),
    (req([0.0] * 3, [1, -3]), "non-negative integers"),
    (req([0.0] * 3, "1,3"), "non-negative integers"),
    (req([], [0, 3]), "at least 1"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3]}]}, "no 'data'"),
    ({**req([0.0] * 3, [1, 3]), "outputs": [{"name": "z"}]}, "no output named 'z'"),
    ({"inputs": [req([0.0] * 3, [1, 3])["inputs"][0]] * 2}, "given twice"),
])
def test_malformed_requests_say_why(body, reason):
    with pytest.raises(InvalidRequest, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse(body)


def test_integer_inputs_refuse_floats_and_out_of_range_values():
    spec = (TensorSpec("ids", "INT8", (-1, 2)),)
    with pytest.raises(InvalidRequest, match="must be integers, got floats"):
        parse(req([1.5, 2.0], [1, 2], "INT8", "ids"), inputs=spec)
    with pytest.raises(InvalidRequest, match="outside the range of INT8"):
        parse(req([1, 300], [1, 2], "INT8", "ids"), inputs=spec)


def test_missing_inputs_and_disagreeing_batch_dimensions():
    two = (TensorSpec("a", "FP32", (-1, 1)), TensorSpec("b", "FP32", (-1, 1)))
    with pytest.raises(InvalidRequest, match="missing input"):
        parse(req([1.0], [1, 1], name="a"), inputs=two)
    both = {"inputs": [req([1.0], [1, 1], name="a")["inputs"][0],
                       req([1.0, 2.0], [2, 1], name="b")["inputs"][0]]}
    with pytest.raises(InvalidRequest, match="disagree on the batch"):
        parse(both, inputs=two)


def test_limits_are_413():
    with pytest.raises(PayloadTooLarge, match="max_batch_size"):
        parse(req([0.0] * 27, [9, 3]))
    with pytest.raises(PayloadTooLarge, match="elements"):
        parse(req([0.0] * 27, [9, 3]), max_elements=20)


def test_binary_sizes_are_checked():
    body, headers = encode_infer_request({"x": torch.zeros(2, 3)}, binary=True)
    n = int(headers[HEADER_LENGTH])
    with pytest.raises(InvalidRequest, match="binary data ends after the body"):
        parse(body[:-4], str(n))
    with pytest.raises(InvalidRequest, match="bytes of binary data follow"):
        parse(body + b"xx", str(n))
    with pytest.raises(InvalidRequest, match="outside the body"):
        parse(body, str(len(body) + 1))
    with pytest.raises(InvalidRequest, match="must be an integer"):
        parse(body, "abc")
    doc = json.loads(body[:n])
    doc["inputs"][0]["parameters"]["binary_data_size"] = 20
    header = json.dumps(doc).encode()
    with pytest.raises(InvalidRequest, match="binary_data_size is 20 bytes"):
        parse(header + body[n:], str(len(header)))


def test_tensor_specs_validate():
    with pytest.raises(ValueError, match="unknown datatype"):
        TensorSpec("x", "FLOAT", (-1,))
    with pytest.raises(ValueError, match="shape"):
        TensorSpec("x", "FP32", (0, 2))
