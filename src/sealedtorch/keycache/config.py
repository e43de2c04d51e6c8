"""The keycache's own measured configuration: which models it may hold.

``sealedtorch keycache run --config FILE`` reads a YAML/JSON document::

    models: [resnet50, owner-a/bert]     # the only model ids this keycache holds

The file's bytes are the configuration input of the keycache's measurement (the same value
``sealedtorch attest measure --config FILE`` prints), so a model policy's ``holders`` rule
that pins this measurement pins this list too.  Keys the keyserver releases for any other
model are dropped on arrival (:class:`ListedModels`) and never served: an owner who names the
public runtime and keycache measurements in its policy cannot make its key flow into a
keycache, and so into a runtime, that another owner deployed for its own models.

``models`` unset (or no ``--config``): every released key is held (one-owner setups; logged).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..errors import ConfigError

__all__ = ["KeycacheConfig", "ListedModels", "load_keycache_config"]

log = logging.getLogger("sealedtorch.keycache")


class KeycacheConfig(BaseModel):
    """``models``: the model ids this keycache may hold (``None``: all it is released)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] | None = None

    @field_validator("models")
    @classmethod
    def _check(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        from ..keys import validate_model_id

        for model_id in value:
            validate_model_id(model_id)
        return tuple(dict.fromkeys(value))

    def holds(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


def load_keycache_config(source: str | os.PathLike[str] | bytes | dict[str, Any]
                         ) -> KeycacheConfig:
    """Parse a keycache configuration (file path, raw bytes or dict); :class:`ConfigError`
    naming the problem otherwise."""
    label = "(dict)"
    data: Any = source
    if isinstance(source, bytes):
        label = "(bytes)"
        data = _parse(source, label)
    elif not isinstance(source, dict):
        label = str(source)
        try:
            data = _parse(Path(source).read_bytes(), label)
        except OSError as exc:
            raise ConfigError(f"cannot read keycache configuration {label}: "
                              f"{exc.strerror}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"keycache configuration {label}: expected a mapping")
    try:
        return KeycacheConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"invalid keycache configuration {label}: {problems}") from None


def _parse(raw: bytes, label: str) -> Any:
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"keycache configuration {label} is not YAML/JSON: {exc}") from None


def _model_id(item: Any) -> str:
    key = getattr(item, "key", None)
    if key is None:
        key = item[0]
    return str(key.model_id)


class ListedModels:
    """An upstream that passes on only the keys of models ``config`` lists.

    Wraps the real upstream (:class:`~sealedtorch.keycache.upstream.KeyserverUpstream`);
    every other attribute (token hints, ``url``, ``close``) is the wrapped upstream's.
    """

    def __init__(self, upstream: Any, config: KeycacheConfig) -> None:
        self.upstream = upstream
        self.config = config
        self._warned: set[str] = set()

    def fetch_all(self) -> list[Any]:
        released = self.upstream.fetch_all()
        kept = []
        for item in released:
            model_id = _model_id(item)
            if self.config.holds(model_id):
                kept.append(item)
            elif model_id not in self._warned:
                self._warned.add(model_id)
                log.warning("keycache: the keyserver released a key for %s, which this "
                            "keycache's configuration does not list: dropped, never served",
                            model_id)
        return kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self.upstream, name)
