"""The README's first command: the end-to-end demo passes its own assertions."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_no_process_behind(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sealedtorch.cli", "demo", "--rounds", "2",
                           "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "logits bit-identical" in out and "was refused" in out
    assert "none left behind" in out and out.rstrip().endswith("demo OK")
    assert "SOFTWARE stand-in" in out
    key_bytes = (tmp_path / "resnet50.key").read_bytes()
    for log in ("keyserver.log", "keycache.log"):
        text = (tmp_path / log).read_text()
        assert "INSECURE" in text
        import json

        secret = json.loads(key_bytes)["key"]
        assert secret not in text
