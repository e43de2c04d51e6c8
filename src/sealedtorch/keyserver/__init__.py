"""The keyserver (dkeyserver): attested key release, model-key registration, revocation,
and a hash-chained audit log.  The model owner runs it; it is the only place model keys
live at rest (wrapped by a KEK).

Modules:

- :mod:`.protocol` — wire format shared by server and clients (bodies, HPKE info, base64)
- :mod:`.service`  — :class:`~.service.Keyserver`, the front over the services below,
  independent of HTTP: :mod:`.attestation_service`, :mod:`.release_service`,
  :mod:`.admin_service`, sharing one :mod:`.audit_recorder`
- :mod:`.app`      — FastAPI application (RFC 7807 problems, body limits, OpenAPI)
- :mod:`.routes`   — the HTTP routes (module-level routers, the ``admin(action)`` dependency)
- :mod:`.server`   — uvicorn/TLS runner, JSON logs, :class:`~.server.BackgroundServer`
- :mod:`.client`   — :class:`~.client.AttestedKeyClient`, :class:`~.client.AdminClient`
- :mod:`.store`    — :class:`~.store.Store` protocol and :class:`~.store.SqliteStore`
- :mod:`.kek_base` — :class:`~.kek_base.KekProvider` protocol (below both providers)
- :mod:`.kek`      — :class:`~.kek.FileKek`, :class:`~.kek.KekRing`, provider specs
- :mod:`.audit`    — hash-chained records and chain verification
- :mod:`.tokens`   — attestation-result JWTs (EdDSA) and admin tokens
- :mod:`.problems` — errors ↔ problem+json
- :mod:`.config`, :mod:`.tls` — the data directory and its TLS material

See ``docs/protocol.md`` and ``docs/keyserver.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AdminClient, AttestationResult, AttestedKeyClient, ReleasedKey, register_key

__all__ = ["AdminClient", "AttestationResult", "AttestedKeyClient", "ReleasedKey",
           "register_key"]


def __getattr__(name: str) -> Any:
    # The client is what other components import; load it (and httpx) only on use.
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
