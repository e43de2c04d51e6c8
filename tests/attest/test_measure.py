"""The sim measurement: SHA-384 over the package's files and the runtime configuration."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

import sealedtorch
from sealedtorch.attest import measure
from sealedtorch.errors import ConfigError

PACKAGE = Path(sealedtorch.__file__).resolve().parent


@pytest.fixture
def pkg(tmp_path):
    """A private copy of the installed package (other tests must not see our edits)."""
    dest = tmp_path / "sealedtorch"
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    measure.clear_cache()
    yield dest
    measure.clear_cache()


def _fresh(pkg: Path, config: bytes = b"") -> bytes:
    measure.clear_cache()
    return measure.measurement(config, package_dir=pkg)


def test_installed_package_is_measured():
    m = measure.measurement()
    assert len(m) == 48
    assert m == measure.measurement()
    assert m == measure.measurement(b"", package_dir=PACKAGE)
    files = measure.package_files()
    assert "__init__.py" in files and "attest/measure.py" in files and "attest/sim.py" in files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def test_copy_measures_like_itself_and_is_stable(pkg):
    a = measure.measurement(package_dir=pkg)
    assert a == measure.measurement(package_dir=pkg) == _fresh(pkg)


def test_changing_one_byte_of_code_changes_it(pkg):
    before = _fresh(pkg)
    target = pkg / "attest" / "measure.py"
    original = target.read_bytes()
    target.write_bytes(original[:10] + bytes([original[10] ^ 1]) + original[11:])
    changed = _fresh(pkg)
    assert changed != before
    target.write_bytes(original)
    assert _fresh(pkg) == before


@pytest.mark.parametrize("edit", ["rename", "add", "remove", "append", "non_python"])
def test_file_set_changes_change_it(pkg, edit):
    before = _fresh(pkg)
    init = pkg / "__init__.py"
    if edit == "rename":
        init.rename(pkg / "__init__2.py")
    elif edit == "add":
        (pkg / "extra.py").write_bytes(b"")
    elif edit == "remove":
        (pkg / "py.typed").unlink()
    elif edit == "append":
        init.write_bytes(init.read_bytes() + b"\n")
    else:
        (pkg / "attest" / "data.json").write_text("{}")
    assert _fresh(pkg) != before


def test_bytecode_caches_are_ignored(pkg):
    before = _fresh(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    (pkg / "attest" / "stray.pyc").write_bytes(b"junk")
    assert _fresh(pkg) == before


def test_config_changes_it(pkg):
    base = measure.measurement(b"", package_dir=pkg)
    a = measure.measurement(b'{"model": "resnet50"}', package_dir=pkg)
    b = measure.measurement(b'{"model": "resnet51"}', package_dir=pkg)
    assert len({base, a, b, measure.measurement(b"\x00", package_dir=pkg)}) == 4
    assert a == measure.measurement(b'{"model": "resnet50"}', package_dir=pkg)


def test_encoding_is_unambiguous(tmp_path):
    """Moving bytes between a path and a content, or between two files, changes the digest."""
    trees = {
        "one": {"a": b"bc"}, "two": {"ab": b"c"},
        "three": {"x": b"12", "y": b"3"}, "four": {"x": b"1", "y": b"23"},
        "five": {"x/y": b""}, "six": {"x": b"", "y": b""},
    }
    digests = set()
    for name, files in trees.items():
        for rel, content in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_bytes(content)
        digests.add(measure.package_digest(tmp_path / name))
    assert len(digests) == len(trees)


def test_digest_matches_the_documented_formula(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_bytes(b"print(1)\n")
    (tmp_path / "a.py").write_bytes(b"x = 1\n")
    (tmp_path / "b-c.txt").write_bytes(b"")

    def entry(path: str, content: bytes) -> bytes:
        p = path.encode()
        return len(p).to_bytes(8, "big") + p + len(content).to_bytes(8, "big") + content

    # byte-wise order: "a.py" < "b-c.txt" < "b/z.py" ('-' is 0x2d, '/' is 0x2f)
    assert measure.package_files(tmp_path) == ["a.py", "b-c.txt", "b/z.py"]
    expected_pkg = hashlib.sha384(
        b"sealedtorch/sim-package/v1\x00" + entry("a.py", b"x = 1\n") + entry("b-c.txt", b"")
        + entry("b/z.py", b"print(1)\n")).digest()
    assert measure.package_digest(tmp_path) == expected_pkg
    config = b"cfg"
    expected = hashlib.sha384(b"sealedtorch/sim-measurement/v1\x00" + expected_pkg
                              + (3).to_bytes(8, "big") + config).digest()
    assert measure.measurement(config, package_dir=tmp_path) == expected


def test_hashing_is_cached_per_process(pkg):
    first = measure.measurement(package_dir=pkg)
    (pkg / "__init__.py").write_bytes(b"# changed after the first measurement\n")
    assert measure.measurement(package_dir=pkg) == first  # cached: not re-read
    t0 = time.perf_counter()
    for _ in range(1000):
        measure.measurement(b"config", package_dir=pkg)
    assert (time.perf_counter() - t0) / 1000 < 1e-3
    assert _fresh(pkg) != first


def test_missing_package_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        measure.measurement(package_dir=tmp_path / "absent")
