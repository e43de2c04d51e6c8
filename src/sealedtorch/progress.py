"""A minimal, thread-safe progress bar for long seal/unseal/load work.

Only drawn on a TTY (stderr) unless forced; never more than ~10 redraws a second, so it
costs nothing measurable on the hot path.  No third-party dependency for a progress bar.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._done = 0
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._start = time.perf_counter()

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._done += n
            now = time.perf_counter()
            if now - self._last_draw >= 0.1 or self._done >= self.total:
                self._last_draw = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self._done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = self._done / max(now - self._start, 1e-9) / 1e6
        self.stream.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {rate:8.1f} MB/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
