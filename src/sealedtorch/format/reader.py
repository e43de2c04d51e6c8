"""Reading sealed files: preamble without a key, tensors with one.

Loading allocates one buffer for the whole data segment and decrypts every chunk straight
into it (``AESGCM.decrypt_into``; several threads, the GIL released), then hands out tensors
that are views of that buffer.  So the plaintext exists exactly once, in the tensors' own
memory, and the only other memory used is one ciphertext chunk per worker.  If any chunk
fails authentication the whole buffer is zeroed and an :class:`IntegrityError` is raised:
nothing partially decrypted is ever returned.
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import crypto
from ..errors import FormatError, IntegrityError
from ..keys import KeySource, ModelKey
from ..progress import Progress
from .header import AliasEntry, Header, TensorEntry
from .spec import (
    FIXED_SIZE,
    TAG_SIZE,
    FileKeys,
    Preamble,
    chunk_aad,
    file_digest,
    header_aad,
    parse_preamble,
)

_MAX_PREAMBLE = FIXED_SIZE + 0xFFFF


@dataclass(frozen=True)
class Opened:
    """A decrypted header plus what is needed to decrypt the data."""

    preamble: Preamble
    header: Header
    keys: FileKeys
    digest: bytes


class SealedFile:
    """A ``.sealed`` file on disk.  Cheap to construct: reads only the preamble."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        try:
            with self.path.open("rb") as f:
                head = f.read(_MAX_PREAMBLE)
                self.actual_size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise FormatError(f"{self.source}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.source}: is a directory") from None
        self.preamble = parse_preamble(head, source=self.source)

    def check_size(self) -> None:
        expected = self.preamble.file_size
        if self.actual_size != expected:
            what = "truncated" if self.actual_size < expected else "has trailing bytes"
            raise IntegrityError(
                f"{self.source}: file {what}: {self.actual_size} bytes, the preamble "
                f"declares {expected}")

    def key_from(self, keys: KeySource) -> ModelKey:
        return keys.get_key(self.preamble.model_id, self.preamble.key_version)

    def open(self, key: ModelKey) -> Opened:
        """Check the key against the file and decrypt the header."""
        p = self.preamble
        if (key.model_id, key.version) != (p.model_id, p.key_version):
            raise IntegrityError(
                f"{self.source}: the key does not match this file: the key is for model "
                f"{key.model_id!r} version {key.version}, the file was sealed for "
                f"{p.model_id!r} version {p.key_version}")
        self.check_size()
        keys = FileKeys.derive(key, p.salt)
        if not crypto.constant_time_equal(keys.check, p.key_check):
            raise IntegrityError(
                f"{self.source}: the key does not match this file (model {p.model_id!r} "
                f"version {p.key_version}): wrong key, or the preamble was altered")
        with self.path.open("rb") as f:
            f.seek(p.size)
            header_ct = f.read(p.header_length)
        if len(header_ct) != p.header_length:
            raise IntegrityError(f"{self.source}: file truncated inside the header")
        plain = keys.header.decrypt(crypto.counter_nonce(0), header_ct, header_aad(p.raw),
                                    what=f"{self.source}: header (file modified)")
        header = Header.decode(plain, data_length=p.data_length, source=self.source)
        return Opened(p, header, keys, file_digest(p.raw, header_ct))

    def read_tensors(self, key: ModelKey, *, device: str | torch.device = "cpu",
                     workers: int | None = None,
                     progress: bool | None = None) -> tuple[dict[str, torch.Tensor], Header]:
        opened = self.open(key)
        dev = torch.device(device)
        pin = dev.type == "cuda" and torch.cuda.is_available()
        buf = _allocate(opened.preamble.data_length, pin=pin)
        try:
            self._decrypt_into(opened, buf, workers=workers, progress=progress)
        except BaseException:
            buf.zero_()
            raise
        if dev.type != "cpu":
            staged = buf
            buf = buf.to(dev)
            staged.zero_()  # plaintext must not linger in host memory after the copy
            del staged
        return _tensor_views(buf, opened.header), opened.header

    def _decrypt_into(self, opened: Opened, buf: torch.Tensor, *, workers: int | None,
                      progress: bool | None) -> None:
        p = opened.preamble
        count, cs = p.chunk_count, p.chunk_size
        if count == 0:
            return
        out = memoryview(buf.numpy())
        failed = threading.Event()
        n_workers = max(1, min(workers or os.cpu_count() or 1, count))
        per = -(-count // n_workers)
        with self.path.open("rb") as fh:
            # Ciphertext is read through a read-only mapping: decrypt_into reads the page
            # cache directly, so no ciphertext copy is made at all.
            mapped = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        if len(mapped) != p.file_size:
            mapped.close()
            raise IntegrityError(f"{self.source}: file changed size while loading")
        view = memoryview(mapped)

        def work(first: int, last: int, bar: Progress) -> None:
            for i in range(first, last):
                if failed.is_set():
                    return
                start = i * cs
                n = min(cs, p.data_length - start)
                off = p.data_offset + i * (cs + TAG_SIZE)
                try:
                    opened.keys.data.decrypt_into(
                        crypto.counter_nonce(i), view[off:off + n + TAG_SIZE],
                        chunk_aad(opened.digest, i, i == count - 1), out[start:start + n],
                        what=f"{self.source}: data chunk {i} of {count} (file modified, "
                             "truncated, reordered or spliced)")
                except IntegrityError:
                    failed.set()
                    raise
                bar.update(n)

        try:
            with Progress(p.data_length, f"decrypting {self.path.name}",
                          enabled=progress) as bar, ThreadPoolExecutor(n_workers) as pool:
                futures = [pool.submit(work, w * per, min((w + 1) * per, count), bar)
                           for w in range(n_workers)]
                errors = [f.exception() for f in futures]
        finally:
            _release(view, mapped)
        for err in errors:
            if err is not None:
                raise err.with_traceback(None)


def _release(view: memoryview, mapped: mmap.mmap) -> None:
    """Unmap the ciphertext.  A traceback may still pin a slice of it; then the mapping is
    closed when that traceback is collected instead."""
    try:
        view.release()
        mapped.close()
    except BufferError:
        pass


def _allocate(n: int, *, pin: bool) -> torch.Tensor:
    """The plaintext buffer.  NumPy backs large CPU allocations with transparent huge pages
    (madvise), which makes first-touch page faults ~4x cheaper than torch's allocator on
    VMs; torch then shares that memory without a copy."""
    if pin:
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)
    return torch.from_numpy(np.empty(n, dtype=np.uint8))


def _tensor_views(buf: torch.Tensor, header: Header) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for e in header.entries:
        if isinstance(e, AliasEntry):
            out[e.name] = out[e.target]
            continue
        assert isinstance(e, TensorEntry)
        raw = buf[e.offset:e.offset + e.nbytes]
        out[e.name] = raw.view(e.torch_dtype).reshape(e.shape)
    return out
