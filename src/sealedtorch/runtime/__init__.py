"""The runtime: sealed models loaded inside the TEE and served over KServe v2 REST.

- :mod:`.config` — :class:`RuntimeConfig` (allow-list, limits, device), part of the
  measurement; :func:`runtime_measurement`.
- :mod:`.architectures` — allow-listed builders; owner helpers
  (:func:`~.architectures.sentence_bert_from_directory`,
  :func:`~.architectures.exported_program_state`).
- :mod:`.loader` — :func:`load_sealed`: key from the keycache, decrypt once, build, eval.
- :mod:`.server` — the server's public names, from :mod:`.state` (:class:`Runtime`),
  :mod:`.app` (the FastAPI app and its ``routes_*`` routers), :mod:`.serving`
  (:func:`serve`, the CLI), :mod:`.background` (:class:`RuntimeServer`, in-process) and
  :mod:`.subprocess_server` (:class:`SubprocessServer`).
- :mod:`.watch` — the key watcher: unload on revocation, swap in a newer key version.
- :mod:`.kserve`, :mod:`.batching`, :mod:`.metrics`, :mod:`.tls`, :mod:`.attestation`.
- :mod:`.client` — :class:`AttestedClient`: attest, pin the TLS key, then infer.

See docs/runtime.md.
"""

from __future__ import annotations

from typing import Any

from .._lazy import lazy_attribute

__all__ = [
    "AttestedClient", "LoadedModel", "ModelSource", "PlainSource", "RuntimeConfig",
    "RuntimeServer", "SubprocessServer", "load_config", "load_sealed", "runtime_measurement",
    "serve",
]

_WHERE = {
    "AttestedClient": "client", "LoadedModel": "loader", "ModelSource": "loader",
    "PlainSource": "loader", "load_sealed": "loader", "RuntimeConfig": "config",
    "load_config": "config", "runtime_measurement": "config", "RuntimeServer": "background",
    "SubprocessServer": "subprocess_server", "serve": "serving",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _WHERE, name)
