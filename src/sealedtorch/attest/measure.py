"""The sim TEE's measurement: a hash of the runtime's own code and configuration.

    package_digest = SHA-384( "sealedtorch/sim-package/v1\\0"
                              ‖ for each file, in byte-wise order of its UTF-8 relative path:
                                  u64be(len(path)) ‖ path ‖ u64be(len(content)) ‖ content )
    measurement    = SHA-384( "sealedtorch/sim-measurement/v1\\0"
                              ‖ package_digest ‖ u64be(len(config)) ‖ config )

"Each file" is every regular file under the installed ``sealedtorch`` package directory
(symbolic links to files are read through; directories named ``__pycache__`` and files ending
in ``.pyc``/``.pyo`` are skipped; linked directories are not followed).  Paths are relative to
the package directory with ``/`` separators.  The length prefixes make the encoding injective,
so renaming, adding, removing or changing any file changes the digest.  The package digest is
computed once per directory per process.

This is what a sim platform reports; it is a convenience for development, not a security
boundary (see ``docs/tee-sim.md``).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from .. import crypto
from ..errors import ConfigError

__all__ = ["MEASUREMENT_SIZE", "measurement", "package_digest", "package_files"]

PACKAGE_DOMAIN = b"sealedtorch/sim-package/v1\x00"
MEASUREMENT_DOMAIN = b"sealedtorch/sim-measurement/v1\x00"
MEASUREMENT_SIZE = 48

_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def package_files(package_dir: Path | str | None = None) -> list[str]:
    """The relative paths (``/``-separated, in hashing order) that :func:`package_digest`
    covers."""
    root = Path(package_dir) if package_dir is not None else _PACKAGE_DIR
    if not root.is_dir():
        raise ConfigError(f"cannot measure {root}: not a directory (sealedtorch must be "
                          f"installed as files, not inside a zip)")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(_SKIP_SUFFIXES):
                continue
            if not os.path.isfile(os.path.join(dirpath, name)):
                continue  # sockets, fifos, dangling links: not code
            found.append((rel_dir / name).as_posix())
    found.sort(key=lambda p: p.encode("utf-8", "surrogateescape"))
    return found


@functools.lru_cache(maxsize=8)
def _digest(root: str) -> bytes:
    h = hashlib.sha384(PACKAGE_DOMAIN)
    for rel in package_files(root):
        path = rel.encode("utf-8", "surrogateescape")
        try:
            content = Path(root, rel).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot measure {root}/{rel}: {exc}") from None
        h.update(_u64(len(path)))
        h.update(path)
        h.update(_u64(len(content)))
        h.update(content)
    return h.digest()


def package_digest(package_dir: Path | str | None = None) -> bytes:
    """SHA-384 over the files of the ``sealedtorch`` package (or ``package_dir``); cached."""
    root = Path(package_dir) if package_dir is not None else _PACKAGE_DIR
    return _digest(str(root.resolve()))


def measurement(runtime_config: bytes = b"", *, package_dir: Path | str | None = None) -> bytes:
    """The 48-byte sim measurement of this runtime's code and its configuration bytes."""
    config = bytes(runtime_config)
    return crypto.sha384(MEASUREMENT_DOMAIN, package_digest(package_dir),
                         _u64(len(config)), config)


#: Forget cached package digests (tests that modify a package copy in place).
clear_cache = _digest.cache_clear
