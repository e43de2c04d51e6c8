"""The sim measurement: SHA-384 over the package's files and the runtime configuration."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sealedtorch
from sealedtorch.attest import measure
from sealedtorch.errors import ConfigError, MeasurementError

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
    """Caches without a source are never loaded by Python, so they do not count.  (A
    sourceless ``.pyc`` beside the sources is refused since issue 10 §5: see below.)"""
    before = _fresh(pkg)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
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


# --- what runs is what is measured (issue 10 §5) ------------------------------------------

def _pyc(source: Path, code_text: str, *, mtime: int | None = None) -> bytes:
    """A timestamp-based cache for ``source`` holding ``code_text`` compiled: Python loads
    it instead of the source while mtime and size match."""
    st = source.stat()
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + \
        ((int(st.st_mtime) if mtime is None else mtime) & 0xFFFFFFFF).to_bytes(4, "little") + \
        (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    return header + marshal.dumps(compile(code_text, str(source), "exec", dont_inherit=True))


def _plant(pkg: Path, module: str, code_text: str, **kw: int) -> Path:
    source = pkg / f"{module}.py"
    cache = Path(importlib.util.cache_from_source(str(source)))
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(_pyc(source, code_text, **kw))
    return cache


def test_a_planted_pyc_runs_in_python_and_is_refused_by_the_measurement(pkg, tmp_path):
    sentinel = tmp_path / "backdoor-ran"
    source = (pkg / "progress.py").read_text()
    backdoor = source + f"\nimport pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
    cache = _plant(pkg, "progress", backdoor)
    # the attack is live: Python runs the cache, not the measured source
    subprocess.run([sys.executable, "-c", "import sealedtorch.progress"], check=True,
                   env={**os.environ, "PYTHONPATH": str(pkg.parent)}, timeout=120)
    assert sentinel.read_text() == "ran"
    with pytest.raises(MeasurementError, match="does not match its source") as info:
        _fresh(pkg)
    assert str(cache) in str(info.value)


def test_a_cache_that_is_its_source_compiled_is_accepted(pkg):
    before = _fresh(pkg)
    _plant(pkg, "progress", (pkg / "progress.py").read_text())
    assert _fresh(pkg) == before


def test_a_stale_cache_is_ignored_because_python_ignores_it(pkg):
    before = _fresh(pkg)
    _plant(pkg, "progress", "raise SystemExit('backdoor')\n", mtime=12345)
    assert _fresh(pkg) == before


def test_a_sourceless_pyc_module_is_refused(pkg):
    (pkg / "attest" / "stray.pyc").write_bytes(b"junk")
    with pytest.raises(MeasurementError, match="sourceless bytecode module"):
        _fresh(pkg)


def _config(*arches: str) -> bytes:
    return json.dumps({"architectures": list(arches)}).encode()


def test_an_allowed_architecture_module_is_measured_without_importing_it(tmp_path,
                                                                          monkeypatch):
    mod = tmp_path / "custom_arch_mod.py"
    mod.write_text("import pathlib\npathlib.Path('imported').write_text('x')\n"
                   "def net():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = _config("custom_arch_mod:net")
    measure.clear_cache()
    before = measure.measurement(config)
    assert before != measure.measurement(_config())
    assert "custom_arch_mod" not in sys.modules and not (tmp_path / "imported").exists()
    mod.write_text(mod.read_text() + "# edited\n")
    measure.clear_cache()
    assert measure.measurement(config) != before


def test_an_architecture_package_is_measured_as_a_whole(tmp_path, monkeypatch):
    pkg_dir = tmp_path / "custom_arch_pkg"
    (pkg_dir / "nets").mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("")
    (pkg_dir / "nets" / "__init__.py").write_text("from .impl import net\n")
    (pkg_dir / "nets" / "impl.py").write_text("def net():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config("custom_arch_pkg.nets:net")
    assert measure.architecture_roots(config) == ["custom_arch_pkg"]
    measure.clear_cache()
    before = measure.measurement(config)
    (pkg_dir / "nets" / "impl.py").write_text("def net():\n    return 1\n")
    measure.clear_cache()
    assert measure.measurement(config) != before


def test_the_default_runtime_configuration_covers_its_libraries():
    from sealedtorch.runtime.config import RuntimeConfig

    assert measure.architecture_roots(RuntimeConfig().canonical_bytes()) == [
        "torchvision", "transformers"]
    assert measure.architecture_roots(b"not json") == []


def _cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "sealedtorch.cli", *args], check=True,
                          capture_output=True, text=True, timeout=300).stdout.strip()


@pytest.mark.slow
def test_attest_measure_and_serve_print_measurement_agree_on_a_non_canonical_yaml(tmp_path):
    config = tmp_path / "runtime.yaml"
    config.write_text("# comments, block style, unsorted keys, some defaults spelled out\n"
                      "max_batch_size: 8\n"
                      "architectures:\n"
                      "  - sealedtorch.runtime.architectures:mlp\n"
                      "  - torchvision.models:resnet18\n"
                      "device: cpu\n")
    served = _cli("serve", "--config", str(config), "--print-measurement")
    measured = _cli("attest", "measure", "--config", str(config))
    assert len(served) == 96 and served == measured
    raw = _cli("attest", "measure", "--raw-config", str(config))
    assert raw != served  # the raw bytes are the keycache's kind of measurement


def test_the_documented_sim_policy_admits_the_runtime_and_the_keycache(tmp_path, capsys):
    """docs/policy.md "sim: development only": `allow` from `serve --config F
    --print-measurement`, `holders` from `attest measure`; the reverse is denied."""
    from sealedtorch.attest import VerifierConfig, verify
    from sealedtorch.attest.attesters import get_attester
    from sealedtorch.attest.policy import load_policy
    from sealedtorch.attest.sim import init_platform, load_platform_keys
    from sealedtorch.cli import main
    from sealedtorch.runtime.config import load_config

    sim = tmp_path / "sim"
    init_platform(sim)
    config = tmp_path / "runtime.yaml"
    config.write_text("max_batch_size: 16\n")
    assert main(["serve", "--config", str(config), "--print-measurement"]) == 0
    runtime_value = capsys.readouterr().out.strip()
    assert main(["attest", "measure"]) == 0
    holder_value = capsys.readouterr().out.strip()
    policy = load_policy({"allow": [{"tee": "sim", "measurement": runtime_value}],
                          "holders": [{"tee": "sim", "measurement": holder_value}]})
    verifier = VerifierConfig(sim_platform_keys=load_platform_keys([sim / "platform.pub"]))

    def claims(runtime_config: bytes):
        attester = get_attester("sim", sim_platform=sim, runtime_config=runtime_config)
        return verify(attester.evidence(bytes(64)), config=verifier)

    runtime_claims = claims(load_config(config).canonical_bytes())  # what serve reports
    keycache_claims = claims(b"")                                    # keycache, no config
    assert policy.decide_use(runtime_claims).allowed
    assert policy.decide_hold(keycache_claims).allowed
    swapped = load_policy({"allow": [{"tee": "sim", "measurement": holder_value}]})
    assert not swapped.decide_use(runtime_claims).allowed
