"""The documentation's Python code works as printed.

Every fenced block opened with ```` ```python runnable ```` in README.md and docs/*.md runs,
unchanged, as its own Python process, inside the setup the README describes for a TEE host:
a keyserver (its own process, SQLite) holding the key of a sealed ResNet-50 ``model.sealed``
under a policy that names the runtime's measurement (``sealedtorch serve --config
runtime.json --print-measurement``) and the keycache's (``sealedtorch attest measure``), a
keycache process that attested to it and signs its answers, and a ``sealedtorch serve
--config runtime.json`` process serving the model; ``runtime.json``'s ``keycache`` rule names
that keycache (its measurement, the sim platform's key), so runtimes accept keys from it
only.  The block sees what such a host gives it: the working directory (``model.sealed``,
``runtime.json``, ``runtime-policy.json``, ``sim/platform.pub``, ``runtime-cert.pem``) and
the environment (``SEALEDTORCH_KEYCACHE_SOCKET``, ``SEALEDTORCH_SIM_PLATFORM``: the sim TEE,
``SEALEDTORCH_RUNTIME_CONFIG``: the measured runtime configuration with its keycache rule,
``SEALEDTORCH_RUNTIME_URL``).  Blocks not marked runnable are fragments (they name
variables from the surrounding text) and are not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sealedtorch.attest.measure import measurement
from sealedtorch.errors import SealedTorchError
from sealedtorch.runtime.config import load_config, runtime_measurement
from sealedtorch.runtime.server import SubprocessServer

from .conftest import REPO

FENCE = re.compile(r"^```python runnable[^\n]*\n(.*?)^```", re.S | re.M)
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def runnable_blocks() -> list[tuple[str, str]]:
    """(``file:line``, code) of every runnable block, in document order."""
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(REPO)}:{line}", match.group(1)))
    return found


BLOCKS = runnable_blocks()


def test_the_harness_finds_the_readme_snippet_and_the_client_examples():
    where = [w.split(":")[0] for w, _ in BLOCKS]
    assert where.count("README.md") >= 1
    assert where.count("docs/runtime.md") >= 2  # tritonclient and the kserve SDK
    assert all("KeycacheClient" in code for w, code in BLOCKS if w.startswith("README.md"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sealedtorch.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, f"sealedtorch {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def _wait(what: str, check, proc: subprocess.Popen[bytes], log: Path,
          timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, KeyError, ValueError, SealedTorchError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


@dataclass
class TeeHost:
    work: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def tee_host() -> Iterator[TeeHost]:
    import torch
    import torchvision

    from sealedtorch.attest.sim import SimPlatform
    from sealedtorch.format import seal
    from sealedtorch.keycache import KeycacheClient
    from sealedtorch.keys import ModelKey
    from sealedtorch.keyserver.client import AdminClient

    work = Path(tempfile.mkdtemp(prefix="docs-", dir="/tmp"))  # short: a Unix socket lives here
    procs: list[subprocess.Popen[bytes]] = []
    server: SubprocessServer | None = None
    try:
        # the owner: a sealed ResNet-50 and a policy naming the runtime's measurement
        torch.manual_seed(0)
        key = ModelKey.generate("resnet50")
        seal(torchvision.models.resnet50().eval(), work / "model.sealed", key=key,
             progress=False, metadata={"arch": "torchvision.models:resnet50"})
        _cli("sim", "init", "--output", str(work / "sim"))
        # the keycache (no --config) measures the empty configuration; the runtime's measured
        # configuration names it, on this sim platform, as the keycache it takes keys from
        holder = json.loads(_cli("attest", "measure", "--json"))["measurement"]
        assert holder == measurement(b"").hex()
        platform_key = SimPlatform.load(work / "sim").public_key.hex()
        runtime_cfg = work / "runtime.json"
        runtime_cfg.write_text(json.dumps({"keycache": [
            {"tee": "sim", "measurement": holder, "platform_key": platform_key}]}))
        runtime = _cli("serve", "--config", str(runtime_cfg), "--print-measurement").strip()
        assert runtime == runtime_measurement(load_config(runtime_cfg)).hex()
        allow = [{"tee": "sim", "measurement": runtime}]
        policy = {"allow": allow, "holders": [{"tee": "sim", "measurement": holder}]}
        (work / "runtime-policy.json").write_text(json.dumps({"allow": allow}))

        # the keyserver, then the keycache, each its own process
        data = work / "keyserver"
        _cli("keyserver", "init", "--data", str(data))
        port = _free_port()
        url, ca = f"https://127.0.0.1:{port}", data / "tls" / "ca.pem"
        ks_log = work / "keyserver.log"
        with ks_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sealedtorch.cli", "keyserver", "run", "--data",
                 str(data), "--listen", f"127.0.0.1:{port}", "--trust-sim-root",
                 str(work / "sim" / "platform.pub")], stdout=out, stderr=subprocess.STDOUT))
        ca_ctx = ssl.create_default_context(cafile=str(ca))
        _wait("keyserver", lambda: httpx.get(f"{url}/readyz", verify=ca_ctx, timeout=2)
              .status_code == 200, procs[-1], ks_log)
        with AdminClient.from_token_file(url, ca, data / "admin-token") as admin:
            admin.register(key, policy)
        sock = work / "run" / "keycache.sock"
        kc_log = work / "keycache.log"
        with kc_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sealedtorch.cli", "keycache", "run", "--keyserver",
                 url, "--ca", str(ca), "--socket", str(sock), "--tee", "sim",
                 "--sim-platform", str(work / "sim")], stdout=out, stderr=subprocess.STDOUT))
        with KeycacheClient(sock) as status:
            _wait("keycache", lambda: any(k.get("model_id") == "resnet50"
                                          for k in status.status().get("keys", [])),
                  procs[-1], kc_log)

        # the runtime, serving the model, with its certificate written for clients
        server = SubprocessServer.start(
            ["--model", f"resnet50={work / 'model.sealed'}", "--keycache", str(sock),
             "--listen", "127.0.0.1:0", "--tee", "sim", "--sim-platform", str(work / "sim"),
             "--config", str(runtime_cfg), "--write-cert", str(work / "runtime-cert.pem")],
            timeout=120)
        _wait("sealedtorch serve", lambda: httpx.get(
            f"{server.url}/v2/health/ready", verify=False, timeout=5).status_code == 200,
            server.process, server.log_path)

        env = {k: v for k, v in os.environ.items() if not k.startswith("SEALEDTORCH_")}
        env.update(SEALEDTORCH_KEYCACHE_SOCKET=str(sock),
                   SEALEDTORCH_SIM_PLATFORM=str(work / "sim"),
                   SEALEDTORCH_RUNTIME_CONFIG=str(runtime_cfg),
                   SEALEDTORCH_RUNTIME_URL=server.url)
        yield TeeHost(work, env)
    finally:
        if server is not None:
            server.stop()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("where,code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_runnable_block_works_as_printed(tee_host, tmp_path, where, code):
    script = tmp_path / "block.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tee_host.work, env=tee_host.env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (f"{where} failed:\n{code}\n--- stdout\n"
                                  f"{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-4000:]}")
