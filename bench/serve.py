"""Serving speed: cold start and inference of a sealed ResNet-50 against plain PyTorch.

    .venv/bin/python bench/serve.py [--rounds-b1 40] [--rounds-b32 6] [--cold 3]

One run, printed.  A torchvision ResNet-50 with seeded random weights is saved as a
plaintext ``.pt`` and sealed.  Then, in this one process:

- cold start: plain PyTorch (build, ``torch.load``, ``load_state_dict``) vs the runtime's
  loader on the plaintext file (meta-device build, tensors assigned) vs the runtime's
  loader on the sealed file (key, decryption, same build), and a whole server (TLS
  identity, sim attester, HTTP listener, load) from start to ready, plaintext vs sealed;
- inference, batch 1 and batch 32 (224x224): plain ``model(x)`` under
  ``torch.inference_mode()`` vs the same model served over TLS and called through the
  verifying client (attested once, pinned, binary tensor extension), end to end.  The two
  are measured alternately (ABAB) so drift on a shared machine hits both alike.

Goals: inference ratio 1.00 +/- 0.03; sealed cold start <= 1.3x the plaintext load.
Nothing is asserted.  Keys come from memory (``StaticKeys``): the keycache round trip is
the keycache's own benchmark.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import sealedtorch
from sealedtorch.attest.sim import init_platform
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.client import AttestedClient
from sealedtorch.runtime.config import RuntimeConfig, runtime_measurement
from sealedtorch.runtime.kserve import TensorSpec
from sealedtorch.runtime.loader import LoadedModel, ModelSource, PlainSource, load_sealed
from sealedtorch.runtime.server import RuntimeServer

ARCH = {"arch": "torchvision.models:resnet50"}


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _child(mode: str, work: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work)],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def child(mode: str, work: Path) -> float:
    """One cold start in this (fresh) process; returns seconds."""
    logging.getLogger("sealedtorch").setLevel(logging.ERROR)
    plain_pt, sealed = work / "resnet50.pt", work / "resnet50.sealed"
    config = RuntimeConfig()
    keys = StaticKeys(sealedtorch.read_key_file(work / "resnet50.key"))
    t = time.perf_counter()
    if mode == "plain-pytorch":
        m = torchvision.models.resnet50()
        m.load_state_dict(torch.load(plain_pt, map_location="cpu", weights_only=True))
        m.eval()
    elif mode == "runtime-plain":
        PlainSource("r", plain_pt, metadata=ARCH).load(None, config)
    elif mode == "runtime-sealed":
        load_sealed(ModelSource("r", sealed), keys, config)
    else:
        source = ModelSource("r", sealed) if mode == "server-sealed" else PlainSource(
            "r", plain_pt, metadata=ARCH)
        srv = RuntimeServer.start([source], keys=keys, config=config, tee="sim",
                                  sim_platform=work / "sim")
        srv.wait_ready()
        elapsed = time.perf_counter() - t
        srv.stop()
        return elapsed
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rounds-b1", type=int, default=40)
    ap.add_argument("--rounds-b32", type=int, default=6)
    ap.add_argument("--cold", type=int, default=3, help="cold-start repetitions")
    args = ap.parse_args()
    if args.child:
        print(child(args.child, args.work))
        return 0
    logging.getLogger("sealedtorch").setLevel(logging.ERROR)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"{os.cpu_count()} cores, CPU")
    with tempfile.TemporaryDirectory(prefix="sealedtorch-bench-serve-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        reference = torchvision.models.resnet50().eval()
        plain_pt = work / "resnet50.pt"
        torch.save(reference.state_dict(), plain_pt)
        key = ModelKey.generate("resnet50")
        sealed = work / "resnet50.sealed"
        sealedtorch.seal(reference, sealed, key=key, metadata=ARCH)
        keys = StaticKeys(key)
        platform = init_platform(work / "sim")
        config = RuntimeConfig()

        # --- cold start: each measurement in a fresh process (imports not counted) --------
        key_file = work / "resnet50.key"
        sealedtorch.write_key_file(key_file, key)
        modes = ["plain-pytorch", "runtime-plain", "runtime-sealed", "server-plain",
                 "server-sealed"]
        cold: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.cold):
            for mode in modes:
                cold[mode].append(_child(mode, work))
        t = {m: statistics.median(v) for m, v in cold.items()}
        print(f"\ncold start, each in a fresh process (median of {args.cold}; imports not "
              f"counted; page cache warm)")
        rows = [("plain PyTorch: build + torch.load + load_state_dict", "plain-pytorch", None),
                ("runtime loader, plaintext .pt (meta build)", "runtime-plain", None),
                ("runtime loader, sealed", "runtime-sealed", "runtime-plain"),
                ("server start to ready, plaintext .pt", "server-plain", None),
                ("server start to ready, sealed", "server-sealed", "server-plain")]
        for label, mode, versus in rows:
            extra = f"   {t[mode] / t[versus]:.2f}x plaintext" if versus else ""
            if mode == "runtime-sealed":
                extra += f", {t[mode] / t['plain-pytorch']:.2f}x plain PyTorch"
            print(f"  {label:<55} {t[mode] * 1e3:8.1f} ms{extra}")

        # --- inference -------------------------------------------------------------------
        echo = LoadedModel.from_module(  # same input, no compute: the transport's share
            "echo", _Echo(), inputs=[TensorSpec("input", "FP32", (-1, 3, -1, -1))],
            outputs=[TensorSpec("output", "FP32", (-1, 1000))])
        srv = RuntimeServer.start([ModelSource("resnet50", sealed), echo], keys=keys,
                                  config=config, tee="sim", sim_platform=platform.directory)
        srv.wait_ready()
        policy = {"allow": [{"tee": "sim", "measurement": runtime_measurement(config).hex()}]}
        client = AttestedClient(srv.url, policy=policy,
                                sim_roots=[platform.directory / "platform.pub"])
        client.attest()
        baseline = torchvision.models.resnet50()
        baseline.load_state_dict(torch.load(plain_pt, map_location="cpu", weights_only=True))
        baseline.eval()
        print("\ninference, ResNet-50 224x224 (plain model(x) vs served end to end over TLS;"
              " 'forward' = the server's own forward-pass time, 'echo' = the same request to a"
              " model that computes nothing)")
        print(f"  {'batch':>5} {'':10} {'p50 ms':>9} {'p99 ms':>9} {'img/s':>8}")
        for batch, rounds in ((1, args.rounds_b1), (32, args.rounds_b32)):
            x = torch.randn(batch, 3, 224, 224)
            with torch.inference_mode():
                want = baseline(x)
            got = client.infer("resnet50", {"input": x})["output"]
            exact = torch.equal(got, want)
            plain_t: list[float] = []
            served_t: list[float] = []
            echo_t: list[float] = []
            for _ in range(2):  # warm-up
                with torch.inference_mode():
                    baseline(x)
                client.infer("resnet50", {"input": x})
            forward = srv.runtime.metrics.inference_seconds
            sum0, n0 = _hist_sum(forward, "resnet50"), forward.count(model="resnet50")
            for _ in range(rounds):
                t = time.perf_counter()
                with torch.inference_mode():
                    baseline(x)
                plain_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.infer("resnet50", {"input": x})
                served_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.infer("echo", {"input": x})
                echo_t.append(time.perf_counter() - t)
            fwd_mean = (_hist_sum(forward, "resnet50") - sum0) / (
                forward.count(model="resnet50") - n0)
            for label, s in (("plain", plain_t), ("served", served_t), ("echo", echo_t)):
                p50, p99 = pct(s, 0.5), pct(s, 0.99)
                print(f"  {batch:5d} {label:10} {p50 * 1e3:9.1f} {p99 * 1e3:9.1f} "
                      f"{batch / statistics.mean(s):8.1f}")
            ratio = pct(served_t, 0.5) / pct(plain_t, 0.5)
            print(f"  {batch:5d} ratio end to end, p50 served/plain = {ratio:.3f} "
                  f"(mean {statistics.mean(served_t) / statistics.mean(plain_t):.3f}); "
                  f"forward only, mean server/plain = "
                  f"{fwd_mean / statistics.mean(plain_t):.3f}; echo p50 "
                  f"{pct(echo_t, 0.5) * 1e3:.1f} ms; outputs bit-identical: {exact}")
        client.close()
        srv.stop()
    return 0


class _Echo(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1000)


def _hist_sum(hist: object, model: str) -> float:
    line = next(x for x in hist.lines()  # type: ignore[attr-defined]
                if x.startswith(f'{hist.name}_sum{{model="{model}"}}'))  # type: ignore[attr-defined]
    return float(line.rsplit(" ", 1)[1])


if __name__ == "__main__":
    sys.exit(main())
