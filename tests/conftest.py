"""Shared fixtures.  Keys are generated at test time; nothing secret is committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def evidence_dir() -> Path:
    env = os.environ.get("SEALEDTORCH_EVIDENCE_DIR")
    return Path(env) if env else REPO.parent / "shared" / "evidence"


def fixtures_dir() -> Path:
    env = os.environ.get("SEALEDTORCH_FIXTURES_DIR")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


@pytest.fixture
def sgx_pytorch_fixture() -> Path:
    """The checkpoint encrypted by sgx-pytorch's own code (shared/fixtures/sgx-pytorch)."""
    d = fixtures_dir() / "sgx-pytorch"
    if not (d / "encrypted.pt").is_file():
        pytest.fail(f"sgx-pytorch fixture not found at {d} (set SEALEDTORCH_FIXTURES_DIR)")
    return d


@pytest.fixture
def evidence() -> Path:
    d = evidence_dir()
    if not d.is_dir():
        pytest.fail(f"real attestation evidence not found at {d} (set SEALEDTORCH_EVIDENCE_DIR)")
    return d
