"""``sealedtorch serve`` in a child process (what the demo and fault tests use), with its
bound URL and certificate read back from an announce file.

The announce file is written atomically and only once the child accepts connections, so
:meth:`SubprocessServer.start` returning means the server is live (not necessarily ready).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["SubprocessServer"]


@dataclass
class SubprocessServer:
    """``sealedtorch serve`` in a child process (what the demo and fault tests use)."""

    process: subprocess.Popen[bytes]
    url: str
    cert_pem: bytes
    log_path: Path

    @classmethod
    def start(cls, args: Sequence[str], *, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> SubprocessServer:
        """Run ``sealedtorch serve ARGS`` (give ``--listen 127.0.0.1:0`` for a free port);
        return once it listens.  Its log goes to a temporary file (:attr:`log_path`)."""
        work = Path(tempfile.mkdtemp(prefix="sealedtorch-serve-"))
        announce = work / "announce.json"
        log_path = work / "serve.log"
        cmd = [sys.executable, "-m", "sealedtorch.cli", "serve", *args,
               "--announce", str(announce)]
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=env)
        deadline = time.monotonic() + timeout
        while not announce.exists():
            if process.poll() is not None:
                raise ConfigError(f"sealedtorch serve exited with status {process.returncode}:"
                                  f" {log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                process.kill()
                raise ConfigError(f"sealedtorch serve did not listen within {timeout} s")
            time.sleep(0.02)
        doc = json.loads(announce.read_text())
        return cls(process, doc["url"], doc["cert_pem"].encode(), log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> SubprocessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
