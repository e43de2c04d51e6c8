"""Text in, text out over KServe v2: ``BYTES`` tensors for transformers models.

A served transformers model takes raw text, so nothing is tokenized outside the TEE:

=====================  ===========================  ==========================================
task                   input                        outputs
=====================  ===========================  ==========================================
text generation        ``text`` BYTES ``[b]``       ``text_output`` BYTES ``[b]``
text classification    ``text`` BYTES ``[b]``       ``logits`` FP32 ``[b, labels]``, ``label``
                                                    BYTES ``[b]``
feature extraction     ``text`` BYTES ``[b]``       ``embedding`` FP32 ``[b, hidden]`` (mean of
                                                    the last hidden state over the tokens)
=====================  ===========================  ==========================================

``BYTES`` elements travel as JSON strings (``"data": ["a", "b"]``) or, with the binary
tensor data extension, as the protocol's length-prefixed encoding (each element a
little-endian u32 byte length, then the bytes).  Text must be UTF-8.  Generation takes the
request ``parameters`` ``max_tokens``, ``temperature`` (0, the default here, is greedy),
``top_p``, ``stop`` and ``seed``, with the same meaning as the OpenAI-compatible API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .hf import GenerationParams, Pretrained, TextGenerator
from .kserve import (
    HEADER_LENGTH,
    REQUEST_FIELDS,
    InvalidRequest,
    PayloadTooLarge,
    RequestedOutput,
    TensorSpec,
    datatype_of,
    decode_bytes,
    encode_bytes,
    encode_infer_response,
)

#: Text answers are ordinary KServe responses (BYTES outputs are lists of strings).
encode_text_response = encode_infer_response

__all__ = ["TextRequest", "TextTask", "decode_bytes", "encode_bytes",
           "encode_text_response", "parse_text_request"]

BYTES = "BYTES"
INPUT = "text"
_GEN_PARAMS: dict[str, type | tuple[type, ...]] = {
    "max_tokens": int, "temperature": (int, float), "top_p": (int, float), "seed": int,
    "stop": (str, list)}


@dataclass
class TextRequest:
    id: str | None
    texts: list[str]
    parameters: dict[str, Any]
    outputs: list[RequestedOutput]


def _text(value: bytes | str, where: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{where}: text must be UTF-8") from None


def _binary_flag(params: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{where}: {key!r} must be a JSON boolean (true or false)")
    return value


def parse_text_request(header: bytes | bytearray | memoryview,
                       binary: memoryview | torch.Tensor, *,
                       outputs: Sequence[TensorSpec], max_batch_size: int,
                       model_name: str, model_versions: Sequence[str]) -> TextRequest:
    """Validate a text request: one ``text`` BYTES input of shape ``[b]``."""
    doc = _text_document(header, model_name, model_versions)
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise InvalidRequest("'id' must be a string")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest("'parameters' must be an object")
    item, where, count = _text_input(doc.get("inputs"), max_batch_size)
    raw_items = _raw_texts(item, binary, count, where)
    texts = [_text(t, f"{where}[{i}]") for i, t in enumerate(raw_items)]
    default_binary = _binary_flag(params, "binary_data_output", "parameters", False)
    requested = _text_outputs(doc.get("outputs"), outputs, default_binary)
    return TextRequest(req_id, texts, params, requested)


def _text_document(header: bytes | bytearray | memoryview, model_name: str,
                   model_versions: Sequence[str]) -> dict[str, Any]:
    """The JSON header as an object with only the protocol's fields, naming this model."""
    try:
        doc = json.loads(bytes(header))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc} (binary BYTES data "
                             f"needs the {HEADER_LENGTH} header)") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object with an 'inputs' list")
    unknown = set(doc) - REQUEST_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown request field(s): {', '.join(sorted(unknown))}")
    if doc.get("model_name") not in (None, model_name):
        raise InvalidRequest(f"'model_name' does not match the model in the URL path "
                             f"({model_name!r})")
    if doc.get("model_version") not in (None, "", *model_versions):
        raise InvalidRequest("'model_version' is not a version of this model")
    return doc


