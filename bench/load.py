"""Load speed: plaintext baselines and sealed files, side by side in one process.

    .venv/bin/python bench/load.py [--rounds 5] [--synthetic-gib 2] [--skip-synthetic]
                                   [--sharded-gib 8 --shards 8]

Prints medians and ratios for a torchvision ResNet-50 (seeded random weights) and a
synthetic state_dict, plus this machine's AES-256-GCM limit (``decrypt_into`` a
preallocated buffer, 1 and N threads), the effective decryption throughput, the true floor
of a load (N-thread decryption from a memory-mapped file into freshly allocated, never
touched memory, same run) with the sealed load as a ratio of it, and the peak anonymous
memory a sealed load uses beyond the tensors themselves.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load_file, save_file

import sealedtorch
from sealedtorch.keys import ModelKey

CORES = os.cpu_count() or 1


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm the page cache and the allocator, as a second load would
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return statistics.median(times) * 1e3


def aes_limit(threads: int, size: int = 256 << 20, chunk: int = 1 << 20) -> float:
    """GB/s of AES-256-GCM decrypt_into a preallocated buffer, ``threads`` threads."""
    aead = AESGCM(os.urandom(32))
    n = size // chunk
    cts = [aead.encrypt(i.to_bytes(12, "big"), os.urandom(chunk), b"") for i in range(n)]
    out = memoryview(bytearray(size))

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            aead.decrypt_into(i.to_bytes(12, "big"), cts[i], b"", out[i * chunk:(i + 1) * chunk])

    best = 0.0
    for _ in range(3):
        ths = [threading.Thread(target=work, args=(k * n // threads, (k + 1) * n // threads))
               for k in range(threads)]
        t = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        best = max(best, size / (time.perf_counter() - t) / 1e9)
    return best


def fresh_memory_floor(size: int, work: Path, rounds: int, threads: int = CORES,
                       chunk: int = 1 << 20) -> float:
    """The true floor of a sealed load on this machine, in ms: ``threads`` threads
    AES-256-GCM-decrypting ``size`` bytes of 1-MiB chunks, read through a memory map of a
    file as a sealed load reads them, into *freshly allocated, never touched* memory (so
    first-touch page faults are paid, as a load pays them).  No header, no tensors."""
    import mmap

    aead = AESGCM(os.urandom(32))
    n = -(-size // chunk)
    path = work / "floor.bin"
    plain = os.urandom(chunk)
    with path.open("wb") as f:
        for i in range(n):
            part = plain[:min(chunk, size - i * chunk)]
            f.write(aead.encrypt(i.to_bytes(12, "big"), part, b""))
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    src = memoryview(mm)

    def once() -> np.ndarray:
        # fresh, never touched, from the allocator the sealed reader uses for big tensors
        # (NumPy: transparent huge pages), so first-touch faults cost what a load pays
        out = np.empty(size, dtype=np.uint8)
        dst = memoryview(out)

        def work_(k: int) -> None:
            for i in range(k, n, threads):
                lo = i * chunk
                ln = min(chunk, size - lo)
                ct = src[i * (chunk + 16):i * (chunk + 16) + ln + 16]  # ciphertext ‖ tag
                aead.decrypt_into(i.to_bytes(12, "big"), ct, b"", dst[lo:lo + ln])

        ths = [threading.Thread(target=work_, args=(k,)) for k in range(threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return out

    try:
        return median_ms(once, rounds)
    finally:
        src.release()
        mm.close()
        path.unlink()


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_memory(fn: Callable[[], dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(peak anonymous RSS growth during fn, bytes of the tensors it returned)."""
    base = _rss_anon()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_anon())
            time.sleep(0.0005)

    th = threading.Thread(target=sample)
    th.start()
    out = fn()
    done.set()
    th.join()
    peak = max(peak, _rss_anon())
    tensor_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in out.values()}
                       .values())
    return peak - base, tensor_bytes


