"""Fixtures for the runtime tests: a sim platform, small sealed models, real TLS servers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from sealedtorch.attest import measure
from sealedtorch.attest.sim import init_platform
from sealedtorch.format import seal
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.architectures import mlp
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.kserve import TensorSpec
from sealedtorch.runtime.loader import LoadedModel, ModelSource
from sealedtorch.runtime.server import RuntimeServer

MLP_ARCH = "sealedtorch.runtime.architectures:mlp"
MLP_KWARGS = {"in_features": 4, "out_features": 3, "hidden": [8]}


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sim") / "platform"
    init_platform(d)
    return d


@dataclass
class SealedModel:
    path: Path
    key: ModelKey
    module: torch.nn.Module

    @property
    def keys(self) -> StaticKeys:
        return StaticKeys(self.key)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SealedModel:
    """A sealed 4 -> 8 -> 3 MLP and its plaintext twin."""
    torch.manual_seed(0)
    module = mlp(**MLP_KWARGS).eval()
    key = ModelKey.generate("tiny-mlp")
    path = tmp_path_factory.mktemp("models") / "tiny.sealed"
    seal(module, path, key=key, metadata={"arch": MLP_ARCH, "arch_kwargs": MLP_KWARGS})
    return SealedModel(path, key, module)


def sim_policy(config: RuntimeConfig | None = None, **extra: Any) -> dict[str, Any]:
    return {"allow": [{"tee": "sim", "measurement": runtime_measurement(config).hex(),
                       **extra}]}


@pytest.fixture
def policy_for() -> Callable[..., dict[str, Any]]:
    return sim_policy


@pytest.fixture
def start_server(sim_dir) -> Iterator[Callable[..., RuntimeServer]]:
    """Start real TLS servers on 127.0.0.1; all are stopped at the end of the test."""
    started: list[RuntimeServer] = []

    def start(models: list[Any], *, keys: Any = None, config: Any = None,
              wait: bool = True, **kwargs: Any) -> RuntimeServer:
        kwargs.setdefault("tee", "sim")
        kwargs.setdefault("sim_platform", sim_dir)
        srv = RuntimeServer.start(models, keys=keys, config=config, **kwargs)
        started.append(srv)
        if wait:
            srv.runtime.wait_loaded(60)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def raw_client() -> Iterator[Callable[[str], httpx.Client]]:
    """Plain httpx clients that skip certificate checks (tests of the protocol itself)."""
    clients: list[httpx.Client] = []

    def make(url: str) -> httpx.Client:
        c = httpx.Client(base_url=url, verify=False, timeout=30)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


class Recorder(torch.nn.Module):
    """Doubles its input; can sleep (``delay``) and fails on negative inputs; counts calls."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        if self.delay:
            time.sleep(self.delay)
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2


def recorder_model(name: str = "rec", delay: float = 0.0) -> LoadedModel:
    return LoadedModel.from_module(
        name, Recorder(delay), inputs=[TensorSpec("x", "FP32", (-1, 2))],
        outputs=[TensorSpec("y", "FP32", (-1, 2))])


@pytest.fixture
def recorder() -> Callable[..., LoadedModel]:
    return recorder_model


def infer_json(values: list[list[float]], name: str = "x", datatype: str = "FP32"
               ) -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": datatype,
                        "shape": [len(values), len(values[0])],
                        "data": [v for row in values for v in row]}]}


@pytest.fixture
def body() -> Callable[..., dict[str, Any]]:
    return infer_json


def source(model: SealedModel, name: str = "tiny") -> ModelSource:
    return ModelSource(name, model.path)


@pytest.fixture
def tiny_source(tiny) -> ModelSource:
    return source(tiny)


def dump(obj: Any) -> str:
    return json.dumps(obj)


class FixedUpstream:
    """The keycache's upstream protocol, answering with fixed (key, policy) pairs."""

    def __init__(self, released: list[tuple[ModelKey, Any]]) -> None:
        self.released = released

    def fetch_all(self) -> list[tuple[ModelKey, Any]]:
        return self.released


#: The sim measurement the keycaches of :func:`keycache_socket` attest their answers with.
KEYCACHE_SOCKET_MEASUREMENT = measure.measurement(b"runtime tests: keycache_socket")


def trusting_keycache_socket(sim_dir: Path, **settings: Any) -> RuntimeConfig:
    """A runtime configuration (``settings`` plus a ``keycache`` rule) that accepts keys from
    the keycaches :func:`keycache_socket` starts: tee sim, their measurement, the test
    platform's key."""
    from sealedtorch.attest.sim import SimPlatform

    return RuntimeConfig.model_validate({**settings, "keycache": [{
        "tee": "sim", "measurement": KEYCACHE_SOCKET_MEASUREMENT.hex(),
        "platform_key": SimPlatform.load(sim_dir).public_key.hex()}]})


@pytest.fixture
def keycache_socket(sim_dir) -> Iterator[Callable[[list[tuple[ModelKey, Any]]], Path]]:
    """Start real keycaches (sim appraiser, Unix socket under a short /tmp path) holding the
    given (key, policy) pairs; returns the socket path.  All are stopped at the end.  They
    sign their answers with sim evidence under :data:`KEYCACHE_SOCKET_MEASUREMENT` (a
    runtime trusts them with :func:`trusting_keycache_socket`)."""
    import shutil
    import tempfile

    from sealedtorch import crypto
    from sealedtorch.attest import VerifierConfig
    from sealedtorch.attest.attesters import SimAttester
    from sealedtorch.attest.sim import SimPlatform
    from sealedtorch.keycache.local import AnswerSigner, EvidenceAppraiser
    from sealedtorch.keycache.server import KeycacheServer
    from sealedtorch.keycache.service import Keycache

    running: list[tuple[Any, Any]] = []
    dirs: list[Path] = []

    def start(released: list[tuple[ModelKey, Any]]) -> Path:
        d = Path(tempfile.mkdtemp(prefix="kc-", dir="/tmp"))  # Unix socket paths are short
        dirs.append(d)
        pub = crypto.load_ed25519_public((sim_dir / "platform.pub").read_bytes())
        kc = Keycache(FixedUpstream(released),
                      EvidenceAppraiser(VerifierConfig(sim_platform_keys=(pub,)), tees=["sim"]),
                      refresh=3600, max_stale=3600)
        kc.refresh_once()
        signer = AnswerSigner(SimAttester(SimPlatform.load(sim_dir),
                                          KEYCACHE_SOCKET_MEASUREMENT))
        server = KeycacheServer(kc, d / "kc" / "keycache.sock", signer=signer).start()
        running.append((kc, server))
        return d / "kc" / "keycache.sock"

    yield start
    for kc, server in running:
        server.stop()
        kc.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