def _text_input(inputs: Any, max_batch_size: int) -> tuple[dict[str, Any], str, int]:
    """(the one input, where: its label in errors, batch size) of a text request."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidRequest(f"a text model takes exactly one input, {INPUT!r} (BYTES [batch])")
    item = inputs[0]
    where = f"inputs[0] ({item.get('name')!r})"
    if item.get("name") != INPUT:
        raise InvalidRequest(f"{where}: the model has no input named {item.get('name')!r} "
                             f"(inputs: {INPUT})")
    if item.get("datatype") != BYTES:
        raise InvalidRequest(f"{where}: datatype {item.get('datatype')!r} does not match the "
                             f"model's {BYTES}")
    shape = item.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int) \
            or isinstance(shape[0], bool) or shape[0] < 1:
        raise InvalidRequest(f"{where}: shape must be [batch] with batch >= 1, got {shape}")
    count = shape[0]
    if count > max_batch_size:
        raise PayloadTooLarge(f"batch of {count} texts is more than max_batch_size "
                              f"{max_batch_size}")
    return item, where, count


def _raw_texts(item: Mapping[str, Any], binary: memoryview | torch.Tensor, count: int,
               where: str) -> list[bytes | str]:
    """The ``count`` elements of the text input: from the binary part (length-prefixed) or
    from JSON ``data`` (strings), never both."""
    item_params = item.get("parameters") or {}
    if not isinstance(item_params, dict):
        raise InvalidRequest(f"{where}.parameters must be an object")
    size = item_params.get("binary_data_size")
    if size is not None:
        if "data" in item or not isinstance(size, int) or isinstance(size, bool) \
                or size != len(binary):
            raise InvalidRequest(f"{where}: binary_data_size must be the byte length of the "
                                 f"binary part ({len(binary)}), with no 'data'")
        return list(decode_bytes(binary, count, where))
    if len(binary):
        raise InvalidRequest(f"{len(binary)} bytes of binary data follow the JSON, but "
                             "no input has binary_data_size")
    data = item.get("data")
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise InvalidRequest(f"{where}: 'data' must be a list of strings")
    if len(data) != count:
        raise InvalidRequest(f"{where}: 'data' has {len(data)} elements, shape "
                             f"{item.get('shape')} needs {count}")
    return list(data)


def _text_outputs(wanted: Any, outputs: Sequence[TensorSpec],
                  default_binary: bool) -> list[RequestedOutput]:
    """The outputs asked for (all of the model's when none are named), each JSON or
    binary."""
    names = [s.name for s in outputs]
    if wanted is None:
        return [RequestedOutput(n, default_binary) for n in names]
    if not isinstance(wanted, list):
        raise InvalidRequest("'outputs' must be a list")
    requested = []
    for i, out in enumerate(wanted):
        if not isinstance(out, dict) or out.get("name") not in names:
            raise InvalidRequest(f"outputs[{i}]: the model's outputs are "
                                 f"{', '.join(names)}")
        requested.append(RequestedOutput(out["name"], _binary_flag(
            out.get("parameters") or {}, "binary_data", f"outputs[{i}].parameters",
            default_binary)))
    return requested


def _generation_params(params: Mapping[str, Any]) -> GenerationParams:
    for key, value in params.items():
        if key in _GEN_PARAMS and (not isinstance(value, _GEN_PARAMS[key])
                                   or isinstance(value, bool)):
            raise InvalidRequest(f"parameters.{key} has the wrong type")
    stop = params.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest("parameters.stop: at most 4 non-empty strings")
    out = GenerationParams(max_tokens=int(params.get("max_tokens", 64)),
                           temperature=float(params.get("temperature", 0.0)),
                           top_p=float(params.get("top_p", 1.0)), stop=stop,
                           seed=params.get("seed"))
    if not 1 <= out.max_tokens <= 1 << 16 or not 0 <= out.temperature <= 2 \
            or not 0 < out.top_p <= 1:
        raise InvalidRequest("parameters: max_tokens 1..65536, temperature 0..2, "
                             "top_p in (0, 1]")
    return out


class TextTask:
    """A transformers model served by task, text in and out, tokenizer inside the TEE."""

    def __init__(self, pretrained: Pretrained) -> None:
        self.pretrained = pretrained
        self.task = pretrained.task
        self.generator = TextGenerator(pretrained) if self.task == "text-generation" else None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(INPUT, BYTES, (-1,)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        cfg = self.pretrained.model.config
        dt = datatype_of(next(self.pretrained.model.parameters()).dtype)
        if self.task == "text-generation":
            return (TensorSpec("text_output", BYTES, (-1,)),)
        if self.task == "text-classification":
            return (TensorSpec("logits", dt, (-1, _label_count(cfg.num_labels))),
                    TensorSpec("label", BYTES, (-1,)))
        return (TensorSpec("embedding", dt, (-1, int(cfg.hidden_size))),)

    def run(self, texts: list[str], params: Mapping[str, Any]) -> dict[str, Any]:
        """Outputs for ``texts`` (called off the event loop)."""
        if self.generator is not None:
            gen = _generation_params(params)
            return {"text_output": [self.generator.generate(self.generator.encode(t), gen).text
                                    for t in texts]}
        tokenizer = self.pretrained.tokenizer
        model = self.pretrained.model
        device = next(model.parameters()).device
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            out = model(**batch)
        if self.task == "text-classification":
            logits = out.logits
            return {"logits": logits, "label": [_label(model.config.id2label, int(i))
                                                for i in logits.argmax(-1)]}
        mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"embedding": pooled}


def _label_count(num_labels: int | None) -> int:
    """A classifier's number of labels (transformers' config always sets it for one)."""
    if num_labels is None:
        raise ConfigError("a text-classification config must set num_labels")
    return int(num_labels)


def _label(id2label: Mapping[Any, str] | None, index: int) -> str:
    """The label name of class ``index``, or the index itself where the config has none."""
    return str((id2label or {}).get(index, index))
