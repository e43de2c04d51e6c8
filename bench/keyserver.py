"""Keyserver release benchmark: challenge + attest + fetch with sim evidence, over TLS.

For each store — SQLite, one PostgreSQL replica, two PostgreSQL replicas on one database —
starts real keyserver processes (`sealedtorch keyserver run`) on 127.0.0.1 with a fresh data
directory (and a fresh PostgreSQL schema), registers one model, then measures, in one run:

1. latency: one client doing releases back to back (p50 / p99 of the three requests);
2. throughput: N concurrent clients (threads spread over a few client processes, each with
   its own keep-alive connection, spread over the replicas), releases per second and the
   p50 / p99 of one release under that load.

3. ``--row-macs``: the cost of the store's row MACs (issue 11 §1) and of the
   transparency-log receipt (§2) next to the release path, in one process on SQLite:
   ``Keyserver.release`` of one key as shipped, with the row checks skipped, with the
   receipt not built, and with neither (bench-only stand-ins, same store, same run,
   interleaved), plus the cost of one MAC made and one checked cold (no cache).

Printed, not asserted.  Goal on a 2-core machine: p50 <= 5 ms, >= 300 releases/s (SQLite).
The clients, the servers and PostgreSQL share the same cores, so the figures are a lower
bound, and two replicas on one 2-core machine cannot show the scaling they give on two.

    python bench/keyserver.py [--latency-n 300] [--clients 32] [--seconds 8]
        [--stores sqlite,postgresql,postgresql-2] [--pg-url postgresql://…/test]
        [--row-macs [--row-macs-n 400]] [--stores none]
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
from typing import Any

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


def _worker(urls: list[str], ca: str, platform_dir: str, threads: int, seconds: float,
            start_at: float, out: mp.Queue) -> None:
    platform = sim.SimPlatform.load(platform_dir)
    attester = SimAttester(platform, measure.measurement(b"bench"))
    counts = [0] * threads
    errors = [0] * threads
    samples: list[list[float]] = [[] for _ in range(threads)]

    def run(i: int) -> None:
        # clients spread over the replicas as a load balancer would
        with AttestedKeyClient(urls[i % len(urls)], ca, attester) as client:
            _release(client)  # connect (TLS handshake) before the clock starts
            while time.time() < start_at:
                time.sleep(0.001)
            deadline = start_at + seconds
            while time.time() < deadline:
                t0 = time.perf_counter()
                try:
                    _release(client)
                    counts[i] += 1
                    samples[i].append((time.perf_counter() - t0) * 1000)
                except Exception:
                    errors[i] += 1

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((sum(counts), sum(errors), [x for s in samples for x in s]))


def _start_server(data: Path, platform: sim.SimPlatform, ca: str, log: Any,
                  database: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sealedtorch.cli", "keyserver", "run", "--data", str(data),
           "--listen", f"127.0.0.1:{port}",
           "--trust-sim-root", str(platform.directory / sim.PUB_FILE)]
    if database:
        cmd += ["--database", database]
    server = subprocess.Popen(cmd, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/readyz", verify=client_context(ca)).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit(f"keyserver did not start; see {log.name}")
        time.sleep(0.1)


def _scenario(name: str, args: argparse.Namespace, tmp: Path, platform: sim.SimPlatform,
              database: str | None, replicas: int) -> dict[str, Any]:
    work = tmp / name
    work.mkdir()
    init = init_data_dir(work / "data", now=time.time(), database=database)
    ca = str(init.ca_file)
    settings_path = init.config.data_dir / "keyserver.json"
    settings = json.loads(settings_path.read_text())
    if settings["store"]["type"] == "sqlite":
        settings["store"]["synchronous"] = args.synchronous
    settings["rate_limit"] = None  # every client is 127.0.0.1 here
    settings_path.write_text(json.dumps(settings))
    log = open(work / "server.log", "w")
    servers: list[subprocess.Popen] = []
    try:
        urls = []
        for _ in range(replicas):
            proc, url = _start_server(init.config.data_dir, platform, ca, log, database)
            servers.append(proc)
            urls.append(url)
        policy = {"allow": [{"tee": "sim", "measurement": measure.measurement(b"bench").hex()}]}
        with AdminClient.from_token_file(urls[0], ca, init.admin_token_file) as admin:
            admin.register(ModelKey.generate(MODEL), policy)

        # 1. latency, one client, back to back (first replica)
        attester = SimAttester(platform, measure.measurement(b"bench"))
        samples: list[float] = []
        with AttestedKeyClient(urls[0], ca, attester) as client:
            for _ in range(20):
                _release(client)  # warm up (TLS handshake, imports, caches)
            for _ in range(args.latency_n):
                t0 = time.perf_counter()
                _release(client)
                samples.append((time.perf_counter() - t0) * 1000)

        # 2. throughput, N concurrent clients spread over the replicas
        procs = max(1, min(args.client_procs, args.clients))
        per = [args.clients // procs + (1 if i < args.clients % procs else 0)
               for i in range(procs)]
        queue: mp.Queue = mp.Queue()
        start_at = time.time() + 2.0 + 0.05 * args.clients
        workers = [mp.Process(target=_worker, args=(urls, ca, str(platform.directory), n,
                                                    args.seconds, start_at, queue))
                   for n in per]
        for w in workers:
            w.start()
        results = [queue.get(timeout=120 + args.seconds) for _ in workers]
        for w in workers:
            w.join()
        total = sum(r[0] for r in results)
        errors = sum(r[1] for r in results)
        loaded = [x for r in results for x in r[2]]
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            proc.wait(timeout=30)
        log.close()
    return {
        "store": name, "replicas": replicas,
        "latency_ms": {"n": len(samples), "p50": round(statistics.median(samples), 2),
                       "p99": round(_percentile(samples, 0.99), 2),
                       "mean": round(statistics.fmean(samples), 2)},
        "throughput": {"clients": args.clients, "client_processes": procs,
                       "seconds": args.seconds, "releases": total, "errors": errors,
                       "releases_per_s": round(total / args.seconds, 1),
                       "p50_ms": round(statistics.median(loaded), 2) if loaded else None,
                       "p99_ms": round(_percentile(loaded, 0.99), 2) if loaded else None},
    }


def _row_mac_cost(tmp: Path, platform: sim.SimPlatform, n: int) -> dict[str, Any]:
    """In-process service release time with and without the row checks (see docstring)."""
    from sealedtorch import crypto
    from sealedtorch.attest import binding
    from sealedtorch.keyserver import protocol
    from sealedtorch.keyserver.rowmac import RowIntegrity, model_bytes
    from sealedtorch.keyserver.server import build_keyserver
    from sealedtorch.keyserver.service import RequestContext

    class Unchecked(RowIntegrity):  # bench only: what the release cost without the checks
        def check_model(self, m: Any) -> Any:
            return m

        def check_key(self, k: Any) -> Any:
            return k

    import logging

    logging.getLogger("sealedtorch").setLevel(logging.ERROR)  # sim releases log warnings
    work = tmp / "row-macs"
    work.mkdir()
    init = init_data_dir(work / "data", now=time.time())
    service = build_keyserver(init.config,
                              trust_sim_roots=[platform.directory / sim.PUB_FILE])
    try:
        ctx = RequestContext("127.0.0.1")
        admin = service.authenticate_admin(init.admin_token_file.read_text().strip(), ctx,
                                           "bench")
        key = ModelKey.generate(MODEL)
        service.register(admin, ctx, protocol.RegisterRequest(
            model_id=MODEL, key=protocol.KeyMaterial(version=1,
                                                     key=protocol.b64encode(key.secret)),
            policy={"allow": [{"tee": "sim",
                               "measurement": measure.measurement(b"bench").hex()}]}))
        kp = crypto.EphemeralKeyPair.generate()
        nonce = service.challenge("sim", ctx).nonce
        ev = SimAttester(platform, measure.measurement(b"bench")).evidence(
            binding.report_data(nonce, kp.public_bytes))
        token = service.attest(protocol.AttestRequest(
            nonce=protocol.b64encode(nonce), tee="sim", evidence=protocol.b64encode(ev.data),
            public_key=protocol.b64encode(kp.public_bytes)), ctx).token
        checked, unchecked = service.rows, Unchecked(service.kek)
        real_receipt = service.tlog.receipt

        def no_receipt(*_: Any, **__: Any) -> dict[str, Any]:  # bench only
            return {}

        variants = {"checked": (checked, real_receipt), "unchecked": (unchecked, real_receipt),
                    "no_receipt": (checked, no_receipt), "neither": (unchecked, no_receipt)}
        timings: dict[str, list[float]] = {k: [] for k in variants}
        for i in range(n + 20):
            for name, (rows, receipt) in variants.items():
                service.rows = rows
                service.tlog.receipt = receipt  # type: ignore[method-assign]
                t0 = time.perf_counter()
                service.release(token, ctx, model_id=MODEL)
                if i >= 20:  # warm-up
                    timings[name].append((time.perf_counter() - t0) * 1000)
        service.rows = checked
        service.tlog.receipt = real_receipt  # type: ignore[method-assign]
        with service.store.snapshot() as tx:
            model = tx.get_model(MODEL)
        assert model is not None
        cold = []
        for _ in range(200):
            fresh = RowIntegrity(service.kek)
            t0 = time.perf_counter()
            fresh.check_model(model)
            cold.append((time.perf_counter() - t0) * 1e6)
        made = []
        for _ in range(200):
            t0 = time.perf_counter()
            checked.tag(model_bytes(model))
            made.append((time.perf_counter() - t0) * 1e6)
    finally:
        service.store.close()
        service.kek.close()
    p50 = {k: statistics.median(v) for k, v in timings.items()}
    return {"n": n, "release_p50_ms_checked": round(p50["checked"], 3),
            "release_p50_ms_unchecked": round(p50["unchecked"], 3),
            "ratio": round(p50["checked"] / p50["unchecked"], 3),
            "release_p50_ms_no_receipt": round(p50["no_receipt"], 3),
            "release_p50_ms_neither": round(p50["neither"], 3),
            "ratio_vs_neither": round(p50["checked"] / p50["neither"], 3),
            "check_cold_us_p50": round(statistics.median(cold), 1),
            "mac_us_p50": round(statistics.median(made), 1), "kek": service.kek.kek_id}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-n", type=int, default=300)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL",
                    help="SQLite synchronous mode (FULL: every audit record fsynced)")
    ap.add_argument("--stores", default="sqlite,postgresql,postgresql-2",
                    help="comma-separated: sqlite, postgresql (one replica), postgresql-2 "
                         "(two replicas on one database)")
    ap.add_argument("--pg-url", default=os.environ.get("SEALEDTORCH_BENCH_PG",
                                                       "postgresql://postgres@127.0.0.1:5432/"
                                                       "test"),
                    help="PostgreSQL database; a fresh schema is made and dropped per store")
    ap.add_argument("--row-macs", action="store_true",
                    help="also measure the row-MAC checks on the release path (in-process)")
    ap.add_argument("--row-macs-n", type=int, default=400)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sealedtorch-bench-"))
    platform = sim.init_platform(tmp / "sim")
    reports = []
    for name in [n.strip() for n in args.stores.split(",") if n.strip()]:
        if name == "none":
            continue
        if name == "sqlite":
            reports.append(_scenario(name, args, tmp, platform, None, 1))
            continue
        if name not in ("postgresql", "postgresql-2"):
            raise SystemExit(f"unknown store {name!r}")
        import psycopg

        schema = f"bench_{os.getpid()}_{name.replace('-', '_')}"
        with psycopg.connect(args.pg_url, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        try:
            url = (args.pg_url + ("&" if "?" in args.pg_url else "?")
                   + f"options=-csearch_path%3D{schema}")
            reports.append(_scenario(name, args, tmp, platform, url,
                                     2 if name == "postgresql-2" else 1))
        finally:
            with psycopg.connect(args.pg_url, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")

    print(f"keyserver release (challenge + attest + fetch, sim evidence, TLS, audit on; "
          f"SQLite synchronous={args.synchronous}; PostgreSQL synchronous_commit=on), "
          f"{os.cpu_count()} CPUs, clients on the same machine")
    print(f"  {'store':<14} {'1 client p50':>12} {'p99':>7}   {args.clients} clients: "
          f"{'releases/s':>10} {'p50':>7} {'p99':>7} errors")
    for r in reports:
        lat, thr = r["latency_ms"], r["throughput"]
        print(f"  {r['store']:<14} {lat['p50']:>9} ms {lat['p99']:>7}   "
              f"{'':>{len(str(args.clients)) + 9}}{thr['releases_per_s']:>10} "
              f"{thr['p50_ms']:>7} {thr['p99_ms']:>7} {thr['errors']}")
    row_macs = _row_mac_cost(tmp, platform, args.row_macs_n) if args.row_macs else None
    if row_macs is not None:
        print(f"  row MACs ({row_macs['kek']}), service release of one key, SQLite, "
              f"in-process, n={row_macs['n']}: p50 {row_macs['release_p50_ms_checked']} ms "
              f"with the checks, {row_macs['release_p50_ms_unchecked']} ms without "
              f"(x{row_macs['ratio']}); one MAC made {row_macs['mac_us_p50']} us, checked "
              f"cold {row_macs['check_cold_us_p50']} us (warm: cached)")
        print(f"  receipts: release without building the receipt "
              f"{row_macs['release_p50_ms_no_receipt']} ms; without receipt and row checks "
              f"{row_macs['release_p50_ms_neither']} ms; as shipped / neither = "
              f"x{row_macs['ratio_vs_neither']} (goal <= 1.2)")
    print(json.dumps({"cpus": os.cpu_count(), "synchronous": args.synchronous,
                      "results": reports, "row_macs": row_macs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
