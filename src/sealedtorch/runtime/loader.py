"""Loading sealed models inside the TEE: key from a key source, decrypt once, build, eval.

:func:`load_sealed` is the whole path: read the plaintext preamble (model id, key
version), get that key from the key source (the keycache; retried while the keycache is
unreachable or stale, never when it answers that it does not hold the key), decrypt the
weights straight into their tensors on the target device, build the allow-listed
architecture named in the encrypted metadata around them, ``eval()``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import crypto
from ..errors import ConfigError, KeyUnavailable, ModelMismatch
from ..keys import KeySource, ModelKey
from .architectures import Built, build, spec_from_metadata
from .config import RuntimeConfig
from .kserve import TensorSpec, check_version

__all__ = [
    "LoadedModel", "ModelSource", "PlainSource", "check_pinned", "get_key_with_retries",
    "load_plain", "load_sealed", "parse_model_arg", "resolve_device",
]

log = logging.getLogger("sealedtorch.runtime.loader")

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class ModelSource:
    """A model to serve: its name in URLs, its sealed file, an optional architecture
    override (otherwise the one in the sealed metadata)."""

    name: str
    path: Path
    arch: str | None = None

    def __post_init__(self) -> None:
        check_model_name(self.name)

    def load(self, keys: KeySource | None, config: RuntimeConfig,
             device: torch.device | None = None) -> LoadedModel:
        if keys is None:
            raise ConfigError(f"model {self.name!r} is sealed: a key source (the keycache) "
                              f"is needed to load it")
        return load_sealed(self, keys, config, device=device)


@dataclass(frozen=True)
class PlainSource:
    """A *plaintext* model file served through the same build path (benchmarks only)."""

    name: str
    path: Path
    arch: str | None = None
    metadata: dict[str, Any] | None = None

    def load(self, keys: KeySource | None, config: RuntimeConfig,
             device: torch.device | None = None) -> LoadedModel:
        del keys
        return load_plain(self.name, self.path, config, arch=self.arch,
                          metadata=self.metadata, device=device)


def check_model_name(name: str) -> str:
    if not name or len(name) > 128 or not set(name) <= _NAME_CHARS or name[0] in ".-":
        raise ConfigError(f"invalid model name {name!r}: use 1-128 characters from "
                          f"A-Z a-z 0-9 . _ -, not starting with . or -")
    return name


def parse_model_arg(value: str, arch: str | None = None) -> ModelSource:
    """``NAME=PATH`` (``--model``) as a :class:`ModelSource`."""
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise ConfigError(f"--model expects NAME=PATH.sealed, got {value!r}")
    return ModelSource(name, Path(path), arch)


@dataclass
class LoadedModel:
    """A model ready to serve."""

    name: str
    module: Callable[..., Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_id: str | None = None
    key_version: int | None = None
    arch: str | None = None
    load_seconds: float = 0.0
    batchable: bool = True
    serving_version: str | None = None
    #: Text in and out (transformers models): a
    #: :class:`~sealedtorch.runtime.text_kserve.TextTask`, used by KServe BYTES requests
    #: and, for causal LMs, the OpenAI-compatible API.
    text: Any = None
    #: SHA-256 (hex) of the sealed file the weights came from (None: not from a file).
    file_sha256: str | None = None

    @property
    def version(self) -> str:
        """The KServe model version: the sealed metadata's ``serving_version`` (default
        "1").  Not the key version: rotating a key re-seals the same model, and the public
        API (``/v2/models/{m}/versions/{v}``) must not change under clients' feet."""
        return self.serving_version or "1"

    @classmethod
    def from_module(cls, name: str, module: Callable[..., Any], *,
                    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                    device: str | torch.device = "cpu", batchable: bool | None = None,
                    arch: str | None = None) -> LoadedModel:
        """Serve an in-memory module (tests, demos; nothing sealed)."""
        check_model_name(name)
        if isinstance(module, torch.nn.Module):
            module.eval()
        inputs, outputs = tuple(inputs), tuple(outputs)
        if batchable is None:
            batchable = all(s.shape[0] == -1 for s in inputs)
        return cls(name, module, inputs, outputs, torch.device(device), arch=arch,
                   batchable=batchable)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model_id": self.model_id, "key_version": self.key_version,
                "arch": self.arch, "device": str(self.device),
                "load_seconds": round(self.load_seconds, 4), "file_sha256": self.file_sha256}

    def unload(self) -> None:
        """Zero the weights in place (shutdown): no plaintext is left for a later reader."""
        module = self.module
        if isinstance(module, torch.nn.Module):
            with torch.no_grad():
                for t in (*module.parameters(), *module.buffers()):
                    if not t.is_meta:
                        t.zero_()


