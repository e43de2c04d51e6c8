"""The sim TEE's measurement: a hash of the runtime's own code and configuration.

    package_digest = SHA-384( "sealedtorch/sim-package/v1\\0"
                              ‖ for each file, in byte-wise order of its UTF-8 relative path:
                                  u64be(len(path)) ‖ path ‖ u64be(len(content)) ‖ content )
    measurement    = SHA-384( "sealedtorch/sim-measurement/v1\\0"
                              ‖ package_digest ‖ u64be(len(config)) ‖ config
                              ‖ for each architecture module root M named by config,
                                  in byte-wise order of its name:
                                    u64be(len(M)) ‖ M ‖ module_digest(M) )

"Each file" is every regular file under the installed ``sealedtorch`` package directory
(symbolic links to files are read through; directories named ``__pycache__`` and files ending
in ``.pyc``/``.pyo`` are skipped; linked directories are not followed).  Paths are relative to
the package directory with ``/`` separators.  The length prefixes make the encoding injective,
so renaming, adding, removing or changing any file changes the digest.  The package digest is
computed once per directory per process.

**Bytecode caches.**  Python runs a module's cached bytecode instead of its source when
the cache's header matches the source (timestamp and size, or a hash-based cache), so a
planted ``.pyc`` would run other code under an identical measurement.  Every measured tree
is therefore checked (:func:`check_bytecode`): each cache this interpreter would load for a
measured source (``importlib.util.cache_from_source``, so ``sys.pycache_prefix`` is
honoured, at every optimisation level) is unmarshalled -- never executed -- and compared
with ``compile()`` of the source; a mismatch, an unreadable cache, or a sourceless ``.pyc``
module (which Python imports when no ``.py`` exists) raises
:class:`~sealedtorch.errors.MeasurementError` naming the file.  Stale caches (whose
timestamp no longer matches, which Python ignores) are ignored.

**Architecture modules.**  When ``config`` is a runtime configuration (a JSON object with
an ``architectures`` list, e.g. ``RuntimeConfig.canonical_bytes()``), the top-level
package (or single-file module) of every ``module:callable`` entry outside sealedtorch is
measured too: ``module_digest`` is :func:`package_digest` of the package directory (or the
same encoding over the one file), located on ``sys.path`` without importing anything, or
``SHA-384("sealedtorch/sim-absent/v1")`` when it is not installed.  Editing a module the
configuration allows therefore changes the measurement.  The installed libraries in
:data:`PLATFORM_LIBRARIES` (torchvision, transformers) are measured by their sources only,
without the bytecode-cache check; torch and Python themselves are not covered: on real TEEs
the image measurement covers them.

This is what a sim platform reports; it is a convenience for development, not a security
boundary (see ``docs/tee-sim.md``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import marshal
import os
from pathlib import Path

from .. import crypto
from ..errors import ConfigError, MeasurementError

__all__ = ["MEASUREMENT_SIZE", "architecture_roots", "check_bytecode", "measurement",
           "module_digest", "package_digest", "package_files"]

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


def _cache_is_live(cache: bytes, source: Path) -> bool:
    """Whether the import system would load ``cache`` instead of compiling ``source``
    (the checks of ``importlib._bootstrap_external``: magic, then timestamp and size, or a
    hash-based cache, which is always treated as live here)."""
    if len(cache) < 16 or cache[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(cache[4:8], "little")
    if flags & 0b1:
        return True
    st = source.stat()
    return (int.from_bytes(cache[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(cache[12:16], "little") == st.st_size & 0xFFFFFFFF)


def _check_source_caches(source: Path) -> None:
    for level, optimize in (("", 0), (1, 1), (2, 2)):
        cache_path = Path(importlib.util.cache_from_source(str(source), optimization=level))
        try:
            cache = cache_path.read_bytes()
        except OSError:
            continue
        if not _cache_is_live(cache, source):
            continue
        try:
            cached = marshal.loads(cache[16:])  # noqa: S302 (compared, never executed)
        except (ValueError, EOFError, TypeError):
            raise MeasurementError(f"{cache_path}: unreadable bytecode cache for {source} "
                                   f"(delete it)") from None
        compiled = compile(source.read_bytes(), str(source), "exec", dont_inherit=True,
                           optimize=optimize)
        if cached != compiled:
            raise MeasurementError(
                f"{cache_path}: bytecode cache does not match its source {source} (planted "
                f"or built from other code); Python would run it instead of the measured "
                f"source; delete it")


def check_bytecode(root: Path | str) -> None:
    """Refuse bytecode under ``root`` (a package directory or one module file) that would
    run instead of the measured sources (see the module docstring)."""
    base = Path(root)
    if base.is_file():
        if base.suffix == ".py":
            _check_source_caches(base)
        return
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(_SKIP_SUFFIXES) and not path.with_suffix(".py").exists():
                raise MeasurementError(
                    f"{path}: a sourceless bytecode module in a measured tree (Python would "
                    f"import it, the measurement would not cover it); delete it")
    for rel in package_files(base):
        if rel.endswith(".py"):
            _check_source_caches(base / rel)


#: Installed libraries that architecture entries name (``torchvision.models:resnet50``,
#: ``transformers:LlamaForCausalLM``): their sources are measured, but their bytecode caches
#: are not compared with the sources (``compile()`` of all of transformers takes seconds at
#: every start).  Like torch itself they are platform code, which on real TEEs the image
#: measurement covers; sealedtorch and every custom architecture module get the full check.
PLATFORM_LIBRARIES = frozenset({"torch", "torchvision", "transformers"})


@functools.lru_cache(maxsize=8)
def _digest(root: str, check: bool = True) -> bytes:
    if check:
        check_bytecode(root)
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


ABSENT_DOMAIN = b"sealedtorch/sim-absent/v1"


def architecture_roots(runtime_config: bytes) -> list[str]:
    """Top-level modules of the ``module:callable`` architectures a runtime configuration
    (JSON) allows, other than sealedtorch itself; ``[]`` for anything else."""
    try:
        doc = json.loads(runtime_config)
    except (ValueError, UnicodeDecodeError):
        return []
    arches = doc.get("architectures") if isinstance(doc, dict) else None
    if not isinstance(arches, list):
        return []
    roots = {a.partition(":")[0].split(".")[0] for a in arches
             if isinstance(a, str) and ":" in a}
    roots.discard("sealedtorch")
    return sorted(r for r in roots if r.isidentifier())


@functools.lru_cache(maxsize=64)
def module_digest(name: str) -> bytes:
    """The digest of top-level module ``name`` as found on ``sys.path`` (not imported)."""
    spec = importlib.machinery.PathFinder.find_spec(name)
    if spec is None:
        return crypto.sha384(ABSENT_DOMAIN)
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations))).resolve()
        return _digest(str(root), name not in PLATFORM_LIBRARIES)
    origin = Path(spec.origin or "")
    if not origin.is_file():
        return crypto.sha384(ABSENT_DOMAIN)
    check_bytecode(origin)
    path, content = origin.name.encode(), origin.read_bytes()
    return crypto.sha384(PACKAGE_DOMAIN, _u64(len(path)), path, _u64(len(content)), content)


def measurement(runtime_config: bytes = b"", *, package_dir: Path | str | None = None) -> bytes:
    """The 48-byte sim measurement of this runtime's code, its configuration bytes, and the
    architecture modules that configuration allows."""
    config = bytes(runtime_config)
    parts = [MEASUREMENT_DOMAIN, package_digest(package_dir), _u64(len(config)), config]
    for name in architecture_roots(config):
        parts += [_u64(len(name)), name.encode(), module_digest(name)]
    return crypto.sha384(*parts)


def clear_cache() -> None:
    """Forget cached digests (tests that modify a package copy in place)."""
    _digest.cache_clear()
    module_digest.cache_clear()
