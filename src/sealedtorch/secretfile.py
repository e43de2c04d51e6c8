"""Files that hold secrets on disk: key files, the KEK file, sim platform keys, PIN files.

One place decides how they are created (exclusively, mode 0600, fsynced; never
overwritten) and how they are read (refused when group or others may read them), so every
secret file in sealedtorch gets the same protection and the same error messages.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import KeyFileError, SealedTorchError


def write_new(path: str | os.PathLike[str], data: bytes, *, what: str,
              mode: int = 0o600) -> Path:
    """Create ``path`` with ``data`` (mode 0600 unless it is public, e.g. a certificate);
    refuse if anything exists there."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(f"{p}: already exists; refusing to overwrite {what}") from None
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot create {what}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return p


def read_private(path: str | os.PathLike[str], *, what: str,
                 error: type[SealedTorchError] = KeyFileError) -> bytes:
    """Read a secret file, refusing one that group or others can read (``error``)."""
    p = Path(path)
    try:
        st = p.stat()
        raw = p.read_bytes()
    except FileNotFoundError:
        raise error(f"{p}: {what} not found") from None
    except OSError as exc:
        raise error(f"{p}: cannot read {what}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise error(f"{p}: {what} is readable by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {p}`")
    return raw
