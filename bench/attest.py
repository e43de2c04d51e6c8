"""Verification latency per TEE, collateral already at hand (no network), in one run.

    .venv/bin/python bench/attest.py [--rounds 200]

Uses the real published evidence in ../shared/evidence (or $SEALEDTORCH_EVIDENCE_DIR),
verified at a time inside its validity window, and a freshly made sim platform.
Goals on a 2-core machine: < 10 ms for SGX/TDX/SNP, < 1 ms for sim.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from sealedtorch.attest import Evidence, Tee, VerifierConfig, verify
from sealedtorch.attest.binding import report_data
from sealedtorch.attest.measure import measurement
from sealedtorch.attest.sim import init_platform

REPO = Path(__file__).resolve().parents[1]
EVIDENCE = Path(os.environ.get("SEALEDTORCH_EVIDENCE_DIR", REPO.parent / "shared" / "evidence"))


def timings(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    fn()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the sim verifier warns on every use, by design
    warnings.simplefilter("ignore")   # AMD VCEKs (serial 0) warn on every load
    e = EVIDENCE
    cases: list[tuple[str, Evidence, float, VerifierConfig]] = [
        ("sgx (DCAP v3)", Evidence(Tee.SGX, (e / "sgx/quote.bin").read_bytes(),
                                   collateral=(e / "sgx/collateral.json").read_bytes()),
         1751000000, VerifierConfig()),
        ("tdx (DCAP v4)", Evidence(Tee.TDX, (e / "tdx/quote.bin").read_bytes(),
                                   collateral=(e / "tdx/collateral.json").read_bytes()),
         1751000000, VerifierConfig()),
        ("snp (Milan v2)", Evidence(Tee.SNP, (e / "snp/milan-report.bin").read_bytes(),
                                    certificates=(e / "snp/milan-vcek.der").read_bytes()
                                    + (e / "snp/milan-ask-ark.pem").read_bytes()),
         time.time(), VerifierConfig()),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        platform = init_platform(Path(tmp) / "sim")
        ev = platform.sign_evidence(report_data(os.urandom(32), os.urandom(32)),
                                    measurement=measurement())
        cases.append(("sim", ev, time.time(),
                      VerifierConfig(sim_platform_keys=(platform.public_key,))))
        print(f"{'TEE':<18}{'p50 ms':>10}{'p99 ms':>10}   goal")
        for name, evidence, at, config in cases:
            p50, p99 = timings(lambda ev=evidence, at=at, c=config: verify(ev, at=at, config=c),
                               args.rounds)
            goal = "< 1 ms" if name == "sim" else "< 10 ms"
            print(f"{name:<18}{p50:>10.3f}{p99:>10.3f}   {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
