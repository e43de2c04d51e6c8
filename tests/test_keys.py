"""Key files: created 0600, never overwritten, and every corruption is a KeyFileError."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sealedtorch.errors import KeyFileError
from sealedtorch.keys import ModelKey, read_key_file, write_key_file


def test_key_file_is_created_with_mode_0600(tmp_path):
    p = write_key_file(tmp_path / "k.json", ModelKey.generate("m"))
    assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_key_file_round_trips(tmp_path):
    k = ModelKey.generate("m", version=3)
    assert read_key_file(write_key_file(tmp_path / "k.json", k)) == k


def test_existing_key_file_is_never_overwritten(tmp_path):
    k1 = ModelKey.generate("m")
    p = write_key_file(tmp_path / "k.json", k1)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_key_file(p, ModelKey.generate("m"))
    assert read_key_file(p) == k1


def test_key_repr_never_shows_the_secret():
    k = ModelKey.generate("m")
    assert k.secret.hex() not in repr(k) and str(k.secret) not in repr(k)


@pytest.mark.parametrize("content, message", [
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "expected a JSON object"),
    (b'{"model_id": "m", "key_version": 1}', "missing field"),
    (b'{"model_id": "m", "key_version": 1, "key": "!!!"}', "not valid base64"),
    (b'{"model_id": "m", "key_version": 1, "key": "AAAA"}', "32 bytes"),
    (b'{"model_id": "m", "key_version": 0, "key": "' + b"A" * 43 + b'="}', "version"),
    (b'{"model_id": "", "key_version": 1, "key": "' + b"A" * 43 + b'="}', "model id"),
    (b'{"type": "something-else", "model_id": "m", "key_version": 1, "key": ""}',
     "not a sealedtorch model key"),
])
def test_corrupt_key_file_is_a_key_file_error(tmp_path, content, message):
    p = tmp_path / "k.json"
    p.write_bytes(content)
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError, match=message):
        read_key_file(p)


def test_missing_key_file_is_a_key_file_error(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        read_key_file(tmp_path / "absent.json")


def test_group_readable_key_file_is_refused(tmp_path):
    p = write_key_file(tmp_path / "k.json", ModelKey.generate("m"))
    os.chmod(p, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_key_file(p)


def test_key_file_is_json_with_model_id_version_and_key(tmp_path):
    p = write_key_file(tmp_path / "k.json", ModelKey.generate("resnet50", version=2))
    doc = json.loads(p.read_text())
    assert (doc["model_id"], doc["key_version"]) == ("resnet50", 2) and len(doc["key"]) == 44
