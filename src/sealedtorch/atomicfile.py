"""Replacing a file atomically: readers see the old file or the new one, never a part.

Every file sealedtorch writes in place (a sealed model, an exported safetensors file, a
collateral or VCEK cache entry, ``keyserver.json``, a certificate, a runtime's announcement)
goes through here, so each gets the same recipe: a temporary file in the same directory
(so the rename cannot cross file systems), created with the final mode whatever the umask,
written, fsynced, renamed over the target, and removed again if anything fails.  Secret
files that must never be overwritten are :mod:`sealedtorch.secretfile`'s job instead.

Temporary files are named ``.NAME.*.tmp`` beside ``NAME``.  With ``locked=True`` the writer
holds an exclusive ``flock`` on its temporary file for as long as it writes; a process
killed mid-write (SIGKILL, power loss) leaves the file but not the lock, so the next write
to the same target finds it (:func:`remove_stale_temp_files`) and removes it, while a temp
file some live writer is still filling is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["create_locked_temp", "remove_stale_temp_files", "replace_atomically",
           "write_atomically"]

log = logging.getLogger(__name__)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def create_locked_temp(path: str | os.PathLike[str]) -> tuple[int, Path]:
    """A new temporary file beside ``path`` (mode 0600), exclusively locked for as long as
    the returned descriptor is open, so :func:`remove_stale_temp_files` leaves it alone.

    Raises:
        OSError: the temporary file cannot be created.
    """
    target = Path(path)
    for _ in range(5):
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp",
                                    dir=target.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleaner may have removed it between mkstemp and flock: start again
            if os.stat(name).st_ino == os.fstat(fd).st_ino:
                return fd, Path(name)
        except FileNotFoundError:
            pass
        os.close(fd)
    raise FileExistsError(f"cannot create a temporary file beside {target}")  # pragma: no cover


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """Remove the temporary files an interrupted locked write to ``path`` left behind.

    A temporary file is stale when no process holds its lock (its writer is gone); one
    being written right now is left alone.  Returns (path, size in bytes) of each removed
    file, so the caller can say what it cleaned up.  Never raises: a file it cannot inspect
    or remove is simply not reported."""
    target = Path(path)
    removed: list[tuple[Path, int]] = []
    try:
        candidates = sorted(target.parent.glob(f"{glob.escape(_temp_prefix(target))}*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            st = os.fstat(fd)
            try:
                if os.stat(tmp, follow_symlinks=False).st_ino != st.st_ino:
                    continue
                tmp.unlink()
            except OSError:
                continue
            removed.append((tmp, st.st_size))
            log.info("removed stale temporary file %s (%d bytes) left by an interrupted "
                     "write", tmp, st.st_size)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike[str], *, mode: int = 0o600,
                       sync_dir: bool = False, locked: bool = False
                       ) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp_path)`` for the new content of ``path``; on a normal exit the temp
    file is fsynced and renamed over ``path`` (and the directory fsynced, with
    ``sync_dir``), on an exception it is removed and ``path`` is left as it was.

    With ``locked`` the temp file is locked (see :func:`create_locked_temp`) until it is
    renamed, for writes long enough to be interrupted (sealing a model).

    Raises:
        OSError: the temporary file cannot be created, written, synced or renamed.
    """
    target = Path(path)
    if locked:
        fd, tmp = create_locked_temp(target)
    else:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp",
                                    dir=target.parent)
        tmp = Path(name)
    try:
        try:
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
            yield fd, tmp
            os.fsync(fd)
            os.replace(tmp, target)  # before close: a locked temp stays locked until renamed
        finally:
            os.close(fd)
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
