"""The committed OpenAPI descriptions (docs/openapi.json, docs/openapi-runtime.json) are
exactly what the code serves: a wire change that forgets its documented schema fails
here, and the diff of the committed file is what reviewers check against the
compatibility rule in docs/protocol.md."""

from __future__ import annotations

import json

import openapi_docs
import pytest

FIX = "regenerate with `python tests/openapi_docs.py --write` and review the diff"


@pytest.mark.parametrize(("committed", "build"), [
    (openapi_docs.KEYSERVER_FILE, openapi_docs.keyserver_schema),
    (openapi_docs.RUNTIME_FILE, openapi_docs.runtime_schema),
], ids=["keyserver", "runtime"])
def test_the_served_schema_is_the_committed_one(committed, build):
    served = openapi_docs.render(build())
    assert committed.exists(), f"{committed} is missing: {FIX}"
    assert json.loads(committed.read_text()) == json.loads(served), \
        f"{committed.name} differs from the served schema: {FIX}"


def test_the_committed_schemas_are_canonical_text():
    for committed in (openapi_docs.KEYSERVER_FILE, openapi_docs.RUNTIME_FILE):
        text = committed.read_text()
        assert openapi_docs.render(json.loads(text)) == text, \
            f"{committed.name} is not in canonical form: {FIX}"


def test_a_changed_schema_is_detected(tmp_path, monkeypatch):
    stale = tmp_path / "openapi.json"
    stale.write_text(openapi_docs.render({"openapi": "3.1.0", "paths": {}}))
    monkeypatch.setattr(openapi_docs, "KEYSERVER_FILE", stale)
    assert openapi_docs.main([]) == 1
