"""Sealing: a state_dict in, a ``.sealed`` file out.

The output appears atomically: it is written to a temporary file beside the target and
renamed only after every chunk is encrypted and flushed, so a failure never leaves a partial
file under the target name.  The writer holds an exclusive ``flock`` on its temporary file;
a process killed mid-write (SIGKILL, power loss) leaves the file but not the lock, so the
next write to the same target finds it (:func:`remove_stale_temp_files`) and removes it.
Chunks are independent (counter nonces, per-chunk AAD), so they are encrypted by several
threads, each into its own buffer, and written with ``pwrite``.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import crypto
from ..errors import ConfigError, UnsupportedTensorError
from ..keys import ModelKey
from ..progress import Progress
from .header import AliasEntry, Header, TensorEntry
from .lazy import FileReader, LazyTensor
from .spec import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_NAMES,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    TAG_SIZE,
    FileKeys,
    Preamble,
    chunk_aad,
    chunks_of,
    file_digest,
    header_aad,
)

log = logging.getLogger(__name__)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def remove_stale_temp_files(target: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """Remove the temporary files an interrupted write to ``target`` left behind.

    A temporary file is stale when no process holds its lock (its writer is gone); one
    being written right now is left alone.  Returns (path, size in bytes) of each removed
    file, so the caller can say what it cleaned up."""
    target = Path(target)
    removed: list[tuple[Path, int]] = []
    try:
        candidates = sorted(target.parent.glob(f"{glob.escape(_temp_prefix(target))}*.tmp"))
    except OSError:
        return removed
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            st = os.fstat(fd)
            try:
                if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
                    continue
                path.unlink()
            except OSError:
                continue
            removed.append((path, st.st_size))
            log.info("removed stale temporary file %s (%d bytes) left by an interrupted "
                     "write", path, st.st_size)
        finally:
            os.close(fd)
    return removed


def create_locked_temp(target: str | os.PathLike[str]) -> tuple[int, str]:
    """A new temporary file beside ``target`` (mode 0600 until the caller changes it),
    exclusively locked for as long as the returned descriptor is open."""
    target = Path(target)
    if not target.parent.is_dir():
        raise ConfigError(f"{target}: the directory {target.parent} does not exist")
    for _ in range(5):
        try:
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp",
                                       dir=target.parent)
        except OSError as exc:
            raise ConfigError(f"cannot create a file in {target.parent}: "
                              f"{exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleaner may have removed it between mkstemp and flock: start again
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)
    raise ConfigError(f"cannot create a temporary file beside {target}")  # pragma: no cover


@dataclass(frozen=True)
class SealResult:
    path: Path
    model_id: str
    key_version: int
    tensor_count: int
    data_length: int
    file_size: int


def _plan(state_dict: Mapping[str, Any]) -> tuple[list[TensorEntry | AliasEntry],
                                                    list[tuple[int, memoryview | LazyTensor]],
                                                    int]:
    """Lay tensors out back to back; detect tied tensors; refuse what we cannot seal.

    Values are tensors, or :class:`~sealedtorch.format.lazy.LazyTensor` (data still in its
    file: read chunk by chunk while sealing, so memory stays bounded)."""
    entries: list[TensorEntry | AliasEntry] = []
    sources: list[tuple[int, memoryview | LazyTensor]] = []
    seen_views: dict[tuple[Any, ...], str] = {}
    storage_ranges: dict[int, list[tuple[int, int, str]]] = {}
    offset = 0
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise UnsupportedTensorError(f"state_dict key {name!r} is not a string")
        if isinstance(t, LazyTensor):
            if t.dtype not in DTYPE_NAMES:
                raise UnsupportedTensorError(f"{name!r}: dtype {t.dtype} is not supported")
            entries.append(TensorEntry(name, DTYPE_NAMES[t.dtype], t.shape, offset, t.nbytes))
            if t.nbytes:
                sources.append((offset, t))
            offset += t.nbytes
            continue
        if not isinstance(t, torch.Tensor):
            raise UnsupportedTensorError(
                f"{name!r} is a {type(t).__name__}, not a tensor; only tensors can be sealed")
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise UnsupportedTensorError(
                f"{name!r}: only dense (strided) tensors with data can be sealed "
                f"(got layout {t.layout}, device {t.device})")
        if t.dtype not in DTYPE_NAMES:
            raise UnsupportedTensorError(f"{name!r}: dtype {t.dtype} is not supported")
        t = t.detach()
        if t.numel() > 0:
            st = t.untyped_storage()
            view_key = (st.data_ptr(), t.device, t.storage_offset(), tuple(t.shape),
                        tuple(t.stride()), t.dtype)
            if view_key in seen_views:
                entries.append(AliasEntry(name, seen_views[view_key]))
                continue
            begin = st.data_ptr() + t.storage_offset() * t.element_size()
            span = _byte_span(t)
            ranges = storage_ranges.setdefault(st.data_ptr(), [])
            for (b, e, other) in ranges:
                if begin < e and b < begin + span:
                    raise UnsupportedTensorError(
                        f"{name!r} shares memory with {other!r} but is a different view; "
                        "tied weights are kept only when both names refer to the identical "
                        "tensor. Clone one of them before sealing.")
            ranges.append((begin, begin + span, name))
            seen_views[view_key] = name
        flat = t.cpu().contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        entries.append(TensorEntry(name, DTYPE_NAMES[t.dtype], tuple(t.shape), offset, nbytes))
        if nbytes:
            sources.append((offset, memoryview(flat.view(torch.uint8).numpy())))
        offset += nbytes
    return entries, sources, offset


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _byte_span(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1) \
        * t.element_size()


def seal_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike[str], key: ModelKey,
                    *, metadata: Mapping[str, Any] | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int | None = None,
                    overwrite: bool = False, progress: bool | None = None) -> SealResult:
    """Encrypt ``state_dict`` under ``key`` into ``path`` (atomically)."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size % 64 == 0):
        raise ConfigError(f"chunk size must be a multiple of 64 in "
                          f"[{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], got {chunk_size}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target}: already exists (use --force to replace it)")
    entries, sources, data_length = _plan(state_dict)
    header = Header(tuple(entries), dict(metadata or {}))
    try:
        header_plain = header.encode()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata must be JSON-serialisable: {exc}") from None

    # Chunk i: (plaintext source slice, ciphertext file position).  Chunks never span two
    # tensors, so each is encrypted straight from that tensor's memory.
    # Lazy tensors are read chunk by chunk, by the worker that encrypts the chunk.
    plan: list[tuple[memoryview | tuple[LazyTensor, int, int], int]] = []
    for off, src in sources:
        size = src.nbytes if isinstance(src, LazyTensor) else len(src)
        for k in range(chunks_of(size, chunk_size)):
            lo, hi = k * chunk_size, min((k + 1) * chunk_size, size)
            part = (src, lo, hi - lo) if isinstance(src, LazyTensor) else src[lo:hi]
            plan.append((part, off + lo + len(plan) * TAG_SIZE))
    count = len(plan)

    salt = crypto.random_bytes(32)
    keys = FileKeys.derive(key, salt)
    preamble = Preamble(model_id=key.model_id, key_version=key.version, salt=salt,
                        key_check=keys.check, chunk_size=chunk_size,
                        header_length=len(header_plain) + TAG_SIZE, data_length=data_length,
                        chunk_count=count)
    pre = preamble.encode()
    header_ct = keys.header.encrypt(crypto.counter_nonce(0), header_plain, header_aad(pre))
    digest = file_digest(pre, header_ct)

    remove_stale_temp_files(target)
    fd, tmp = create_locked_temp(target)
    try:
        os.fchmod(fd, 0o644 & ~_umask())  # ciphertext is meant to be copied around
        os.write(fd, pre + header_ct)
        base = preamble.data_offset

        def work(indices: range, bar: Progress) -> None:
            sealed = bytearray(chunk_size + TAG_SIZE)
            staging = memoryview(bytearray(chunk_size)) if lazy else None
            for i in indices:
                source, pos = plan[i]
                if isinstance(source, tuple):
                    tensor, start, length = source
                    assert staging is not None
                    part = reader.read_into(tensor, start, staging[:length])
                else:
                    part = source
                sv = memoryview(sealed)[:len(part) + TAG_SIZE]
                keys.data.encrypt_into(crypto.counter_nonce(i), part,
                                       chunk_aad(digest, i, i == count - 1), sv)
                os.pwrite(fd, sv, base + pos)
                bar.update(len(part))

        lazy = any(isinstance(src, LazyTensor) for _, src in sources)
        reader = FileReader()
        n_workers = max(1, min(workers or os.cpu_count() or 1, count or 1))
        try:
            with Progress(data_length, f"sealing {target.name}", enabled=progress) as bar, \
                    ThreadPoolExecutor(n_workers) as pool:
                futures = [pool.submit(work, range(w, count, n_workers), bar)
                           for w in range(n_workers)]
                for f in futures:
                    f.result()
        finally:
            reader.close()  # after every worker has finished
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return SealResult(target, key.model_id, key.version,
                      sum(isinstance(e, TensorEntry) for e in entries), data_length,
                      preamble.file_size)