def bench_state_dict(label: str, sd: dict[str, torch.Tensor], work: Path,
                     rounds: int) -> tuple[int, float]:
    """Print the table for one state_dict; return (bytes, sealed ms with all cores)."""
    size = sum(t.numel() * t.element_size() for t in sd.values())
    key = ModelKey.generate("bench")
    st, pt, sealed = work / f"{label}.safetensors", work / f"{label}.pt", work / f"{label}.sealed"
    save_file(sd, st)
    torch.save(sd, pt)
    sealedtorch.seal(sd, sealed, key=key, overwrite=True, progress=False)
    print(f"\n== {label}: {len(sd)} tensors, {size / 1e6:.1f} MB, median of {rounds} ==")
    def touched(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Read every byte once: safetensors may hand out lazily mapped file pages."""
        for t in tensors.values():
            if t.numel():
                t.reshape(-1).view(torch.uint8).max()
        return tensors

    rows = [
        ("safetensors load_file", lambda: load_file(st)),
        ("safetensors + read every byte", lambda: touched(load_file(st))),
        ("torch.load(weights_only=True)", lambda: torch.load(pt, weights_only=True)),
        ("sealed, 1 worker", lambda: sealedtorch.load_state_dict(sealed, key=key, workers=1)),
        (f"sealed, {CORES} workers",
         lambda: sealedtorch.load_state_dict(sealed, key=key, workers=CORES)),
    ]
    results = {name: median_ms(fn, rounds) for name, fn in rows}
    base_st = results["safetensors load_file"]
    base_pt = results["torch.load(weights_only=True)"]
    print(f"{'loader':<32}{'ms':>10}{'GB/s':>8}{'vs safetensors':>16}{'vs torch.load':>15}")
    for name, ms in results.items():
        print(f"{name:<32}{ms:>10.1f}{size / ms / 1e6:>8.2f}{ms / base_st:>15.2f}x"
              f"{ms / base_pt:>14.2f}x")
    floor = fresh_memory_floor(size, work, rounds)
    sealed_ms = results[f"sealed, {CORES} workers"]
    print(f"{'floor: decrypt into fresh memory':<32}{floor:>10.1f}{size / floor / 1e6:>8.2f}"
          f"   sealed load = {floor / sealed_ms:.2f} of the floor's speed (goal >= 0.9)")
    extra, tensors = peak_extra_memory(
        lambda: sealedtorch.load_state_dict(sealed, key=key, workers=CORES))
    print(f"peak anonymous memory during a sealed load: {extra / 1e6:.1f} MB for "
          f"{tensors / 1e6:.1f} MB of tensors (extra beyond tensors: "
          f"{(extra - tensors) / 1e6:+.1f} MB; budget: one 1-MiB chunk per worker)")
    for p in (st, pt, sealed):
        p.unlink()
    return size, results[f"sealed, {CORES} workers"]


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_sharded(gib: float, shards: int, work: Path, rounds: int) -> None:
    """A sharded safetensors checkpoint of ``gib`` GiB: seal it streaming (peak memory),
    then load it sealed next to safetensors and the fresh-memory floor."""
    from sealedtorch.format.lazy import read_safetensors_lazily

    per = int(gib * (1 << 30) / shards) // (64 << 20) * (64 << 20)  # whole 64 MiB tensors
    files = []
    for i in range(shards):
        path = work / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({f"layers.{i}.{j}.weight": torch.randn(16 << 20)
                   for j in range(per // (64 << 20))}, str(path))
        files.append(path)
    size = per * shards
    print(f"\n== sharded: {shards} safetensors shards x {per / 2**20:.0f} MiB = "
          f"{size / 2**30:.2f} GiB ==")
    lazy: dict[str, object] = {}
    for path in files:
        lazy.update(read_safetensors_lazily(path))
    key = ModelKey.generate("sharded")
    sealed = work / "sharded.sealed"
    before = _hwm()
    t = time.perf_counter()
    sealedtorch.seal(lazy, sealed, key=key, progress=False)
    seal_s = time.perf_counter() - t
    print(f"seal (streaming, {CORES} workers): {seal_s:.1f} s = {size / seal_s / 1e9:.2f} GB/s;"
          f" peak RSS growth {(_hwm() - before) / 2**20:.1f} MiB (largest shard "
          f"{per / 2**20:.0f} MiB)")

    def load_shards() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path in files:
            out.update(load_file(path))
        return out

    def touched() -> dict[str, torch.Tensor]:
        out = load_shards()
        for t in out.values():
            t.view(torch.uint8).max()
        return out

    rows = {"safetensors, every shard + read": median_ms(touched, rounds),
            f"sealed, {CORES} workers": median_ms(
                lambda: sealedtorch.load_state_dict(sealed, key=key, workers=CORES), rounds)}
    for p in files:
        p.unlink()
    floor = fresh_memory_floor(size, work, rounds)
    sealed_ms = rows[f"sealed, {CORES} workers"]
    for name, ms in rows.items():
        print(f"{name:<36}{ms:>10.1f} ms{size / ms / 1e6:>8.2f} GB/s")
    print(f"{'floor: decrypt into fresh memory':<36}{floor:>10.1f} ms{size / floor / 1e6:>8.2f}"
          f" GB/s   sealed load = {floor / sealed_ms:.2f} of the floor's speed (goal >= 0.9)")
    extra, tensors = peak_extra_memory(
        lambda: sealedtorch.load_state_dict(sealed, key=key, workers=CORES))
    print(f"peak anonymous memory during the sealed load: {(extra - tensors) / 1e6:+.1f} MB "
          "beyond the tensors")
    sealed.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--synthetic-gib", type=float, default=2.0)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--sharded-gib", type=float, default=0.0,
                    help="also a sharded safetensors checkpoint of this size (e.g. 8)")
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    import cryptography

    print(f"sealedtorch {sealedtorch.__version__}, torch {torch.__version__}, "
          f"cryptography {cryptography.__version__}, {CORES} cores")
    one, many = aes_limit(1), aes_limit(CORES)
    print(f"AES-256-GCM limit (decrypt_into 256 MiB, preallocated): 1 thread {one:.2f} GB/s, "
          f"{CORES} threads {many:.2f} GB/s (scaling {many / one:.2f}x)")
    with tempfile.TemporaryDirectory(prefix="sealedtorch-bench-") as tmp:
        work = Path(tmp)
        import torchvision

        torch.manual_seed(0)
        size, ms = bench_state_dict("resnet50", torchvision.models.resnet50().state_dict(),
                                    work, args.rounds)
        print(f"effective sealed throughput {size / ms / 1e6:.2f} GB/s = "
              f"{size / ms / 1e6 / (one * CORES) * 100:.0f}% of limit x cores "
              f"({one:.2f} x {CORES})")
        if not args.skip_synthetic:
            n = max(1, int(args.synthetic_gib * 1024 / 64))  # 64 MiB float32 tensors
            sd = {f"layer{i}.weight": torch.randn(16 << 20) for i in range(n)}
            size, ms = bench_state_dict(f"synthetic-{args.synthetic_gib:g}GiB", sd, work,
                                        max(2, args.rounds // 2))
            print(f"effective sealed throughput {size / ms / 1e6:.2f} GB/s = "
                  f"{size / ms / 1e6 / (one * CORES) * 100:.0f}% of limit x cores")
        if args.sharded_gib:
            bench_sharded(args.sharded_gib, args.shards, work, max(2, args.rounds // 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
