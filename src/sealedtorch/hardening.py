"""Process hardening shared by the services that hold secrets (keycache, runtime).

Both processes hold plaintext keys or weights in memory.  Two things the host (or another
process of the same uid) could otherwise use to read that memory are switched off at start:

- core files (``RLIMIT_CORE`` 0): a crash would otherwise write the heap to disk;
- dumpability (``prctl(PR_SET_DUMPABLE, 0)``): same-uid processes can no longer ptrace the
  process or read its ``/proc/PID/mem``, ``environ`` or ``maps``, and ``/proc/PID`` becomes
  owned by root.

Best effort: what cannot be done (no ``prctl`` outside Linux) is returned and logged as a
warning, never silently skipped.  Inside a TEE the hardware protects memory from the host
anyway; this closes the same-uid path on the guest side and the sim TEE's host.
"""

from __future__ import annotations

import logging

__all__ = ["harden_process"]

log = logging.getLogger("sealedtorch.hardening")

_PR_SET_DUMPABLE = 4


def harden_process(label: str = "process") -> list[str]:
    """No core dumps, not dumpable.  Returns (and logs, prefixed with ``label``) what could
    not be done; an empty list means both are in force."""
    problems: list[str] = []
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, OSError, ValueError) as exc:
        problems.append(f"core dumps not disabled: {exc}")
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            problems.append(f"prctl(PR_SET_DUMPABLE, 0) failed: errno {ctypes.get_errno()}")
    except (OSError, AttributeError) as exc:
        problems.append(f"prctl unavailable: {exc}")
    for problem in problems:
        log.warning("%s: %s", label, problem)
    return problems
