"""The keyserver's and the runtime's OpenAPI descriptions as committed under docs/.

``docs/openapi.json`` is what the keyserver serves at ``/v1/openapi.json``;
``docs/openapi-runtime.json`` describes the runtime's HTTP API (the runtime does not serve
it: it is for client authors).  tests/test_openapi.py fails when a served schema changes
without its committed copy, so every wire change is reviewed as a diff of these files
(docs/protocol.md, "Compatibility", says which changes are allowed within v1).

Regenerate after an intended change:  python tests/openapi_docs.py --write
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"
KEYSERVER_FILE = DOCS / "openapi.json"
RUNTIME_FILE = DOCS / "openapi-runtime.json"


def keyserver_schema() -> dict[str, Any]:
    """The OpenAPI document a freshly initialised keyserver serves at /v1/openapi.json."""
    from fastapi.testclient import TestClient

    from sealedtorch.keyserver import app, config, server

    with tempfile.TemporaryDirectory() as tmp:
        init = config.init_data_dir(Path(tmp) / "data", now=time.time())
        service = server.build_keyserver(init.config)
        try:
            with TestClient(app.create_app(service)) as http:
                served = http.get("/v1/openapi.json")
            served.raise_for_status()
            return dict(served.json())
        finally:
            service.store.close()


def runtime_schema() -> dict[str, Any]:
    """The OpenAPI document of the runtime's HTTP app (default configuration)."""
    from sealedtorch.runtime.config import RuntimeConfig
    from sealedtorch.runtime.server import Runtime, create_app
    from sealedtorch.runtime.tls import ServerTls

    runtime = Runtime(config=RuntimeConfig(), tls=ServerTls.generate())
    return create_app(runtime).openapi()


def render(schema: dict[str, Any]) -> str:
    """Canonical text: sorted keys, two-space indent, trailing newline (stable diffs)."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the committed files")
    args = parser.parse_args(argv)
    stale = 0
    for path, build in ((KEYSERVER_FILE, keyserver_schema), (RUNTIME_FILE, runtime_schema)):
        text = render(build())
        if args.write:
            path.write_text(text)
            print(f"wrote {path}")
        elif not path.exists() or path.read_text() != text:
            print(f"{path} is out of date", file=sys.stderr)
            stale += 1
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
