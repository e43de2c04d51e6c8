"""The inference server: Open Inference Protocol (KServe v2) REST over TLS, attestation,
metrics, structured logs, graceful shutdown.  This module gathers its public names; each
lives in the module that owns it:

- :mod:`.state` — :class:`Runtime` (models, workers, TLS identity, attester) and its slots;
- :mod:`.app` — :func:`create_app`, with the routers :mod:`.routes_kserve`,
  :mod:`.routes_infer`, :mod:`.routes_attestation`, :mod:`.routes_metrics` (and
  :mod:`.openai_api`), their shared :mod:`.dependencies`, :mod:`.request_body` and
  :mod:`.responses`;
- :mod:`.serving` — :func:`build_runtime`, :func:`serve` (the ``sealedtorch serve``
  command: blocks until SIGTERM/SIGINT), :func:`write_certificate`;
- :mod:`.background` — :class:`RuntimeServer`: in-process, uvicorn in a background thread
  (tests, demos)::

      with RuntimeServer.start([ModelSource("resnet50", path)], keys=keycache_client,
                               sim_platform=platform_dir) as srv:
          srv.wait_ready()
          srv.url, srv.spki          # https://127.0.0.1:PORT, the attested TLS key

- :mod:`.subprocess_server` — :class:`SubprocessServer`: ``sealedtorch serve`` in a child
  process, with its bound URL read back from an announce file.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{m}``,
``/v2/models/{m}/ready``, ``POST /v2/models/{m}/infer`` (each also under
``/v2/models/{m}/versions/{v}``), ``GET /v1/attestation?nonce=``, ``GET /metrics``.
The server listens (live) at once and loads models in the background; it is ready when every
model has loaded.  A model that fails to load leaves the server unready, and says why in
``/v2/health/ready``, the model's ready endpoint and the log.
"""

from __future__ import annotations

from ..listen import parse_listen
from ..logs import configure_logging
from .app import create_app
from .background import RuntimeServer
from .serving import build_runtime, serve, write_certificate
from .state import ModelSlot, Runtime, Source
from .subprocess_server import SubprocessServer

__all__ = ["ModelSlot", "Runtime", "RuntimeServer", "Source", "SubprocessServer",
           "build_runtime", "configure_logging", "create_app", "parse_listen", "serve",
           "write_certificate"]
