"""Key-encryption-key (KEK) providers: what wraps model keys at rest.

The store only ever holds *wrapped* model keys.  A :class:`KekProvider` wraps and unwraps
them; the associated data binds each wrapped key to its model id and version, so a wrapped
key copied onto another record (or another version) fails to unwrap instead of releasing
the wrong key.  Every stored record names the KEK that wrapped it (``kek_id``).

Providers:

- :class:`FileKek` keeps a 256-bit KEK in a 0600 file (the default);
- :class:`~.kek_pkcs11.Pkcs11Kek` keeps it inside a PKCS#11 token (an HSM; SoftHSM2 in
  tests) that does the AES-GCM itself and never lets the key out;
- :class:`KekRing` is what the keyserver actually uses: the *active* KEK (every new wrap)
  plus read-only *fallback* KEKs, so each record is unwrapped under the KEK its ``kek_id``
  names.  That is what lets ``keyserver rewrap`` move records to a new KEK one at a time
  while servers keep releasing keys.  A ring built from a data directory follows its
  ``keyserver.json``: a record under a KEK it has not opened yet, or a changed file before
  a wrap, makes it re-read the ``kek`` section.

``keyserver.json``'s ``kek`` section is one provider spec with an optional ``fallback``
list of specs: ``{"type": "file", "path": "kek.json"}`` or ``{"type": "pkcs11", "uri":
"pkcs11:token=...;object=...?module-path=...&pin-source=file:/..."}``, each with the
``kek_id`` it had when it was configured (checked on use).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from .. import crypto, secretfile
from ..errors import (
    ConfigError,
    IntegrityError,
    KekUnavailable,
    KeyFileError,
    ServiceUnavailable,
)
from .kek_base import KekProvider, check_kek_id, key_aad
from .kek_pkcs11 import Pkcs11Kek, Pkcs11Uri

log = logging.getLogger("sealedtorch.keyserver.kek")

KEK_FILE_TYPE = "sealedtorch-keyserver-kek"
_ROW_MAC_INFO = b"sealedtorch/keyserver/row-mac/v1"


# --------------------------------------------------------------------------- file KEK

class FileKek:
    """A KEK held in a local file (JSON, mode 0600).  Suitable for one keyserver on a host
    the owner controls; use an HSM provider where the KEK must not exist in host memory."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != crypto.KEY_SIZE:
            raise ValueError("a KEK is 32 bytes")
        self._kek = kek
        # a sub-key for row MACs: never the KEK itself, never usable to unwrap
        self._mac_key = crypto.hkdf_sha256(kek, salt=b"", info=_ROW_MAC_INFO)
        self.kek_id = "file:" + crypto.sha256(b"sealedtorch/kek-id/v1\x00", kek)[:8].hex()

    def __repr__(self) -> str:
        return f"FileKek(kek_id={self.kek_id!r})"

    @classmethod
    def load(cls, path: Path | str) -> FileKek:
        p = Path(path)
        raw = secretfile.read_private(p, what="KEK file")
        try:
            data = json.loads(raw)
            if data.get("type") != KEK_FILE_TYPE:
                raise ValueError("wrong type")
            kek = base64.b64decode(data["kek"], validate=True)
            return cls(kek)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise KeyFileError(f"{p}: not a sealedtorch KEK file") from None

    @classmethod
    def create(cls, path: Path | str) -> FileKek:
        """Generate a KEK and write it to a new 0600 file (never overwrites)."""
        p = Path(path)
        kek = crypto.generate_key()
        payload = json.dumps({"type": KEK_FILE_TYPE,
                              "kek": base64.b64encode(kek).decode()}).encode() + b"\n"
        secretfile.write_new(p, payload, what="a KEK")
        return cls(kek)

    def wrap(self, key: bytes, *, model_id: str, version: int) -> bytes:
        return crypto.wrap_key(self._kek, key, key_aad(model_id, version))

    def wrap_with_id(self, key: bytes, *, model_id: str, version: int) -> tuple[bytes, str]:
        return self.wrap(key, model_id=model_id, version=version), self.kek_id

    def unwrap(self, wrapped: bytes, *, model_id: str, version: int,
               kek_id: str | None = None) -> bytes:
        check_kek_id(self, kek_id)
        return crypto.unwrap_key(self._kek, wrapped, key_aad(model_id, version))

    def mac(self, data: bytes) -> bytes:
        return crypto.hmac_sha256(self._mac_key, data)

    def verify_mac(self, data: bytes, tag: bytes) -> bool:
        return crypto.constant_time_equal(crypto.hmac_sha256(self._mac_key, data), tag)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- specs

