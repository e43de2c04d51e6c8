#!/usr/bin/env bash
# Install sealedtorch with its test extras into ./.venv (created if missing), lint (ruff,
# with the C901 complexity limit), type-check src/ (mypy), test.
set -euo pipefail
cd "$(dirname "$0")/.."
# SoftHSM2: the PKCS#11 token that the HSM KEK tests run against (installed once, with apt).
if ! command -v softhsm2-util >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "scripts/test.sh: softhsm2 is not installed and this is not root;" \
             "run: sudo apt-get install -y softhsm2" >&2
        exit 1
    fi
    echo "scripts/test.sh: installing softhsm2 (apt-get)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[vision,demo,hf,test,real-model,hsm,postgres]'
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
