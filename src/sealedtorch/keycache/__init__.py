"""The keycache (dkeycache): attested keys from the keyserver, served to local runtimes.

- :class:`KeycacheClient` — what a runtime uses: ``client.get_key(model_id, version=None)``,
  or ``sealedtorch.load_state_dict(path, key=client)``.
- :class:`~.service.Keycache` — the service (refresh, staleness, local release);
  :class:`~.server.KeycacheServer` — its Unix-socket HTTP server;
  :class:`~.store.KeyStore` — the in-memory store; :class:`~.upstream.Upstream` — the
  keyserver side.

See docs/keycache.md.
"""

from __future__ import annotations

from typing import Any

from .._lazy import lazy_attribute

__all__ = [
    "KeyStore",
    "Keycache",
    "KeycacheClient",
    "KeycacheServer",
    "KeycacheUnavailable",
    "KeysStale",
    "Upstream",
    "UpstreamUnavailable",
]

_WHERE = {
    "KeycacheClient": "client", "KeycacheUnavailable": "client", "Keycache": "service",
    "KeycacheServer": "server", "KeyStore": "store", "KeysStale": "store",
    "Upstream": "upstream", "UpstreamUnavailable": "upstream",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _WHERE, name)
