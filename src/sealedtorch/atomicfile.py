"""Replacing a file atomically: readers see the old file or the new one, never a part.

Every file sealedtorch writes in place (a sealed model, an exported safetensors file, a
collateral or VCEK cache entry, ``keyserver.json``, a certificate, a runtime's announcement)
goes through here, so each gets the same recipe: a temporary file in the same directory
(so the rename cannot cross file systems), created with the final mode whatever the umask,
written, fsynced, renamed over the target, and removed again if anything fails.  Secret
files that must never be overwritten are :mod:`sealedtorch.secretfile`'s job instead.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replace_atomically", "write_atomically"]


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike[str], *, mode: int = 0o600,
                       sync_dir: bool = False) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` for the new content of ``path``; on a normal exit the temp
    file is fsynced and renamed over ``path`` (and the directory fsynced, with
    ``sync_dir``), on an exception it is removed and ``path`` is left as it was.

    Raises:
        OSError: the temporary file cannot be created, written, synced or renamed.
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
            yield fd, tmp
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600,
                     sync_dir: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically (see :func:`replace_atomically`).

    Raises:
        OSError: the file cannot be written or renamed into place.
    """
    with replace_atomically(path, mode=mode, sync_dir=sync_dir) as (fd, _tmp):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return Path(path)
