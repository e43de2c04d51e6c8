"""Hugging Face transformers models inside the TEE: build, tokenize, generate.

A sealed transformers model names its class as ``transformers:<Class>`` (e.g.
``transformers:LlamaForCausalLM``) and carries ``config.json``, ``generation_config.json``
and the tokenizer in the encrypted metadata (see
:mod:`sealedtorch.format.importers.hf`).  Building it here:

- resolves ``<Class>`` as an attribute of the installed ``transformers`` package only (no
  other import, no remote code: ``auto_map`` is refused), after the runtime's allow-list
  (part of the measurement) has admitted the name;
- instantiates the model with its *parameters* on the ``meta`` device and weight
  initialisation switched off, so no memory is spent on random weights, while buffers
  computed at construction (rotary ``inv_freq``, position ids: not in checkpoints) are real;
- assigns the decrypted tensors as the parameters (``assign=True``: the weights exist once)
  and re-ties tied weights (``lm_head`` / embeddings), so nothing is left on ``meta``;
- builds the fast tokenizer from ``tokenizer.json`` text in memory: tokenizer files never
  touch disk inside the TEE, and text is tokenized there, not by the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, FormatError

if TYPE_CHECKING:  # transformers is an optional extra, imported where a model is built
    from transformers import PreTrainedModel

__all__ = [
    "HF_ARCH_PREFIX", "TASKS", "ExpectedTensors", "GenerationParams", "GenerationResult",
    "Pretrained", "TextGenerator", "build_pretrained", "expected_tensors", "load_pretrained",
]

HF_ARCH_PREFIX = "transformers:"
TASKS = ("text-generation", "text-classification", "feature-extraction")
_METADATA_KEY = "transformers"


def task_of(class_name: str) -> str:
    """The serving task a transformers class implies."""
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if class_name.endswith("ForSequenceClassification"):
        return "text-classification"
    if class_name.endswith("Model") and "For" not in class_name:
        return "feature-extraction"
    raise ConfigError(f"transformers class {class_name}: not a supported task (causal LM, "
                      f"sequence classification, or a base encoder model)")


def _model_class(class_name: str) -> type[PreTrainedModel]:
    import transformers

    cls = getattr(transformers, class_name, None) if class_name.isidentifier() else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ConfigError(f"{class_name!r} is not a model class of the installed transformers "
                          f"{transformers.__version__}")
    return cls


def _config_object(config: Mapping[str, Any], where: str) -> Any:
    from transformers import AutoConfig

    from ..format.importers.hf import check_config

    check_config(dict(config), where)
    rest = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(str(config["model_type"]), **rest)
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{where}: config.json does not describe a model this transformers "
                          f"can build ({exc})") from None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to ``meta``; buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


_BUILD_LOCK = threading.Lock()  # the patch above is process-wide


def instantiate(config: Mapping[str, Any], *, where: str = "model") -> PreTrainedModel:
    """The model ``config`` describes, parameters on ``meta``, buffers real."""
    from transformers.initialization import no_init_weights

    from ..format.importers.hf import check_config

    cls = _model_class(check_config(dict(config), where))
    cfg = _config_object(config, where)
    with _BUILD_LOCK, no_init_weights(), _parameters_on_meta():
        return cls(cfg)


@dataclass(frozen=True)
class ExpectedTensors:
    """What a checkpoint for a configuration must hold."""

    shapes: dict[str, tuple[int, ...]]
    tied: frozenset[str]  # may be absent: tied to another tensor
    ignorable: frozenset[str]  # non-persistent buffers some checkpoints still carry


def _tied_names(model: torch.nn.Module) -> frozenset[str]:
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, Mapping):
        return frozenset(str(k) for k in tied)
    return frozenset()


def expected_tensors(config: Mapping[str, Any], *, where: str = "config.json") -> ExpectedTensors:
    """Names and shapes of the tensors a checkpoint of ``config`` holds (no memory used)."""
    model = instantiate(config, where=where)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    buffers = {n for n, _ in model.named_buffers()}
    return ExpectedTensors(shapes, _tied_names(model), frozenset(buffers - set(shapes)))


def build_tokenizer(files: Mapping[str, str]) -> Any:
    """A fast tokenizer from in-memory ``tokenizer.json`` (+ config), or None."""
    if "tokenizer.json" not in files:
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        backend = Tokenizer.from_str(files["tokenizer.json"])
        options = json.loads(files.get("tokenizer_config.json", "{}"))
        special = json.loads(files.get("special_tokens_map.json", "{}"))
    except (ValueError, Exception) as exc:  # tokenizers raises its own Exception type
        raise FormatError(f"sealed tokenizer does not parse: {exc}") from None
    if not isinstance(options, dict) or not isinstance(special, dict):
        raise FormatError("sealed tokenizer_config.json / special_tokens_map.json are not "
                          "JSON objects")
    kwargs: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token", "model_max_length", "padding_side", "clean_up_tokenization_spaces",
                 "chat_template"):
        value = special.get(name, options.get(name))
        if isinstance(value, dict):  # {"content": "<s>", ...} in special_tokens_map.json
            value = value.get("content")
        if value is not None:
            kwargs[name] = value
    if "chat_template.jinja" in files:
        kwargs["chat_template"] = files["chat_template.jinja"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Pretrained:
    """A transformers model built around sealed weights, with its tokenizer and task."""

    model: PreTrainedModel
    tokenizer: Any
    task: str
    config: dict[str, Any]

    @property
    def class_name(self) -> str:
        return str(self.config["architectures"][0])


def build_pretrained(state: dict[str, torch.Tensor], metadata: Mapping[str, Any], *,
                     device: torch.device | str = "cpu", source: str = "model") -> Pretrained:
    """Build the sealed model around its decrypted ``state``.

    Raises:
        FormatError: the metadata is not a transformers model's, or names remote code.
        ConfigError: the weights do not fit the configured class, or the class is unknown.
    """
    hf = metadata.get(_METADATA_KEY)
    if not isinstance(hf, Mapping) or not isinstance(hf.get("config"), Mapping):
        raise FormatError(f"{source}: the sealed metadata has no transformers configuration")
    config = dict(hf["config"])
    model = instantiate(config, where=source)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        parts = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unexpected {result.unexpected_keys[:3]}"] if result.unexpected_keys else [])
        raise ConfigError(f"{source}: the sealed weights do not fit "
                          f"{config['architectures'][0]}: {'; '.join(parts)}")
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ConfigError(f"{source}: the sealed weights leave {left[:3]} unset")
    # transformers wraps PreTrainedModel.to in functools.wraps(Module.to), which its typing
    # turns into an unbound callable: the call is right, the inferred signature is not.
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    generation = hf.get("generation_config")
    if isinstance(generation, Mapping) and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(dict(generation))
    files = hf.get("files") or {}
    if not isinstance(files, Mapping):
        raise FormatError(f"{source}: sealed tokenizer files are not an object")
    tokenizer = build_tokenizer(files)
    return Pretrained(model, tokenizer, task_of(str(config["architectures"][0])), config)


def load_pretrained(path: str | os.PathLike[str], *, key: Any,
                    device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """Load a sealed transformers model: ``(model, tokenizer)``, weights decrypted once.

    ``key`` is a key file, a :class:`~sealedtorch.keys.ModelKey` or a key source (the
    keycache client).  The tokenizer is ``None`` when none was sealed.

    Raises:
        IntegrityError: the file was modified or the key is wrong.
        FormatError: the file is not a sealed transformers model, or names remote code.
        ConfigError: the weights do not fit the configured class.
    """
    from ..format import load_with_header

    state, header = load_with_header(path, key=key, device=device)
    try:
        built = build_pretrained(state, header.metadata, device=device, source=str(path))
    except BaseException:
        for t in state.values():
            if not t.is_meta:
                t.zero_()
        raise
    return built.model, built.tokenizer


# --- text generation ------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings (OpenAI's names); ``temperature == 0`` is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int


@dataclass
class _Stream:
    """Collects new tokens from ``generate`` and decides when to stop."""

    tokenizer: Any
    stop: tuple[str, ...]
    on_text: Callable[[str], None] | None
    prompt_seen: bool = False
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    stopped_by_string: bool = False
    text: str = ""

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped_by_string = self.text[:cut], True
        # Hold back what could still become a stop string or an incomplete character.
        safe = len(self.text) if self.stopped_by_string else max(
            self.emitted, len(self.text) - max((len(s) - 1 for s in self.stop), default=0))
        if self.text.endswith("\ufffd") and not self.stopped_by_string:
            safe = min(safe, len(self.text) - 1)
        if self.on_text is not None and safe > self.emitted:
            self.on_text(self.text[self.emitted:safe])
            self.emitted = safe

    def end(self) -> None:
        if self.on_text is not None and len(self.text) > self.emitted:
            self.on_text(self.text[self.emitted:])
            self.emitted = len(self.text)


class TextGenerator:
    """Generation for one causal LM; one generation at a time (a lock), seeded per call."""

    def __init__(self, pretrained: Pretrained) -> None:
        if pretrained.task != "text-generation":
            raise ConfigError(f"{pretrained.class_name} does not generate text")
        if pretrained.tokenizer is None:
            raise ConfigError(f"{pretrained.class_name}: no tokenizer was sealed with it")
        from transformers import GenerationMixin

        model = pretrained.model
        if not isinstance(model, GenerationMixin):  # every causal LM class is one
            raise ConfigError(f"{pretrained.class_name} has no generate()")
        #: Narrowed to a PreTrainedModel that is a GenerationMixin: transformers 5 keeps
        #: generate() off PreTrainedModel itself.
        self.model = model
        self.tokenizer = pretrained.tokenizer
        self._lock = threading.Lock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise ConfigError("this model's tokenizer has no chat template; use "
                              "/v1/completions")
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                 tokenize=True)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        return [int(t) for t in ids]

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams, *,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stream = _Stream(self.tokenizer, params.stop, on_text)

        class _StopString(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor,
                         **_: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stream.stopped_by_string,
                                  dtype=torch.bool, device=input_ids.device)

        device = next(self.model.parameters()).device
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        sample = params.temperature > 0
        options: dict[str, Any] = {"max_new_tokens": params.max_tokens, "do_sample": sample,
                                   "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        with self._lock, torch.random.fork_rng(devices=[]), torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            self.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=stream,
                                stopping_criteria=StoppingCriteriaList([_StopString()]),
                                **options)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        hit_eos = bool(stream.ids) and stream.ids[-1] in eos_ids
        finish = "stop" if stream.stopped_by_string or hit_eos else "length"
        return GenerationResult(stream.ids, stream.text, finish, len(prompt_ids))
