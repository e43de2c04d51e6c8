"""Keycache benchmark: local key fetch over the Unix socket, next to the direct keyserver path.

Starts a real keyserver process and a real keycache process (`sealedtorch keycache run`,
sim TEE, its logs on at INFO to a file), registers one model, then measures in one run:

1. local latency, one runtime, back to back, ``KeycacheClient.get_key`` with sim evidence:
   - ``reusing nonce``: the normal case, the nonce handed out with the previous answer is
     used (one round trip: evidence + HPKE-sealed key);
   - ``fresh challenge``: the client's nonce pool emptied before every call (two round
     trips: challenge, then key), i.e. a runtime's first fetch;
2. local throughput: N concurrent runtimes (threads in a few processes), keys per second;
3. the direct keyserver path a runtime would take without a keycache: attest (challenge +
   sim evidence + verify + token) and fetch over TLS, latency and throughput, same N.

Printed, not asserted.  Goal: local p50 <= 2 ms.  Clients share the machine's cores with
both servers, so the figures are a lower bound.

    python bench/keycache.py [--latency-n 1000] [--clients 16] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from sealedtorch.attest import measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.keycache import KeycacheClient
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.config import init_data_dir
from sealedtorch.keyserver.server import free_port
from sealedtorch.keyserver.tls import client_context

MODEL = "bench-model"
RUNTIME_CONFIG = b"bench runtime"
HOLDER_CONFIG = b"bench keycache"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": round(statistics.median(samples), 3),
            "p99": round(_percentile(samples, 0.99), 3),
            "mean": round(statistics.fmean(samples), 3)}


def _time(n: int, call: Callable[[], object], before: Callable[[], object] | None = None,
          ) -> list[float]:
    samples = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def _make_call(kind: str, target: str, ca: str, platform_dir: str) -> tuple[object, Callable]:
    attester = SimAttester(sim.SimPlatform.load(platform_dir),
                           measure.measurement(RUNTIME_CONFIG))
    if kind == "local":
        from sealedtorch.runtime.config import RuntimeConfig

        trusted = RuntimeConfig.model_validate({"keycache": [{  # the runtime's keycache rule
            "tee": "sim", "measurement": measure.measurement(HOLDER_CONFIG).hex(),
            "platform_key": sim.SimPlatform.load(platform_dir).public_key.hex()}]}).keycache
        client: object = KeycacheClient(target, attester=attester, keycache_rules=trusted)
        return client, lambda: client.get_key(MODEL)  # type: ignore[attr-defined]
    ks = AttestedKeyClient(target, ca, attester)

    def direct() -> None:
        ks.attest()
        ks.fetch(MODEL)
    return ks, direct


def _worker(kind: str, target: str, ca: str, platform_dir: str, threads: int,
            seconds: float, start_at: float, out: mp.Queue) -> None:
    counts, errors = [0] * threads, [0] * threads

    def run(i: int) -> None:
        client, call = _make_call(kind, target, ca, platform_dir)
        call()  # connect (and for TLS, handshake) before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        deadline = start_at + seconds
        while time.time() < deadline:
            try:
                call()
                counts[i] += 1
            except Exception:
                errors[i] += 1
        client.close()  # type: ignore[attr-defined]

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((sum(counts), sum(errors)))


def _throughput(kind: str, target: str, ca: str, platform_dir: str, clients: int,
                procs: int, seconds: float) -> dict[str, float]:
    procs = max(1, min(procs, clients))
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    queue: mp.Queue = mp.Queue()
    start_at = time.time() + 2.0 + 0.05 * clients
    workers = [mp.Process(target=_worker, args=(kind, target, ca, platform_dir, n, seconds,
                                                start_at, queue)) for n in per]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120 + seconds) for _ in workers]
    for w in workers:
        w.join()
    total, errors = sum(r[0] for r in results), sum(r[1] for r in results)
    return {"clients": clients, "client_processes": procs, "seconds": seconds,
            "fetches": total, "errors": errors, "per_s": round(total / seconds, 1)}


def _wait(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen,
          log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what}: process exited; see {log}")
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what}: timed out; see {log}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-n", type=int, default=1000)
    ap.add_argument("--direct-latency-n", type=int, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="stkc-", dir="/tmp"))  # short: socket path limit
    init = init_data_dir(tmp / "data", now=time.time())
    settings_path = init.config.data_dir / "keyserver.json"
    settings = json.loads(settings_path.read_text())
    settings["rate_limit"] = None  # the direct path's clients are all 127.0.0.1 here
    settings_path.write_text(json.dumps(settings))
    platform = sim.init_platform(tmp / "sim")
    ca = str(init.ca_file)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    sock = str(tmp / "run" / "kc.sock")
    (tmp / "holder.conf").write_bytes(HOLDER_CONFIG)
    ks_log, kc_log = tmp / "keyserver.log", tmp / "keycache.log"
    procs: list[subprocess.Popen] = []
    files = [open(ks_log, "w"), open(kc_log, "w")]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sealedtorch.cli", "keyserver", "run", "--data",
             str(init.config.data_dir), "--listen", f"127.0.0.1:{port}", "--trust-sim-root",
             str(platform.directory / sim.PUB_FILE)], stdout=files[0], stderr=files[0]))
        _wait(lambda: httpx.get(url + "/readyz", verify=client_context(ca)).status_code == 200,
              30, "keyserver", procs[0], ks_log)
        policy = {
            "allow": [{"tee": "sim", "measurement": measure.measurement(RUNTIME_CONFIG).hex()}],
            "holders": [{"tee": "sim",
                         "measurement": measure.measurement(HOLDER_CONFIG).hex()}]}
        with AdminClient.from_token_file(url, ca, init.admin_token_file) as admin:
            admin.register(ModelKey.generate(MODEL), policy)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sealedtorch.cli", "keycache", "run", "--keyserver", url,
             "--ca", ca, "--socket", sock, "--tee", "sim", "--sim-platform",
             str(platform.directory), "--runtime-config", str(tmp / "holder.conf"),
             "--log-format", "json"], stdout=files[1], stderr=files[1]))
        probe = KeycacheClient(sock)
        _wait(lambda: os.path.exists(sock) and bool(probe.status()["serving"]), 30,
              "keycache", procs[1], kc_log)
        probe.close()

        # 1. local latency
        client, call = _make_call("local", sock, ca, str(platform.directory))
        _time(100, call)  # warm up
        reuse = _time(args.latency_n, call)
        fresh = _time(args.latency_n // 2, call, before=client._nonces.clear)  # type: ignore[attr-defined]
        client.close()  # type: ignore[attr-defined]
        # 3a. direct latency
        ks_client, direct = _make_call("direct", url, ca, str(platform.directory))
        _time(20, direct)
        direct_samples = _time(args.direct_latency_n, direct)
        ks_client.close()  # type: ignore[attr-defined]
        # 2. and 3b. throughput
        local_tp = _throughput("local", sock, ca, str(platform.directory), args.clients,
                               args.client_procs, args.seconds)
        direct_tp = _throughput("direct", url, ca, str(platform.directory), args.clients,
                                args.client_procs, args.seconds)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
        for f in files:
            f.close()

    report = {
        "cpus": os.cpu_count(),
        "local_latency_ms": {"reusing_nonce": _summary(reuse),
                             "fresh_challenge": _summary(fresh)},
        "local_throughput": local_tp,
        "direct_latency_ms": _summary(direct_samples),
        "direct_throughput": direct_tp,
    }
    r, f, d = report["local_latency_ms"]["reusing_nonce"], \
        report["local_latency_ms"]["fresh_challenge"], report["direct_latency_ms"]
    print(f"keycache local key fetch (sim evidence, Unix socket, logs at INFO), "
          f"{os.cpu_count()} CPUs")
    print(f"  latency, 1 runtime, reusing nonce:   p50 {r['p50']} ms  p99 {r['p99']} ms  "
          f"(goal p50 <= 2 ms)")
    print(f"  latency, 1 runtime, fresh challenge: p50 {f['p50']} ms  p99 {f['p99']} ms")
    print(f"  throughput, {args.clients} runtimes: {local_tp['per_s']} keys/s "
          f"({local_tp['fetches']} in {args.seconds:g} s, {local_tp['errors']} errors)")
    print("direct keyserver path (challenge + attest + fetch, sim evidence, TLS, audit on)")
    print(f"  latency, 1 runtime:  p50 {d['p50']} ms  p99 {d['p99']} ms   "
          f"(keycache p50 is {d['p50'] / r['p50']:.1f}x lower)")
    print(f"  throughput, {args.clients} runtimes: {direct_tp['per_s']} keys/s "
          f"({direct_tp['fetches']} in {args.seconds:g} s, {direct_tp['errors']} errors)")
    print(json.dumps(report))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
