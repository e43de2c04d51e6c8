"""A model file never runs code: the torch.export pickle attack against a real runtime and a
real keycache, configurations that try to re-open it, and a scan of src/ for the calls that
would let sealed content reach an unpickler, ``eval``/``exec`` or an importer."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from sealedtorch.attest.policy import load_policy
from sealedtorch.errors import ConfigError, UnsafeModelError
from sealedtorch.format import seal
from sealedtorch.keycache import KeycacheClient
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.architectures import EXPORT
from sealedtorch.runtime.config import RuntimeConfig, load_config, runtime_measurement
from sealedtorch.runtime.loader import ModelSource, load_sealed
from sealedtorch.runtime.server import SubprocessServer

from .conftest import trusting_keycache_socket

SRC = Path(__file__).resolve().parents[2] / "src" / "sealedtorch"


class _Payload:
    """Unpickling this runs ``code`` (what an attacker's pickled 'weight' does)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def _attack_code(sentinel: Path, victim: str) -> str:
    """Create the sentinel, then use the runtime's own keycache client to fetch another
    owner's key and write it to disk (the attack of issue 10 §1)."""
    return textwrap.dedent(f"""
        import gc, pathlib
        out = pathlib.Path({str(sentinel)!r})
        out.write_text("payload ran")
        try:
            from sealedtorch.keycache.client import KeycacheClient
            for obj in gc.get_objects():
                if isinstance(obj, KeycacheClient):
                    out.write_text(obj.get_key({victim!r}).secret.hex())
        except Exception as exc:
            out.write_text("payload ran: " + repr(exc))
    """)


def malicious_program(sentinel: Path, victim: str = "victim-model") -> bytes:
    """A ``torch.export.save`` archive whose first weight is switched to a pickle payload."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    program = torch.export.export(Net().eval(), (torch.randn(2, 4),))
    clean = io.BytesIO()
    torch.export.save(program, clean)
    payload = io.BytesIO()
    torch.save(_Payload(_attack_code(sentinel, victim)), payload)
    evil = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(clean.getvalue())) as src, \
            zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        config_name = next(n for n in src.namelist()
                           if n.endswith("weights/model_weights_config.json"))
        config = json.loads(src.read(config_name))
        config["config"]["lin.weight"]["use_pickle"] = True
        weight = config_name.rsplit("/", 1)[0] + "/" + config["config"]["lin.weight"]["path_name"]
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == config_name:
                data = json.dumps(config).encode()
            elif info.filename == weight:
                data = payload.getvalue()
            dst.writestr(info, data)
    return evil.getvalue()


def seal_program(archive: bytes, path: Path, key: ModelKey) -> None:
    """Seal an exported-program archive the way ``exported_program_state`` does."""
    state = {"program": torch.frombuffer(bytearray(archive), dtype=torch.uint8)}
    seal(state, path, key=key, metadata={
        "arch": EXPORT, "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]})


def _allow(config: RuntimeConfig) -> Any:
    return load_policy({"allow": [{"tee": "sim",
                                   "measurement": runtime_measurement(config).hex()}]})


def test_the_attack_payload_is_live_when_torch_export_loads_it(tmp_path):
    """The archive the next tests use really runs code in torch's own loader."""
    sentinel = tmp_path / "sentinel"
    archive = tmp_path / "evil.pt2"
    archive.write_bytes(malicious_program(sentinel))
    subprocess.run([sys.executable, "-c",
                    "import sys, torch; torch.export.load(sys.argv[1])", str(archive)],
                   check=False, capture_output=True, timeout=300)
    assert sentinel.read_text().startswith("payload ran")


def test_a_sealed_export_program_with_a_pickled_weight_is_refused_and_runs_nothing(
        keycache_socket, sim_dir, start_server, tmp_path):
    sentinel = tmp_path / "sentinel"
    attacker = ModelKey.generate("attacker-model")
    victim = ModelKey.generate("victim-model")
    path = tmp_path / "evil.sealed"
    seal_program(malicious_program(sentinel, victim.model_id), path, attacker)
    config = trusting_keycache_socket(sim_dir)
    sock = keycache_socket([(attacker, _allow(config)), (victim, _allow(config))])
    with KeycacheClient(sock, tee="sim", sim_platform=sim_dir,
                        runtime_config=config.canonical_bytes(),
                        keycache_rules=config.keycache) as keys:
        srv = start_server([ModelSource("evil", path)], keys=keys, config=config)
        with pytest.raises(UnsafeModelError, match=r"torch\.export program"):
            srv.wait_ready(60)
        with httpx.Client(base_url=srv.url, verify=False, timeout=30) as http:
            r = http.get("/v2/health/ready")
        assert r.status_code == 503
        assert "UnsafeModelError" in r.json()["models"][0]["error"]
    assert not sentinel.exists()


def test_a_configuration_naming_torch_export_is_invalid():
    with pytest.raises(ConfigError, match=r"'torch\.export' is refused"):
        load_config({"architectures": ["torch.export"]})
    assert "torch.export" not in RuntimeConfig().architectures


def test_an_unvalidated_configuration_naming_torch_export_still_refuses_it(tmp_path):
    """Even a configuration built without validation cannot re-open the hole."""
    sentinel = tmp_path / "sentinel"
    key = ModelKey.generate("attacker-model")
    path = tmp_path / "evil.sealed"
    seal_program(malicious_program(sentinel), path, key)
    config = RuntimeConfig.model_construct(architectures=("torch.export",))
    with pytest.raises(UnsafeModelError, match=r"refuses every torch\.export program"):
        load_sealed(ModelSource("evil", path), StaticKeys(key), config)
    assert not sentinel.exists()


@pytest.mark.slow
def test_serve_with_a_configuration_naming_torch_export_exits_with_a_config_error(
        tmp_path, sim_dir):
    cfg = tmp_path / "runtime.yaml"
    cfg.write_text("architectures:\n  - torch.export\n")
    with pytest.raises(ConfigError, match="status 2") as info:
        SubprocessServer.start(["--model", f"m={tmp_path / 'absent.sealed'}",
                                "--keycache", str(tmp_path / "kc.sock"),
                                "--listen", "127.0.0.1:0", "--tee", "sim",
                                "--sim-platform", str(sim_dir), "--config", str(cfg)])
    assert "'torch.export' is refused" in str(info.value)


def test_an_architecture_off_the_allow_list_is_refused_before_any_import(tmp_path,
                                                                         monkeypatch):
    sentinel = tmp_path / "imported"
    (tmp_path / "planted_arch.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('imported')\n"
        f"def factory():\n    raise AssertionError('built')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    key = ModelKey.generate("planted")
    path = tmp_path / "planted.sealed"
    seal({"w": torch.zeros(2)}, path, key=key, metadata={"arch": "planted_arch:factory"})
    with pytest.raises(ConfigError, match="not on this runtime's allow-list"):
        load_sealed(ModelSource("planted", path), StaticKeys(key), RuntimeConfig())
    assert not sentinel.exists()
    assert "planted_arch" not in sys.modules


# --- no path from sealed content to code ------------------------------------------------

def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


_LOADERS = {"pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "_pickle.load",
            "_pickle.loads", "dill.load", "dill.loads", "marshal.load", "marshal.loads",
            "torch.export.load", "torch.jit.load", "torch._C._pickle_load_obj"}


def forbidden_calls(text: str) -> list[str]:
    """Every call in ``text`` (Python source) that could turn data into code: unpicklers,
    ``torch.load`` without ``weights_only=True``, any ``weights_only=False``, ``eval``,
    ``exec``, ``compile``, and ``__import__`` of a computed name.  Strings, comments and
    docstrings are not code and are not reported."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        only = {k.arg: k.value for k in node.keywords}.get("weights_only")
        if isinstance(only, ast.Constant) and only.value is False:
            found.append(f"{node.lineno}: {name}(weights_only=False)")
        elif name in _LOADERS or name.endswith("Unpickler"):
            found.append(f"{node.lineno}: {name}")
        elif name == "torch.load" and not (isinstance(only, ast.Constant) and only.value is True):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec"):
            found.append(f"{node.lineno}: {name}")
        elif name == "__import__" and not (node.args and isinstance(node.args[0], ast.Constant)):
            found.append(f"{node.lineno}: __import__ of a computed name")
    return found


#: The one reviewed exception: the sim measurement unmarshals the package's own bytecode
#: caches and compiles their sources to compare the two (never executing either), so that
#: a planted .pyc cannot run under the measurement (issue 10 §5).
_REVIEWED = {("attest/measure.py", "marshal.loads"), ("attest/measure.py", "compile")}


def test_no_source_file_calls_an_unpickler_eval_exec_or_a_code_loader():
    hits = [f"{rel}:{hit}" for path in sorted(SRC.rglob("*.py"))
            for rel in [path.relative_to(SRC).as_posix()]
            for hit in forbidden_calls(path.read_text())
            if (rel, hit.split(": ", 1)[1]) not in _REVIEWED]
    assert hits == []


@pytest.mark.parametrize("sample", [
    "torch.load(f, weights_only=False)", "pickle.loads(b)", "pickle.load(f)",
    "torch.load(buffer)", "torch.load(b, weights_only=flag)", "torch.export.load(b)",
    "eval(text)", "exec(code)", "compile(src, 'x', 'exec')", "marshal.loads(data)",
    "__import__(name)", "pickle.Unpickler(f).load()", "torch.jit.load(p)",
    "np.load(p, allow_pickle=True, weights_only=False)"])
def test_the_scan_finds_each_forbidden_call(sample):
    """The scan above can fail: it reports each call it is meant to catch."""
    assert forbidden_calls(sample)


@pytest.mark.parametrize("sample", [
    "torch.load(f, weights_only=True)", "module.eval()", "__import__('sealedtorch.cli')",
    '"""docs: pickle.loads(b) and eval(x)"""', "x = 1  # exec(code)"])
def test_the_scan_ignores_safe_calls_and_prose(sample):
    assert forbidden_calls(sample) == []
