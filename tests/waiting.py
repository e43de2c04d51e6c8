"""Polling for a condition in tests that drive real processes (generous timeouts, no
timing claims: the machine may be contended)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """``cond()``'s first truthy value; it may raise until it holds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as exc:  # the condition may raise until it holds
            last = exc
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