def resolve_device(config: RuntimeConfig) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if config.device == "cuda":
        raise ConfigError("device 'cuda' requested but CUDA is not available here "
                          "(torch.cuda.is_available() is false)")
    return torch.device("cpu")


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the key source is unreachable or stale (HTTP 503-style), as opposed
    to an answer that it does not hold the key."""
    return isinstance(exc, KeyUnavailable) and type(exc).transient


def _same_kind(exc: KeyUnavailable, message: str) -> KeyUnavailable:
    """``exc``'s class with a message that names the model, if that class allows it."""
    try:
        return type(exc)(message)
    except TypeError:
        return KeyUnavailable(message)


def get_key_with_retries(keys: KeySource, model_id: str, version: int | None,
                         config: RuntimeConfig, *, source: str = "model",
                         sleep: Callable[[float], None] = time.sleep) -> ModelKey:
    """``keys.get_key`` with retries while the keycache is down or stale."""
    delay = config.key_retry_delay_s
    started = time.monotonic()
    for attempt in range(1, config.key_retries + 1):
        try:
            return keys.get_key(model_id, version)
        except KeyUnavailable as exc:
            if not _transient(exc):
                raise _same_kind(exc, f"{source}: no key for model {model_id!r} version "
                                      f"{version}: {exc}") from None
            if attempt == config.key_retries:
                waited = time.monotonic() - started
                raise _same_kind(exc, f"{source}: the key source did not provide the key "
                                      f"for model {model_id!r} version {version} after "
                                      f"{attempt} attempts over {waited:.1f} s; last error: "
                                      f"{exc}") from None
            log.warning("key for %s unavailable (attempt %d of %d): %s; retrying in %.1f s",
                        model_id, attempt, config.key_retries, exc, delay,
                        extra={"fields": {"model_id": model_id, "attempt": attempt}})
            sleep(delay)
            delay = min(max(delay * 2, 0.05), 5.0)
    raise AssertionError("unreachable")  # pragma: no cover


def load_sealed(source: ModelSource, keys: KeySource, config: RuntimeConfig | None = None, *,
                device: torch.device | str | None = None) -> LoadedModel:
    """Load ``source`` with a key from ``keys``: decrypt once, build, ``eval()``.

    Raises :class:`~sealedtorch.errors.IntegrityError` for a tampered file or wrong key,
    :class:`~sealedtorch.errors.KeyUnavailable` when no key can be had, and
    :class:`~sealedtorch.errors.ConfigError` for an architecture that is not allowed or
    does not fit the weights.
    """
    from ..format import SealedReader

    config = config or RuntimeConfig()
    dev = torch.device(device) if device is not None else resolve_device(config)
    label = f"model {source.name!r} ({source.path})"
    started = time.perf_counter()
    with SealedReader(source.path) as sealed:  # one open: what is pinned is what is decrypted
        preamble = sealed.preamble
        digest = sealed.sha256()
        check_pinned(source.name, preamble.model_id, preamble.key_version, digest, config,
                     label=label, path=source.path)
        key = get_key_with_retries(keys, preamble.model_id, preamble.key_version, config,
                                   source=label)
        t_key = time.perf_counter()
        state, header = sealed.read_tensors(key, device=dev)
    t_decrypt = time.perf_counter()
    built = _build(state, header.metadata, source.arch, config, dev, label)
    elapsed = time.perf_counter() - started
    log.info("loaded %s", label, extra={"fields": {
        "model": source.name, "model_id": preamble.model_id,
        "key_version": preamble.key_version, "arch": built[1], "device": str(dev),
        "key_s": round(t_key - started, 4), "decrypt_s": round(t_decrypt - t_key, 4),
        "build_s": round(time.perf_counter() - t_decrypt, 4)}})
    return LoadedModel(source.name, built[0].module, built[0].inputs, built[0].outputs, dev,
                       preamble.model_id, preamble.key_version, built[1], elapsed,
                       built[0].batchable,
                       serving_version=serving_version_of(header.metadata, label),
                       text=built[0].text, file_sha256=digest)


