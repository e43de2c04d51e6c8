"""Keyserver release benchmark: challenge + attest + fetch with sim evidence, over TLS.

Starts a real keyserver process (`sealedtorch keyserver run`) on 127.0.0.1 with a fresh data
directory, registers one model, then measures, in one run:

1. latency: one client doing releases back to back (p50 / p99 of the three requests);
2. throughput: N concurrent clients (threads spread over a few client processes, each with
   its own keep-alive connection), releases per second.

Printed, not asserted.  Goal on a 2-core machine: p50 <= 5 ms, >= 300 releases/s.  The
clients run on the same cores as the server, so the figures are a lower bound.

    python bench/keyserver.py [--latency-n 300] [--clients 32] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from sealedtorch.attest import measure, sim
from sealedtorch.attest.attesters import SimAttester
from sealedtorch.keys import ModelKey
from sealedtorch.keyserver.client import AdminClient, AttestedKeyClient
from sealedtorch.keyserver.config import init_data_dir
from sealedtorch.keyserver.server import free_port
from sealedtorch.keyserver.tls import client_context

MODEL = "bench-model"


def _release(client: AttestedKeyClient) -> None:
    client.attest()
    client.fetch(MODEL)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _worker(url: str, ca: str, platform_dir: str, threads: int, seconds: float,
            start_at: float, out: mp.Queue) -> None:
    platform = sim.SimPlatform.load(platform_dir)
    attester = SimAttester(platform, measure.measurement(b"bench"))
    counts = [0] * threads
    errors = [0] * threads

    def run(i: int) -> None:
        with AttestedKeyClient(url, ca, attester) as client:
            _release(client)  # connect (TLS handshake) before the clock starts
            while time.time() < start_at:
                time.sleep(0.001)
            deadline = start_at + seconds
            while time.time() < deadline:
                try:
                    _release(client)
                    counts[i] += 1
                except Exception:
                    errors[i] += 1

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((sum(counts), sum(errors)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-n", type=int, default=300)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL",
                    help="SQLite synchronous mode (FULL: every audit record fsynced)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sealedtorch-bench-"))
    init = init_data_dir(tmp / "data", now=time.time())
    platform = sim.init_platform(tmp / "sim")
    ca = str(init.ca_file)
    settings_path = init.config.data_dir / "keyserver.json"
    settings = json.loads(settings_path.read_text())
    settings["store"]["synchronous"] = args.synchronous
    settings_path.write_text(json.dumps(settings))
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "sealedtorch.cli", "keyserver", "run", "--data",
         str(init.config.data_dir), "--listen", f"127.0.0.1:{port}",
         "--trust-sim-root", str(platform.directory / sim.PUB_FILE)],
        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/readyz", verify=client_context(ca)).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"keyserver did not start; see {tmp}/server.log") from None
                time.sleep(0.1)
        policy = {"allow": [{"tee": "sim", "measurement": measure.measurement(b"bench").hex()}]}
        with AdminClient.from_token_file(url, ca, init.admin_token_file) as admin:
            admin.register(ModelKey.generate(MODEL), policy)

        # 1. latency, one client, back to back
        attester = SimAttester(platform, measure.measurement(b"bench"))
        samples: list[float] = []
        with AttestedKeyClient(url, ca, attester) as client:
            for _ in range(20):
                _release(client)  # warm up (TLS handshake, imports, caches)
            for _ in range(args.latency_n):
                t0 = time.perf_counter()
                _release(client)
                samples.append((time.perf_counter() - t0) * 1000)

        # 2. throughput, N concurrent clients
        procs = max(1, min(args.client_procs, args.clients))
        per = [args.clients // procs + (1 if i < args.clients % procs else 0)
               for i in range(procs)]
        queue: mp.Queue = mp.Queue()
        start_at = time.time() + 2.0 + 0.05 * args.clients
        workers = [mp.Process(target=_worker, args=(url, ca, str(platform.directory), n,
                                                    args.seconds, start_at, queue))
                   for n in per]
        for w in workers:
            w.start()
        results = [queue.get(timeout=120 + args.seconds) for _ in workers]
        for w in workers:
            w.join()
        total = sum(r[0] for r in results)
        errors = sum(r[1] for r in results)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    rate = total / args.seconds
    report = {
        "cpus": os.cpu_count(),
        "latency_ms": {"n": len(samples), "p50": round(statistics.median(samples), 2),
                       "p99": round(_percentile(samples, 0.99), 2),
                       "mean": round(statistics.fmean(samples), 2)},
        "throughput": {"clients": args.clients, "client_processes": procs,
                       "seconds": args.seconds, "releases": total, "errors": errors,
                       "releases_per_s": round(rate, 1)},
    }
    report["synchronous"] = args.synchronous
    print("keyserver release (challenge + attest + fetch, sim evidence, TLS, audit on, "
          f"SQLite synchronous={args.synchronous})")
    print(f"  latency, 1 client:  p50 {report['latency_ms']['p50']} ms   "
          f"p99 {report['latency_ms']['p99']} ms   (goal p50 <= 5 ms)")
    print(f"  throughput, {args.clients} clients: {report['throughput']['releases_per_s']} "
          f"releases/s   ({total} in {args.seconds:.0f} s, {errors} errors; goal >= 300/s)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