def _spec_type(spec: dict[str, Any]) -> str:
    kind = spec.get("type")
    if kind not in ("file", "pkcs11"):
        raise ConfigError(f"unknown KEK provider {kind!r} (this version supports: file, "
                          f"pkcs11)")
    return str(kind)


def spec_key(spec: dict[str, Any], base_dir: Path) -> str:
    """What identifies a spec's provider (to reuse an open one): type and location."""
    kind = _spec_type(spec)
    try:
        if kind == "file":
            return "file:" + str((base_dir / str(spec["path"])).resolve())
        return Pkcs11Uri.parse(str(spec["uri"])).text()
    except KeyError as exc:
        raise ConfigError(f"KEK {kind} spec misses {exc}") from None


def describe_spec(spec: dict[str, Any]) -> str:
    """A spec for people and logs (no secrets: a PKCS#11 URI never holds the PIN)."""
    if spec.get("type") == "file":
        return f"file:{spec.get('path')}"
    return str(spec.get("uri"))


def open_provider(spec: dict[str, Any], *, base_dir: Path) -> KekProvider:
    """Open the provider a spec names; if the spec records a ``kek_id``, check it."""
    kind = _spec_type(spec)
    provider: KekProvider
    try:
        if kind == "file":
            provider = FileKek.load(base_dir / str(spec["path"]))
        else:
            provider = Pkcs11Kek(str(spec["uri"]))
    except KeyError as exc:
        raise ConfigError(f"KEK {kind} spec misses {exc}") from None
    expected = spec.get("kek_id")
    if expected is not None and expected != provider.kek_id:
        provider.close()
        raise KekUnavailable(f"the KEK at {describe_spec(spec)} is {provider.kek_id}, but the "
                             f"configuration says it should be {expected}: it was replaced "
                             f"or points at another key")
    return provider


def parse_target(text: str, *, data_dir: Path) -> dict[str, Any]:
    """``file:PATH`` or ``pkcs11:...`` (command line) → a spec.  A file path is taken from
    the working directory and stored relative to the data directory when inside it."""
    if text.startswith("pkcs11:"):
        return {"type": "pkcs11", "uri": Pkcs11Uri.parse(text).text()}
    if text.startswith("file:") and len(text) > 5:
        path = Path(text[5:]).expanduser().resolve()
        try:
            stored = str(path.relative_to(Path(data_dir).resolve()))
        except ValueError:
            stored = str(path)
        return {"type": "file", "path": stored}
    raise ConfigError(f"KEK target must be file:PATH or a pkcs11: URI, got {text[:40]!r}")


# --------------------------------------------------------------------------- ring