def serving_version_of(metadata: dict[str, Any], label: str = "model") -> str:
    """The KServe version a sealed model is served under: its metadata's
    ``serving_version`` (``seal --metadata serving_version=2``), else "1"."""
    value = metadata.get("serving_version", "1")
    return check_version(str(value) if isinstance(value, int) and not isinstance(
        value, bool) else value, f"{label}: metadata serving_version")


def check_pinned(name: str, model_id: str, key_version: int, file_sha256: str,
                 config: RuntimeConfig, *, label: str | None = None,
                 path: Path | None = None) -> None:
    """Refuse (:class:`ModelMismatch`) a file that is not what the measured configuration
    pins for ``name``: called with the file's *plaintext* preamble and digest, before any
    key is requested, so a swapped file is never decrypted.  The preamble is untrusted; it
    only decides which key to ask for, and the key opens only a file sealed under that id
    and version, so a preamble that lies cannot make another model load."""
    label = label or f"model {name!r}"
    if config.models is None:
        log.warning("%s: no `models` pin in the runtime configuration: serving whatever model "
                    "id %s version %d the file names (set models.%s in the configuration to "
                    "pin it)", label, model_id, key_version, name)
        return
    pin = config.models.get(name)
    if pin is None:
        listed = ", ".join(sorted(config.models)) or "none"
        raise ModelMismatch(f"{label}: the runtime configuration does not list the served "
                            f"name {name!r} (it lists: {listed}); nothing decrypted")
    if model_id != pin.model_id:
        raise ModelMismatch(f"{label}: the file is model {model_id!r}, but the configuration "
                            f"serves {pin.model_id!r} as {name!r}; nothing decrypted")
    if key_version < pin.min_key_version:
        raise ModelMismatch(f"{label}: the file is sealed under key version {key_version} of "
                            f"{model_id!r}, older than the configured minimum "
                            f"{pin.min_key_version}; nothing decrypted")
    if pin.sha256 is not None and not crypto.constant_time_equal(
            file_sha256.encode(), pin.sha256.encode()):
        raise ModelMismatch(f"{label}: the file's SHA-256 is {file_sha256}, the configuration "
                            f"pins {pin.sha256}; nothing decrypted")
    if pin.manifest_keys is not None:
        if path is None:
            raise ModelMismatch(f"{label}: the configuration requires an owner-signed "
                                f"manifest, and there is no file to look beside")
        from .manifest import manifest_path, read_manifest, verify_manifest

        verify_manifest(read_manifest(manifest_path(path)),
                        [bytes.fromhex(k) for k in pin.manifest_keys], model_id=model_id,
                        key_version=key_version, file_sha256=file_sha256, label=label)


def _build(state: dict[str, torch.Tensor], metadata: dict[str, Any], arch: str | None,
           config: RuntimeConfig, dev: torch.device, label: str) -> tuple[Built, str]:
    spec = spec_from_metadata(metadata, override=arch, source=label)
    if arch and metadata.get("arch") not in (None, arch):
        log.warning("%s: --arch %s overrides the sealed metadata's %s", label, arch,
                    metadata.get("arch"))
    try:
        return build(spec, state, config, device=dev, source=label), spec.name
    except BaseException:
        for t in state.values():  # never leave decrypted weights behind on failure
            if not t.is_meta:
                t.zero_()
        raise


def load_plain(name: str, path: str | os.PathLike[str], config: RuntimeConfig | None = None,
               *, arch: str | None = None, metadata: dict[str, Any] | None = None,
               device: torch.device | str | None = None) -> LoadedModel:
    """The same build path from a *plaintext* ``.safetensors``/``.pt`` file.

    For benchmarks and owners' tests only: ``sealedtorch serve`` never loads plaintext.
    """
    from ..format import load_plain as read_plain

    config = config or RuntimeConfig()
    dev = torch.device(device) if device is not None else resolve_device(config)
    started = time.perf_counter()
    state, stored = read_plain(path)
    copies: dict[int, torch.Tensor] = {}  # read every byte now (files may be mmapped), once
    state = {k: copies.setdefault(id(v), v.to(dev, copy=True)) for k, v in state.items()}
    built, arch_name = _build(state, metadata or stored, arch, config, dev,
                              f"model {name!r} ({path})")
    return LoadedModel(check_model_name(name), built.module, built.inputs, built.outputs, dev,
                       None, None, arch_name, time.perf_counter() - started, built.batchable,
                       text=built.text)
