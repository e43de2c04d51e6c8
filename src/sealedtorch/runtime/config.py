"""The runtime's configuration: which architectures may be built, limits, device.

The configuration is part of what the runtime attests to: its canonical bytes
(:meth:`RuntimeConfig.canonical_bytes`) are an input of the sim measurement (and, on real
TEEs, belong in the measured image), so a relying party that pins the measurement also pins
the allow-list of architectures, the request limits and the device.  Every setting that
changes behaviour therefore lives here, and command-line overrides (``--device``) are
folded into the configuration *before* it is measured.

A configuration file is YAML or JSON with the fields of :class:`RuntimeConfig`; unknown
fields are errors.  ``sealedtorch serve --print-config`` writes the canonical form;
``sealedtorch attest measure --config FILE`` and ``serve --config FILE --print-measurement``
both measure the canonical form of FILE (whatever its layout), the value the running server
reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..attest.policy import Rule
from ..errors import ConfigError

__all__ = ["DEFAULT_ARCHITECTURES", "REFUSED_ARCHITECTURES", "RuntimeConfig", "ServedModel",
           "load_config", "runtime_measurement"]

_TORCHVISION = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
    "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "convnext_tiny", "convnext_small", "regnet_y_400mf",
    "vit_b_16", "swin_t", "densenet121", "squeezenet1_1", "shufflenet_v2_x1_0",
)

#: Hugging Face transformers classes admitted by default (``transformers:<Class>``): each
#: is code of the installed transformers package, built from a sealed config.json.
_TRANSFORMERS = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel",
    "GemmaForCausalLM", "Phi3ForCausalLM", "BertModel", "BertForSequenceClassification",
    "RobertaModel", "RobertaForSequenceClassification", "DistilBertModel",
    "DistilBertForSequenceClassification", "XLMRobertaModel",
)

#: The default allow-list: torchvision classifiers, common transformers classes, and the
#: built-in sentence-embedding BERT, MLP and EfficientNet-Lite0.  ``torch.export``
#: programs are not on it and cannot be put on it: torch's loader unpickles archive entries
#: (weights or constants marked ``use_pickle``, custom and opaque objects, sample inputs),
#: so a sealed program would run its owner's code inside the attested runtime.  They stay
#: refused until sealedtorch has a strict pt2 parser of its own.
DEFAULT_ARCHITECTURES: tuple[str, ...] = (
    *(f"torchvision.models:{name}" for name in _TORCHVISION),
    *(f"transformers:{name}" for name in _TRANSFORMERS),
    "sealedtorch.runtime.architectures:sentence_bert",
    "sealedtorch.runtime.architectures:mlp",
    "sealedtorch.runtime.architectures:efficientnet_lite0",
)

#: Architecture names refused even when a configuration lists them (see above).
REFUSED_ARCHITECTURES: frozenset[str] = frozenset({"torch.export"})


class ServedModel(BaseModel):
    """What one served name must be: the owner's model id, the lowest key version accepted
    (older files and retired versions are refused) and, optionally, the SHA-256 (hex) of the
    exact sealed file and/or the owner keys whose signed manifest must vouch for the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str
    min_key_version: int = Field(1, ge=1, le=2**32 - 1)
    sha256: str | None = None
    #: Owners' Ed25519 public keys (hex): when set, the file needs a manifest signed by one
    #: of them (``FILE.manifest``, :mod:`sealedtorch.runtime.manifest`).
    manifest_keys: tuple[str, ...] | None = None

    @field_validator("manifest_keys")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least one owner key (or leave manifest_keys unset)")
        out = []
        for key in value:
            text = key.strip().lower()
            if len(text) != 64 or not all(c in "0123456789abcdef" for c in text):
                raise ValueError("manifest_keys entries are Ed25519 public keys, 64 hex "
                                 "digits (`sealedtorch manifest keygen` prints one)")
            out.append(text)
        return tuple(dict.fromkeys(out))

    @field_validator("model_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        from ..keys import validate_model_id

        return validate_model_id(value)

    @field_validator("sha256")
    @classmethod
    def _check_digest(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip().lower()
        if len(text) != 64 or not all(c in "0123456789abcdef" for c in text):
            raise ValueError("sha256 must be 64 hex digits (sha256sum of the .sealed file)")
        return text


#: Optional fields left out of the canonical form while unset, so that adding them did not
#: change the measurement of configurations that do not use them.
_UNSET_NOT_MEASURED = ("keycache", "models")


class RuntimeConfig(BaseModel):
    """Everything that decides what the runtime will build and accept.

    - ``architectures``: the allow-list.  Entries are ``module:callable`` (an importable
      factory returning an ``nn.Module``).  A sealed model whose architecture is not listed
      is refused before anything is imported.  ``torch.export`` is refused here (a
      configuration naming it is invalid), because its loader can unpickle file content.
    - ``device``: ``cpu``, ``cuda`` (fails if CUDA is unavailable) or ``auto``.
    - ``max_batch_size``: the most rows (first dimension) a request may carry and the most
      rows the dynamic batcher puts into one forward pass.
    - ``batch_delay_ms``: how long the batcher waits for more requests after the first;
      0 batches only what is already queued (no added latency).
    - ``max_queue``: requests waiting per model before new ones get 503.
    - ``max_request_bytes``: the largest request body (413 above it).
    - ``max_elements``: the most elements one input tensor may have.
    - ``request_timeout_s``: how long a request may wait for its result (504 after).
    - ``key_retries`` / ``key_retry_delay_s``: attempts to get a key while the keycache is
      unreachable or stale (attempts, first delay; the delay doubles, capped at 5 s).
    - ``torch_threads``: intra-op threads (``None``: torch's default).
    - ``key_watch_s``: how often the runtime re-checks with the keycache that it still
      holds the key of every loaded model (0: never; see :mod:`.watch`).  A model whose key
      the keycache no longer holds is unloaded within this interval; a newer version whose
      file is at the configured path is loaded and swapped in without a restart.
    - ``key_watch_grace_s``: how long a loaded model keeps serving while the keycache
      cannot be reached at all (socket gone, timeouts), counted from the last successful
      check; then it is unloaded too.
    - ``models``: served name -> :class:`ServedModel` (model id, ``min_key_version``,
      optional ``sha256`` of the sealed file).  When set, the runtime serves only the names
      listed, and refuses, before asking for any key, a file whose preamble names another
      model id or a lower key version, or whose SHA-256 differs.  ``None``: any file under
      any name (unpinned: the host chooses what is served; logged as a warning).
    - ``keycache``: the rules (same shape as a policy's ``allow`` entries: ``tee``,
      ``measurement``, ``mr_enclave``/``mr_signer``, ``platform_key``, ...) that the keycache
      answering the runtime's key requests must match, with evidence bound to the runtime's
      nonce (mutual attestation).  ``None`` (the default): the runtime refuses every key.
      A sim rule must name ``platform_key``: sim evidence is trusted only from platforms
      named here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architectures: tuple[str, ...] = DEFAULT_ARCHITECTURES
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    max_batch_size: int = Field(64, ge=1, le=4096)
    batch_delay_ms: float = Field(0.0, ge=0, le=1000)
    max_queue: int = Field(64, ge=1, le=100_000)
    max_request_bytes: int = Field(64 << 20, ge=1024, le=4 << 30)
    max_elements: int = Field(1 << 25, ge=1, le=1 << 34)
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    key_retries: int = Field(5, ge=1, le=100)
    key_retry_delay_s: float = Field(0.5, ge=0, le=60)
    torch_threads: int | None = Field(None, ge=1, le=1024)
    key_watch_s: float = Field(30.0, ge=0, le=3600)
    key_watch_grace_s: float = Field(60.0, ge=0, le=86400)
    keycache: tuple[Rule, ...] | None = None
    models: dict[str, ServedModel] | None = None

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: dict[str, ServedModel] | None
                      ) -> dict[str, ServedModel] | None:
        if value is None:
            return None
        from .loader import check_model_name

        for name in value:
            try:
                check_model_name(name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("keycache")
    @classmethod
    def _check_keycache(cls, value: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least one keycache rule (or leave keycache unset)")
        for index, rule in enumerate(value):
            if rule.tee == "sim" and not rule.platform_key:
                raise ValueError(f"keycache[{index}]: a sim rule must name platform_key (the "
                                 f"keycache's sim platform.pub, hex)")
        return value

    @field_validator("architectures")
    @classmethod
    def _check_architectures(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if entry in REFUSED_ARCHITECTURES:
                raise ValueError(
                    f"architecture {entry!r} is refused: torch.export.load unpickles archive "
                    f"entries, so a sealed program could run code inside the runtime; seal "
                    f"a state_dict with a 'module:callable' architecture instead")
            module, sep, attr = entry.partition(":")
            if not sep or not module or not attr or not all(
                    part.isidentifier() for part in (*module.split("."), *attr.split("."))):
                raise ValueError(f"architecture {entry!r} is not 'module:callable'")
        return tuple(dict.fromkeys(value))

    def canonical_bytes(self) -> bytes:
        """Sorted-key compact JSON of every field, defaults spelled out: the measured form."""
        data = self.model_dump(mode="json")
        for optional in _UNSET_NOT_MEASURED:  # unset newer fields: earlier measurements hold
            if data.get(optional) is None:
                data.pop(optional, None)
        return (json.dumps(data, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False) + "\n").encode()

    def with_overrides(self, **changes: Any) -> RuntimeConfig:
        """A copy with ``changes`` applied (``None`` values are ignored), validated."""
        data = self.model_dump()
        data.update({k: v for k, v in changes.items() if v is not None})
        return _validate(data, "overrides")

    def allows(self, architecture: str) -> bool:
        """Whether ``architecture`` may be built (never one of the refused names, even in a
        configuration made without validation)."""
        return architecture not in REFUSED_ARCHITECTURES and architecture in self.architectures


def _validate(data: Any, label: str) -> RuntimeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"runtime configuration {label}: expected a mapping")
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors())
        raise ConfigError(f"invalid runtime configuration {label}: {problems}") from None


def load_config(source: str | os.PathLike[str] | dict[str, Any] | RuntimeConfig | None = None
                ) -> RuntimeConfig:
    """The configuration from a YAML/JSON file, a dict, or the defaults (``None``)."""
    if source is None:
        return RuntimeConfig()
    if isinstance(source, RuntimeConfig):
        return source
    if isinstance(source, dict):
        return _validate(source, "(dict)")
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read runtime configuration {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"runtime configuration {path} is not YAML/JSON: {exc}") from None
    return _validate({} if data is None else data, str(path))


def runtime_measurement(config: RuntimeConfig | None = None) -> bytes:
    """The sim measurement a runtime with ``config`` reports (what policies pin)."""
    from ..attest.measure import measurement

    return measurement((config or RuntimeConfig()).canonical_bytes())