class KekRing:
    """The configured KEKs: ``active`` wraps, ``fallback`` ones only unwrap.

    Fallback providers open on first use (by the ``kek_id`` recorded in their spec), so a
    fallback HSM that is down only matters to records still wrapped under it.  With a
    ``config_file``, the ring re-reads the ``kek`` section when a record names a KEK it
    does not know, and before each wrap if the file changed: a running server picks up a
    rewrap's target and its final switch without a restart.  Thread-safe.
    """

    def __init__(self, section: dict[str, Any], *, base_dir: Path | str,
                 config_file: Path | str | None = None) -> None:
        self._base = Path(base_dir)
        self._config_file = Path(config_file) if config_file is not None else None
        self._lock = threading.RLock()
        self._open: dict[str, KekProvider] = {}      # spec key -> provider
        self._stamp = self._file_stamp()
        self._install(section)

    def __repr__(self) -> str:
        return f"KekRing(active={self.kek_id!r}, fallback={sorted(self._fallback)!r})"

    # --- configuration -----------------------------------------------------------------
    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self._config_file is None:
            return None
        try:
            st = self._config_file.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _provider(self, spec: dict[str, Any]) -> KekProvider:
        key = spec_key(spec, self._base)
        provider = self._open.get(key)
        if provider is None:
            provider = open_provider(spec, base_dir=self._base)
            self._open[key] = provider
        elif spec.get("kek_id") not in (None, provider.kek_id):
            raise KekUnavailable(f"the KEK at {describe_spec(spec)} is {provider.kek_id}, "
                                 f"but the configuration says {spec['kek_id']}")
        return provider

    def _install(self, section: dict[str, Any]) -> None:
        if not isinstance(section, dict):
            raise ConfigError("the kek setting must be an object")
        active_spec = {k: v for k, v in section.items() if k != "fallback"}
        fallbacks = section.get("fallback") or []
        if not isinstance(fallbacks, list) or not all(isinstance(f, dict) for f in fallbacks):
            raise ConfigError("kek.fallback must be a list of KEK specs")
        active = self._provider(active_spec)
        by_id: dict[str, dict[str, Any]] = {}
        for spec in fallbacks:
            _spec_type(spec)
            kek_id = spec.get("kek_id")
            if kek_id is None:  # hand-written: open it now to learn its id
                kek_id = self._provider(spec).kek_id
            if kek_id != active.kek_id:
                by_id[str(kek_id)] = spec
        with self._lock:
            self._section = section
            self._active = active
            self._active_spec = active_spec
            self._fallback = by_id

    def reload(self) -> bool:
        """Re-read the ``kek`` section of the configuration file; True if it was re-read.
        A file that cannot be used leaves the ring as it was (logged)."""
        if self._config_file is None:
            return False
        with self._lock:
            stamp = self._file_stamp()
            try:
                raw = json.loads(self._config_file.read_text(encoding="utf-8"))
                section = raw["kek"]
                if section != self._section:
                    self._install(dict(section))
                    log.info("KEK configuration reloaded", extra={"fields": {
                        "kek": self._active.kek_id, "fallback": sorted(self._fallback)}})
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("cannot reload the KEK configuration from %s: %s",
                          self._config_file, exc)
                return False
            except ServiceUnavailable as exc:
                log.error("cannot reload the KEK configuration: %s", exc)
                return False
            self._stamp = stamp
            return True

    def _reload_if_changed(self) -> None:
        if self._config_file is not None and self._file_stamp() != self._stamp:
            self.reload()

    # --- KekProvider -------------------------------------------------------------------
    @property
    def kek_id(self) -> str:
        """The active KEK's id."""
        return self._active.kek_id

    @property
    def fallback_ids(self) -> list[str]:
        return sorted(self._fallback)

    def wrap(self, key: bytes, *, model_id: str, version: int) -> bytes:
        return self.wrap_with_id(key, model_id=model_id, version=version)[0]

    def wrap_with_id(self, key: bytes, *, model_id: str, version: int) -> tuple[bytes, str]:
        self._reload_if_changed()
        provider = self._active
        return provider.wrap(key, model_id=model_id, version=version), provider.kek_id

    def provider_for(self, kek_id: str) -> KekProvider:
        """The provider of ``kek_id`` (re-reading the configuration once if unknown)."""
        found = self._lookup(kek_id)
        if found is None and self.reload():
            found = self._lookup(kek_id)
        if found is None:
            raise KekUnavailable(
                f"record was wrapped under KEK {kek_id}, which is not configured (active "
                f"{self.kek_id}; fallback: {', '.join(self.fallback_ids) or 'none'})")
        return found

    def _lookup(self, kek_id: str) -> KekProvider | None:
        with self._lock:
            if self._active.kek_id == kek_id:
                return self._active
            spec = self._fallback.get(kek_id)
            return self._provider(spec) if spec is not None else None

    def unwrap(self, wrapped: bytes, *, model_id: str, version: int,
               kek_id: str | None = None) -> bytes:
        if kek_id is not None:
            return self.provider_for(kek_id).unwrap(wrapped, model_id=model_id,
                                                    version=version, kek_id=kek_id)
        # a record with no KEK named: try each configured KEK (AES-GCM tells them apart)
        for candidate in [self.kek_id, *self.fallback_ids]:
            with contextlib.suppress(IntegrityError):
                return self.provider_for(candidate).unwrap(wrapped, model_id=model_id,
                                                           version=version)
        raise IntegrityError("wrapped key fails to unwrap under every configured KEK "
                             "(wrong KEK or tampered record)")

    def mac(self, data: bytes) -> bytes:
        return self.mac_with_id(data)[0]

    def mac_with_id(self, data: bytes) -> tuple[bytes, str]:
        """A row MAC under the active KEK, and that KEK's id (stored beside the tag)."""
        self._reload_if_changed()
        provider = self._active
        return provider.mac(data), provider.kek_id

    def verify_mac(self, data: bytes, tag: bytes, kek_id: str | None = None) -> bool:
        """Check a row MAC under the KEK that made it (``kek_id``; None: the active one)."""
        provider = self._active if kek_id is None else self.provider_for(kek_id)
        return provider.verify_mac(data, tag)

    def close(self) -> None:
        with self._lock:
            opened, self._open = list(self._open.values()), {}
        for provider in opened:
            try:
                provider.close()
            except Exception:  # closing must not mask the caller's own outcome
                log.exception("closing a KEK provider failed")


def open_ring(section: dict[str, Any], *, data_dir: Path | str,
              config_file: Path | str | None) -> KekRing:
    """The ring a keyserver uses (``config.open_kek``)."""
    return KekRing(section, base_dir=data_dir, config_file=config_file)
